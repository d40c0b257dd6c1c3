//! The backward pass's frame, shared by DAPE V1 and V2: the saved inputs
//! ([`BackwardInputs`]), one task per fixed group of query rows in parallel, each row handed
//! to the version's row function as a [`BackwardRow`], and the weight gradients
//! ([`WeightGrads`]) summed per group and then over the groups in order, so that a seed gives
//! the same gradients however rayon schedules the groups. The gradient of `Z` is given (a
//! DAPE node's) or formed row by row from `Z` by the tile's softmax backward ([`ZGrad`]).

use rayon::prelude::*;

use super::rows::{batch_rows, bias_plane, bias_rows, rows_by_query, visible_keys};
use super::softmax_rows::{SoftmaxInputs, SoftmaxRow};
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
/// Where a backward pass's output gradient (the gradient of `Z`) comes from.
pub(crate) enum ZGrad<'a> {
    /// Given, `[batch, H, rows, keys]`: a DAPE node's backward pass.
    Given(&'a [f32]),
    /// The attention tile's softmax backward, formed row by row from `Z` inside `f`'s backward
    /// rows (`softmax_rows.rs`). It writes the probabilities into `probs` (`[batch, H, rows,
    /// keys]`) and, with row factors, each row's `Σ_j Z_j dZ'_j` into `dc` (`[batch · H,
    /// rows]`; empty without factors).
    Softmax {
        inputs: &'a SoftmaxInputs<'a>,
        probs: &'a mut [f32],
        dc: &'a mut [f32],
    },
}

/// What a fused DAPE backward pass reads: its inputs and the output gradient, all row-major,
/// with the logits' dims and the span.
pub(super) struct BackwardInputs<'a> {
    pub(super) logits: &'a [f32],
    /// `[1 or batch, H, rows, keys]`.
    pub(super) bias: Option<&'a [f32]>,
    pub(super) grad: ZGrad<'a>,
    pub(super) dims: [usize; 4],
    pub(super) span: &'a Span,
}

/// Runs `row(rows, d logits rows, d bias rows, scratch, sums)` for every query row of a fused
/// DAPE backward pass, in parallel over fixed groups of rows, writing the input gradients into
/// `d_logits` (`[batch, H, rows, keys]`) and `d_bias` (the bias map's shape), and returns the
/// weight gradients summed over the groups in order.
pub(super) fn backward_by_rows<S: Default>(
    inputs: BackwardInputs,
    (d_logits, d_bias): (&mut [f32], Option<&mut [f32]>),
    zero: impl Fn() -> WeightGrads + Sync,
    row: impl Fn(&mut BackwardRow, &mut [&mut [f32]], &mut [&mut [f32]], &mut S, &mut WeightGrads)
        + Sync,
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
    let (given, softmax_rows): (&[f32], Vec<Option<SoftmaxRow>>) = match grad {
        ZGrad::Given(g) => (g, (0..lq).map(|_| None).collect()),
        ZGrad::Softmax { inputs, probs, dc } => {
            let rows = rows_by_query(probs, lq, lk)
                .into_iter()
                .zip(rows_by_query(dc, lq, 1))
                .enumerate()
                .map(|(row, (probs, dc))| {
                    Some(SoftmaxRow {
                        inputs,
                        row,
                        probs,
                        dc,
                    })
                })
                .collect();
            (&[], rows)
        }
    };
    // Weight gradients are summed per fixed group of rows and then over the groups in order,
    // so that the result does not depend on how rayon schedules the groups: training stays
    // deterministic for a seed.
    let mut groups: Vec<Vec<BackwardTask>> = Vec::with_capacity(lq.div_ceil(ROWS_PER_GROUP));
    let tasks = da_rows.into_iter().zip(db_rows).zip(softmax_rows);
    for (i, ((da, db), softmax)) in tasks.enumerate() {
        if i % ROWS_PER_GROUP == 0 {
            groups.push(Vec::with_capacity(ROWS_PER_GROUP));
        }
        if let Some(group) = groups.last_mut() {
            group.push((i, da, db, softmax));
        }
    }
    let partial: Vec<WeightGrads> = groups
        .into_par_iter()
        .map(|group| {
            let (mut scratch, mut acc) = (S::default(), zero());
            for (i, mut da, mut db, softmax) in group {
                let at = |p: usize| (p * lq + i) * lk..(p * lq + i + 1) * lk;
                let a: Vec<&[f32]> = (0..b * h).map(|p| &logits[at(p)]).collect();
                let grad = match softmax {
                    Some(softmax) => RowGrad::Softmax(softmax),
                    None => RowGrad::Given((0..b * h).map(|p| &given[at(p)]).collect()),
                };
                let mut rows = BackwardRow {
                    a: &a,
                    bias: &bias_rows(bias, i, lq, lk),
                    grad,
                    visible: visible_keys(span, i, lk),
                };
                row(&mut rows, &mut da, &mut db, &mut scratch, &mut acc);
            }
            acc
        })
        .collect();
    partial.into_iter().fold(zero(), WeightGrads::add)
}

