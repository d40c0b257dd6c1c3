//! The bias's half of DAPE V1's first layer by distance, [`DistanceHalf`], for a base bias that
//! depends on the distance alone (ALiBi, Kerple, T5, Sandwich).
//!
//! DAPE V1's first layer over a pair is `b1 + W1[:, ..H] · S_ij + W1[:, H..] · B_ij`. When
//! `B_ij = t(i − j)`, the second term depends on the distance alone, so it is formed once per
//! distance, `pre[k][n − 1 − δ] = b1[k] + Σ_h W1[k, H + h] · t_h(δ)` (`n` distances, `D` hidden
//! units), instead of once per pair: `D · H` multiply-adds per pair fewer (a third of `f`'s
//! forward pass at `D = 32`, `H = 8`). The table runs backwards in `δ`, so the keys of one row
//! (`δ = p − j` at position `p`) read it forwards, one block of lanes at a time.
//!
//! Each entry is summed in the order of the shared-map path ([`super::v1`]'s `bias_half`: `b1`,
//! then the heads in order, with the same multiply-add), so both paths give the same bits.
//!
//! The bias itself is read from the same table (`t` backwards, beside `pre`), so evaluation
//! builds no `[H, rows, keys]` bias map at all. The table holds `D + H` floats per distance, so
//! one row sweeping its keys would stream them all through the caches; [`dape_v1_by_distance`]
//! therefore takes [`GROUP`] neighbouring query rows together, block of keys by block of keys:
//! their windows into the table are one column apart, so the rows after the first read it from
//! L1.

use rayon::prelude::*;

use super::rows::{rows_by_query, visible_keys};
use super::simd::{simd_entry, LANES};
use super::v1::{dense, gather, logits_half_over, second_layer_into, Mlp, Scratch};
use crate::encoding::Span;

/// Query rows that [`dape_v1_by_distance`] runs together.
const GROUP: usize = 16;

/// `b1 + W1[:, H..] · t(δ)` and `t(δ)` for the distances `δ = 0 .. n`, `[D][n + LANES]` and
/// `[H][n + LANES]` (backwards in `δ`; the last `LANES` columns are zero, read by the lanes past
/// a row's last visible key).
#[derive(Clone, Debug)]
pub(crate) struct DistanceHalf {
    /// Distances covered, `n`.
    n: usize,
    /// Columns per hidden unit or head, `n + LANES`.
    stride: usize,
    /// `[D][stride]`.
    pre: Vec<f32>,
    /// The bias, `[H][stride]`.
    bias: Vec<f32>,
}

impl DistanceHalf {
    /// From the bias by distance `far: [H, n]`, backwards (column `m` holds `t(n − 1 − m)`: the
    /// row of a bias map for one query at position `n − 1` over the keys at `0 .. n`). `None`
    /// when `mlp` takes no bias (`C ≠ 2H`) or `far` is not `H` rows of `n`.
    pub(crate) fn new(mlp: &Mlp, far: &[f32], n: usize) -> Option<Self> {
        let (c, d, h) = (mlp.c, mlp.d, mlp.h);
        if c != 2 * h || n == 0 || far.len() != h * n {
            return None;
        }
        let stride = n + LANES;
        let mut pre = vec![0.0f32; d * stride];
        let rows: Vec<&[f32]> = far.chunks_exact(n).collect();
        distance_half_simd(mlp, &rows, n, stride, &mut pre);
        let mut bias = vec![0.0f32; h * stride];
        for (dst, src) in bias.chunks_exact_mut(stride).zip(&rows) {
            dst[..n].copy_from_slice(src);
        }
        Some(Self {
            n,
            stride,
            pre,
            bias,
        })
    }

    /// Whether the table covers the rows of query positions `0 .. positions`.
    pub(crate) fn covers(&self, positions: usize) -> bool {
        positions <= self.n
    }
}

