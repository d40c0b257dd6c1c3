//! A bias looked up by distance from a per-head table: which backend gets the kernel.

use burn::prelude::*;

#[cfg(feature = "ndarray")]
use super::ndarray::{applies, applies_autodiff, distance_table_autodiff, distance_table_nd};

/// Whether [`distance_table_bias`] has a kernel for backend `B` (ndarray, with or without
/// autodiff).
pub fn distance_table_applies<B: Backend>() -> bool {
    #[cfg(feature = "ndarray")]
    return applies::<B>() || applies_autodiff::<B>();
    #[cfg(not(feature = "ndarray"))]
    false
}

/// A bias that depends on the distance alone, looked up from a per-head table:
/// `out[0, h, r, c] = table[h, |rows[r] - cols[c]|]` for `table` `[heads, n]` and the positions
/// `rows` of the query rows and `cols` of the key columns: `[1, heads, rows, keys]`. One pass on
/// ndarray, where building it from tensor ops would take one pass per op over every (row, key)
/// pair, with a transcendental function in one of them. Under autodiff (training) it is one
/// graph node whose parent is the table: its backward pass sums the bias's gradient per head
/// and distance, so the gradients of whatever the table was computed from (Kerple's `p` and
/// `a`) flow through the table's own `[heads, n]` ops. `None` elsewhere, or when a distance
/// reaches past the table: the caller builds the bias from tensor ops.
pub fn distance_table_bias<B: Backend>(
    table: Tensor<B, 2>,
    rows: &[i64],
    cols: &[i64],
) -> Option<Tensor<B, 4>> {
    lookup(table, rows, cols, false)
}

/// [`distance_table_bias`] where a key after the query looks up distance 0 instead of its
/// mirror: `out[0, h, r, c] = table[h, max(rows[r] − cols[c], 0)]`. T5's causal buckets are
/// such a bias (every key ahead of the query falls in bucket 0), and DAPE V2 over T5 reads the
/// column one key ahead.
pub fn past_distance_table_bias<B: Backend>(
    table: Tensor<B, 2>,
    rows: &[i64],
    cols: &[i64],
) -> Option<Tensor<B, 4>> {
    lookup(table, rows, cols, true)
}

fn lookup<B: Backend>(
    table: Tensor<B, 2>,
    rows: &[i64],
    cols: &[i64],
    past_only: bool,
) -> Option<Tensor<B, 4>> {
    #[cfg(feature = "ndarray")]
    if table.dtype() == burn::tensor::DType::F32 {
        if applies::<B>() {
            return distance_table_nd(table, rows, cols, past_only);
        }
        if applies_autodiff::<B>() {
            return distance_table_autodiff(table, rows, cols, past_only);
        }
    }
    #[cfg(not(feature = "ndarray"))]
    let _ = (table, rows, cols, past_only);
    None
}
