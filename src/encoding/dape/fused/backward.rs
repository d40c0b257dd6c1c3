//! The backward pass's frame, shared by DAPE V1 and V2: the saved inputs
//! ([`BackwardInputs`]), one task per fixed group of query rows in parallel, each row handed
//! to the version's row function as a [`BackwardRow`], and the weight gradients
//! ([`WeightGrads`]) summed per group and then over the groups in order, so that a seed gives
//! the same gradients however rayon schedules the groups. Keys a causal row cannot see pass
//! the output gradient straight through ([`future_key_grads`]).

use rayon::prelude::*;

use super::rows::{bias_plane, bias_rows, rows_by_query, visible_keys};
use super::v1::Mlp;
use crate::encoding::Span;

/// One task's weight-gradient sums, in the kernels' layouts.
pub(super) struct WeightGrads {
    /// `[D, C]`.
    pub(super) w1: Vec<f32>,
    /// `[D]`.
    pub(super) b1: Vec<f32>,
    /// `[H, D]`.
    pub(super) w2: Vec<f32>,
    /// `[H]`.
    pub(super) b2: Vec<f32>,
}

impl WeightGrads {
    pub(super) fn new(mlp: &Mlp) -> Self {
        Self::zeros([mlp.d * mlp.c, mlp.d, mlp.h * mlp.d, mlp.h])
    }

    /// Zero sums of `[w1, b1, w2, b2]` values.
    pub(super) fn zeros([w1, b1, w2, b2]: [usize; 4]) -> Self {
        Self {
            w1: vec![0.0; w1],
            b1: vec![0.0; b1],
            w2: vec![0.0; w2],
            b2: vec![0.0; b2],
        }
    }

    pub(super) fn add(mut self, other: Self) -> Self {
        for (a, b) in [
            (&mut self.w1, &other.w1),
            (&mut self.b1, &other.b1),
            (&mut self.w2, &other.w2),
            (&mut self.b2, &other.b2),
        ] {
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
        }
        self
    }
}
/// What a fused DAPE node's backward pass reads: its inputs and the output gradient, all
/// row-major, with the logits' dims and the span.
pub(super) struct BackwardInputs<'a> {
    pub(super) logits: &'a [f32],
    /// `[1 or batch, H, rows, keys]`.
    pub(super) bias: Option<&'a [f32]>,
    pub(super) grad: &'a [f32],
    pub(super) dims: [usize; 4],
    pub(super) span: &'a Span,
}

/// Runs `row(rows, d logits rows, d bias rows, scratch, sums)` for every query row of a fused
/// DAPE node's backward pass, in parallel over fixed groups of rows, writing the input
/// gradients into `d_logits` (`[batch, H, rows, keys]`) and `d_bias` (the bias map's shape), and
/// returns the weight gradients summed over the groups in order.
pub(super) fn backward_by_rows<S: Default>(
    inputs: BackwardInputs,
    (d_logits, d_bias): (&mut [f32], Option<&mut [f32]>),
    zero: impl Fn() -> WeightGrads + Sync,
    row: impl Fn(&BackwardRow, &mut [&mut [f32]], &mut [&mut [f32]], &mut S, &mut WeightGrads) + Sync,
) -> WeightGrads {
    let BackwardInputs {
        logits,
        bias,
        grad,
        dims: [b, h, lq, lk],
        span,
    } = inputs;
    let da_rows = rows_by_query(d_logits, lq, lk);
    let db_rows: Vec<Vec<&mut [f32]>> = match d_bias {
        Some(db) => rows_by_query(db, lq, lk),
        None => (0..lq).map(|_| Vec::new()).collect(),
    };
    // Weight gradients are summed per fixed group of rows and then over the groups in order,
    // so that the result does not depend on how rayon schedules the groups: training stays
    // deterministic for a seed.
    let mut groups: Vec<Vec<BackwardTask>> = Vec::with_capacity(lq.div_ceil(ROWS_PER_GROUP));
    for (i, (da, db)) in da_rows.into_iter().zip(db_rows).enumerate() {
        if i % ROWS_PER_GROUP == 0 {
            groups.push(Vec::with_capacity(ROWS_PER_GROUP));
        }
        if let Some(group) = groups.last_mut() {
            group.push((i, da, db));
        }
    }
    let partial: Vec<WeightGrads> = groups
        .into_par_iter()
        .map(|group| {
            let (mut scratch, mut acc) = (S::default(), zero());
            for (i, mut da, mut db) in group {
                let at = |p: usize| (p * lq + i) * lk..(p * lq + i + 1) * lk;
                let a: Vec<&[f32]> = (0..b * h).map(|p| &logits[at(p)]).collect();
                let g: Vec<&[f32]> = (0..b * h).map(|p| &grad[at(p)]).collect();
                let rows = BackwardRow {
                    a: &a,
                    bias: &bias_rows(bias, i, lq, lk),
                    g: &g,
                    visible: visible_keys(span, i, lk),
                };
                row(&rows, &mut da, &mut db, &mut scratch, &mut acc);
            }
            acc
        })
        .collect();
    partial.into_iter().fold(zero(), WeightGrads::add)
}

/// Query rows whose weight gradients one task sums before the fixed-order sum over tasks.
const ROWS_PER_GROUP: usize = 8;

/// One query row of the backward pass: its index, its `d logits` rows (every batch element's
/// heads) and its `d bias` rows.
type BackwardTask<'a> = (usize, Vec<&'a mut [f32]>, Vec<&'a mut [f32]>);

/// The read-only rows of one query row of the backward pass.
pub(super) struct BackwardRow<'a> {
    /// The logits' rows, one per (batch element, head) plane in plane order.
    pub(super) a: &'a [&'a [f32]],
    /// The bias map's rows, one per plane of `[1 or batch, H]` (empty without a base bias).
    pub(super) bias: &'a [&'a [f32]],
    /// The output gradient's rows, like `a`.
    pub(super) g: &'a [&'a [f32]],
    /// Keys `0..visible` can be attended to.
    pub(super) visible: usize,
}

/// The gradients at the keys a causal row cannot see (from `rows.visible` on), where a fused
/// DAPE node's output is `logits + bias`: `g` into `d logits`, added into `d bias`.
pub(super) fn future_key_grads(
    rows: &BackwardRow,
    da: &mut [&mut [f32]],
    db: &mut [&mut [f32]],
    h: usize,
) {
    let (vis, n_bias) = (rows.visible, db.len());
    for (plane, da) in da.iter_mut().enumerate() {
        let g = &rows.g[plane][vis..];
        da[vis..].copy_from_slice(g);
        if let Some(db) = db.get_mut(bias_plane(plane, h, n_bias)) {
            for (o, &gv) in db[vis..].iter_mut().zip(g) {
                *o += gv;
            }
        }
    }
}