/// DAPE V1's `logits + t(i − j) + f([logits ‖ t(i − j)])` in place at the keys each row sees,
/// with the bias and the first layer's bias half from `table`: `logits` `[batch, H, rows,
/// keys]` over a causal `span` with its rows and keys at their token indices (its rows'
/// positions below the table's `n`). The keys after a row's own token keep their logits (the
/// attention tile masks them). Runs [`GROUP`] query rows a task.
pub(super) fn dape_v1_by_distance(
    logits: &mut [f32],
    [b, h, lq, lk]: [usize; 4],
    span: &Span,
    mlp: &Mlp,
    table: &DistanceHalf,
) {
    debug_assert!(span.causal && table.covers(span.query_start + lq));
    debug_assert_eq!(logits.len(), b * h * lq * lk);
    rows_by_query(logits, lq, lk)
        .into_par_iter()
        .enumerate()
        .chunks(GROUP)
        .for_each_init(
            || Scratch::new(mlp),
            |s, mut group| {
                // Head `hh`'s bias for row `i`, from key 0 on: the table from the row's column.
                let bases: Vec<usize> = group
                    .iter()
                    .map(|(i, _)| table.n - 1 - (span.query_start + i))
                    .collect();
                let biases: Vec<Vec<&[f32]>> = bases
                    .iter()
                    .map(|base| {
                        (0..h)
                            .map(|hh| &table.bias[hh * table.stride + base..])
                            .collect()
                    })
                    .collect();
                for bi in 0..b {
                    let mut rows: Vec<GroupRow> = group
                        .iter_mut()
                        .zip(&biases)
                        .zip(&bases)
                        .map(|(((i, planes), bias), &base)| GroupRow {
                            heads: &mut planes[bi * h..(bi + 1) * h],
                            bias,
                            visible: visible_keys(span, *i, lk),
                            base,
                        })
                        .collect();
                    group_simd(mlp, &mut rows, table, s);
                }
            },
        );
}

/// One query row of one batch element in a group: its heads' logits (updated in place), its
/// heads' bias from key 0 on, the keys it sees, and its first column in the table.
struct GroupRow<'r, 'a> {
    heads: &'r mut [&'a mut [f32]],
    bias: &'r [&'r [f32]],
    visible: usize,
    base: usize,
}

simd_entry! {
    /// [`group_rows`] for this CPU.
    fn group_simd = group_rows(
        mlp: &Mlp,
        rows: &mut [GroupRow<'_, '_>],
        table: &DistanceHalf,
        s: &mut Scratch,
    )
}

/// The rows of one group, block of keys by block of keys (the rows inner, so that their
/// neighbouring windows into the table stay in L1): the first layer from the table plus the
/// logits' half, LeakyReLU, the second layer, and `logits + bias + f` at the visible keys.
#[inline(always)]
fn group_rows<const FMA: bool>(
    mlp: &Mlp,
    rows: &mut [GroupRow<'_, '_>],
    table: &DistanceHalf,
    s: &mut Scratch,
) {
    let h = mlp.h;
    let widest = rows.iter().map(|r| r.visible).max().unwrap_or(0);
    for j0 in (0..widest).step_by(LANES) {
        for row in rows.iter_mut().filter(|r| r.visible > j0) {
            let n = LANES.min(row.visible - j0);
            gather(&mut s.x[..h], row.heads.iter().map(|r| &r[..]), j0, n);
            let at = row.base + j0;
            logits_half_over::<FMA>(mlp, s, |k| {
                let start = k * table.stride + at;
                <[f32; LANES]>::try_from(&table.pre[start..start + LANES])
                    .expect("a block of lanes")
            });
            second_layer_into::<FMA>(mlp, row.heads, row.bias, j0, n, s);
        }
    }
}

simd_entry! {
    /// [`distance_half`] for this CPU.
    fn distance_half_simd = distance_half(
        mlp: &Mlp,
        far: &[&[f32]],
        n: usize,
        stride: usize,
        pre: &mut [f32],
    )
}

/// Fills `pre` (`[D][stride]`) with `b1 + W1[:, H..] · far[.., m]` for the columns `m < n`,
/// [`LANES`] columns at a time.
#[inline(always)]
fn distance_half<const FMA: bool>(
    mlp: &Mlp,
    far: &[&[f32]],
    n: usize,
    stride: usize,
    pre: &mut [f32],
) {
    let (c, d, h) = (mlp.c, mlp.d, mlp.h);
    let mut s = Scratch::new(mlp);
    let mut block = vec![[0.0f32; LANES]; d];
    for m0 in (0..n).step_by(LANES) {
        let lanes = LANES.min(n - m0);
        gather(&mut s.x[h..], far.iter(), m0, lanes);
        dense::<FMA>(&mut block, &mlp.w1[h..], c, &s.x[h..], |k| {
            [mlp.b1[k]; LANES]
        });
        for (k, values) in block.iter().enumerate() {
            pre[k * stride + m0..][..lanes].copy_from_slice(&values[..lanes]);
        }
    }
}