/// Query rows whose weight gradients one task sums before the fixed-order sum over tasks.
const ROWS_PER_GROUP: usize = 8;

/// One query row of the backward pass: its index, its `d logits` rows (every batch element's
/// heads), its `d bias` rows and, in the tile, its share of the softmax backward.
type BackwardTask<'a> = (
    usize,
    Vec<&'a mut [f32]>,
    Vec<&'a mut [f32]>,
    Option<SoftmaxRow<'a>>,
);

/// One query row of the backward pass: what it reads, and where its output gradient comes
/// from.
pub(super) struct BackwardRow<'a> {
    /// The logits' rows, one per (batch element, head) plane in plane order.
    pub(super) a: &'a [&'a [f32]],
    /// The bias map's rows, one per plane of `[1 or batch, H]` (empty without a base bias).
    pub(super) bias: &'a [&'a [f32]],
    /// The output gradient's rows (like `a`), or the tile's softmax backward that forms them.
    pub(super) grad: RowGrad<'a>,
    /// Keys `0..visible` can be attended to.
    pub(super) visible: usize,
}

/// The gradient of one query row's `Z`: given, or formed from `Z` ([`ZGrad`]).
pub(super) enum RowGrad<'a> {
    Given(Vec<&'a [f32]>),
    Softmax(SoftmaxRow<'a>),
}

impl BackwardRow<'_> {
    /// Whether the row's gradient is formed from `Z`, so that [`Self::grad_columns`] needs
    /// `f`'s output at the row's visible keys.
    pub(super) fn needs_output(&self) -> bool {
        matches!(self.grad, RowGrad::Softmax(_))
    }

    /// The row's output gradient at its visible keys into `g` (`[H, batch · visible]`, column
    /// `bi · visible + j` for key `j` of batch element `bi`). Given: copied. Formed: `Z` (the
    /// logits, the bias and `out`, `f`'s output in `g`'s layout) is written into `da`, turned
    /// there into its gradient (0 at the keys the row cannot see), and copied.
    pub(super) fn grad_columns(
        &mut self,
        out: &[f32],
        da: &mut [&mut [f32]],
        g: &mut [f32],
        h: usize,
    ) {
        let vis = self.visible;
        let n = self.a.len() / h.max(1) * vis;
        let column = |plane: usize| (plane % h) * n + plane / h * vis;
        match &mut self.grad {
            RowGrad::Given(rows) => {
                for (plane, row) in rows.iter().enumerate() {
                    g[column(plane)..][..vis].copy_from_slice(&row[..vis]);
                }
            }
            RowGrad::Softmax(softmax) => {
                for (plane, z) in da.iter_mut().enumerate() {
                    let bias = batch_rows(self.bias, h, plane / h).get(plane % h);
                    let f = &out[column(plane)..][..vis];
                    let z = &mut z[..vis];
                    for ((z, &s), &f) in z.iter_mut().zip(&self.a[plane][..vis]).zip(f) {
                        *z = s + f;
                    }
                    if let Some(bias) = bias {
                        for (z, &bv) in z.iter_mut().zip(&bias[..vis]) {
                            *z += bv;
                        }
                    }
                }
                softmax.z_to_grad(da, vis);
                for (plane, row) in da.iter().enumerate() {
                    g[column(plane)..][..vis].copy_from_slice(&row[..vis]);
                }
            }
        }
    }

    /// The gradients at the keys a causal row cannot see (from `visible` on), where a fused
    /// DAPE node's output is `logits + bias`: a given `g` passes into `d logits` and is added
    /// into `d bias`; in the tile those keys are masked, so their gradients are 0 (already
    /// written by [`Self::grad_columns`]).
    pub(super) fn future_key_grads(&self, da: &mut [&mut [f32]], db: &mut [&mut [f32]], h: usize) {
        let RowGrad::Given(rows) = &self.grad else {
            return;
        };
        let (vis, n_bias) = (self.visible, db.len());
        for (plane, da) in da.iter_mut().enumerate() {
            let g = &rows[plane][vis..];
            da[vis..].copy_from_slice(g);
            if let Some(db) = db.get_mut(bias_plane(plane, h, n_bias)) {
                for (o, &gv) in db[vis..].iter_mut().zip(g) {
                    *o += gv;
                }
            }
        }
    }
}
