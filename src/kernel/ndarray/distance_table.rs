//! A bias looked up by distance from a per-head table: `out[0, h, r, c] = table[h, |rows[r] −
//! cols[c]|]`, `[1, heads, rows, keys]` (with `past_only`, keys after the query look up
//! distance 0); under autodiff the backward pass sums the bias's gradient per head and distance
//! into the table's `[heads, n]` gradient.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::Backward;
use burn::backend::autodiff::ops::Ops;
use burn::prelude::*;
use burn::tensor::ops::FloatTensorOps;
use burn::tensor::TensorData;
use burn::tensor::TensorPrimitive;
use rayon::prelude::*;

use super::gemm::Mat;
use super::node::{backward_for_parents, finish_node};
use super::{f32_view, host, host_primitive, to_nd, Ad, Nd};
use crate::kernel::cast;

/// The table index of query position `p` and key position `c`: `|p − c|`, or 0 for a key after
/// the query when `past_only`.
#[inline(always)]
fn index(p: i64, c: i64, past_only: bool) -> usize {
    if past_only && c > p {
        0
    } else {
        (p - c).unsigned_abs() as usize
    }
}

/// [`crate::kernel::distance_table_bias`] on `NdArray<f32>`: one task per (head, row).
pub(in crate::kernel) fn distance_table_nd<B: Backend>(
    table: Tensor<B, 2>,
    rows: &[i64],
    cols: &[i64],
    past_only: bool,
) -> Option<Tensor<B, 4>> {
    let table: Tensor<Nd, 2> = cast(table)?;
    let [h, n] = table.dims();
    let device = table.device();
    let out = distance_lookup(&host(table)?, h, n, rows, cols, past_only)?;
    cast(to_nd(out, [1, h, rows.len(), cols.len()], &device))
}

/// `[heads, rows, cols]` values `table[h, index(rows[r], cols[c])]` (one task per head and
/// row); `None` when a distance reaches past the table or `cols` is not sorted.
fn distance_lookup(
    values: &[f32],
    h: usize,
    n: usize,
    rows: &[i64],
    cols: &[i64],
    past_only: bool,
) -> Option<Vec<f32>> {
    let (lq, lk) = (rows.len(), cols.len());
    let (first, last) = (*cols.first()?, *cols.last()?);
    let reach = rows
        .iter()
        .map(|&p| (p - first).unsigned_abs().max((p - last).unsigned_abs()))
        .max()?;
    if reach as usize >= n || cols.windows(2).any(|w| w[0] > w[1]) || values.len() != h * n {
        return None;
    }
    let mut out = vec![0.0f32; h * lq * lk];
    out.par_chunks_mut(lk).enumerate().for_each(|(task, row)| {
        let (head, r) = (task / lq, task % lq);
        let tab = &values[head * n..(head + 1) * n];
        let p = rows[r];
        for (o, &c) in row.iter_mut().zip(cols) {
            *o = tab[index(p, c, past_only)];
        }
    });
    Some(out)
}

/// What a distance-table node keeps: the positions and the table's shape.
#[derive(Clone, Debug)]
struct DistanceTableState {
    rows: Arc<Vec<i64>>,
    cols: Arc<Vec<i64>>,
    heads: usize,
    n: usize,
    past_only: bool,
}

#[derive(Debug)]
struct DistanceTableBackward<const N: usize>;

fn distance_table_backward<const N: usize>(ops: Ops<DistanceTableState, N>, grads: &mut Gradients) {
    let grad = grads.consume::<Nd>(&ops.node);
    let Some(parent) = &ops.parents[0] else {
        return;
    };
    let s = &ops.state;
    let (lq, lk) = (s.rows.len(), s.cols.len());
    let g = Mat::of(f32_view(&grad).expect("the gradient of an f32 output is f32"));
    let g = g.row_major_values();
    // Per head: the gradient summed over the pairs at each distance.
    let mut dtable = vec![0.0f32; s.heads * s.n];
    dtable
        .par_chunks_mut(s.n.max(1))
        .enumerate()
        .for_each(|(head, acc)| {
            let block = &g[head * lq * lk..(head + 1) * lq * lk];
            for (row, &p) in block.chunks_exact(lk.max(1)).zip(s.rows.iter()) {
                for (&x, &c) in row.iter().zip(s.cols.iter()) {
                    acc[index(p, c, s.past_only)] += x;
                }
            }
        });
    let t = Nd::float_from_data(TensorData::new(dtable, [s.heads, s.n]), &Default::default());
    grads.register::<Nd>(parent.id, t);
}

backward_for_parents!(
    DistanceTableBackward,
    DistanceTableState,
    distance_table_backward,
    [1]
);

/// [`crate::kernel::distance_table_bias`] on `Autodiff<NdArray<f32>>`: one node over the table.
pub(in crate::kernel) fn distance_table_autodiff<B: Backend>(
    table: Tensor<B, 2>,
    rows: &[i64],
    cols: &[i64],
    past_only: bool,
) -> Option<Tensor<B, 4>> {
    let table: Tensor<Ad, 2> = cast(table)?;
    let [h, n] = table.dims();
    let device = table.device();
    let table = table.into_primitive().tensor();
    let values = host_primitive(table.primitive.clone())?;
    let out = distance_lookup(&values, h, n, rows, cols, past_only)?;
    let out = to_nd(out, [1, h, rows.len(), cols.len()], &device)
        .into_primitive()
        .tensor();
    let state = DistanceTableState {
        rows: Arc::new(rows.to_vec()),
        cols: Arc::new(cols.to_vec()),
        heads: h,
        n,
        past_only,
    };
    let out = finish_node(
        DistanceTableBackward::<1>
            .prepare::<NoCheckpointing>([table.node])
            .compute_bound()
            .stateful(),
        state,
        out,
    );
    cast(Tensor::<Ad, 4>::from_primitive(TensorPrimitive::Float(out)))
}
