//! The backward pass of DAPE V1's kernel, [`dape_v1_backward`]: the hidden layer is recomputed
//! row by row, not stored. Each query row (every batch element at once) is five matrix products
//! over its `N = batch × visible keys` pairs through `gemm`:
//!
//! `z = W1 x + b1`, `hidden = LeakyReLU(z)`; `dW2 += g · hiddenᵀ`, `db2 += Σ g`;
//! `δ = (W2ᵀ g) ⊙ LeakyReLU'(z)`; `dW1 += δ · xᵀ`, `db1 += Σ δ`; `dx = W1ᵀ δ`, and the identity
//! paths add `g` to the logits' and the bias's gradients.

use super::backward::{
    backward_by_rows, future_key_grads, BackwardInputs, BackwardRow, WeightGrads,
};
use super::rows::{batch_rows, bias_plane};
use super::v1::{transpose, Mlp};
use crate::encoding::Span;
use crate::kernel::{gemm, lane_sum, Mat};

/// Gradients of [`dape_v1`] for the output gradient `grad: [batch, H, rows, keys]`.
///
/// [`dape_v1`]: super::dape_v1
#[derive(Debug)]
pub(crate) struct V1Grads {
    /// `[batch, H, rows, keys]`.
    pub logits: Vec<f32>,
    /// The bias map's shape: `[1, H, rows, keys]` (summed over the batch) for a shared map,
    /// `[batch, H, rows, keys]` for one per sequence; `None` without a bias.
    pub bias: Option<Vec<f32>>,
    /// `[C, D]`, Burn's `Linear` layout.
    pub w1t: Vec<f32>,
    /// `[D]`.
    pub b1: Vec<f32>,
    /// `[D, H]`, Burn's `Linear` layout.
    pub w2t: Vec<f32>,
    /// `[H]`.
    pub b2: Vec<f32>,
}

/// The backward pass of [`dape_v1`] (the hidden layer is recomputed, not stored).
///
/// [`dape_v1`]: super::dape_v1
pub(crate) fn dape_v1_backward(
    logits: &[f32],
    bias: Option<&[f32]>,
    grad: &[f32],
    [b, h, lq, lk]: [usize; 4],
    span: &Span,
    mlp: &Mlp,
) -> V1Grads {
    let mut d_logits = vec![0.0f32; b * h * lq * lk];
    let mut d_bias = bias.map(|m| vec![0.0f32; m.len()]);
    let sums = backward_by_rows(
        BackwardInputs {
            logits,
            bias,
            grad,
            dims: [b, h, lq, lk],
            span,
        },
        (&mut d_logits, d_bias.as_deref_mut()),
        || WeightGrads::new(mlp),
        |rows, da, db, cols: &mut Columns, acc| backward_row(mlp, rows, da, db, cols, acc),
    );
    V1Grads {
        logits: d_logits,
        bias: d_bias,
        w1t: transpose(&sums.w1, mlp.d, mlp.c),
        b1: sums.b1,
        w2t: transpose(&sums.w2, mlp.h, mlp.d),
        b2: sums.b2,
    }
}

/// A task's working memory for one query row: one column per (batch element, visible key) pair,
/// channel-major (`[channels, pairs]`, row-major), so that gathering a row of keys is one copy.
#[derive(Default)]
struct Columns {
    /// The MLP's inputs, `[C, N]`.
    x: Vec<f32>,
    /// The output gradient, `[H, N]`.
    g: Vec<f32>,
    /// Pre-activations, `[D, N]`.
    z: Vec<f32>,
    /// Hidden values after LeakyReLU, `[D, N]`.
    hidden: Vec<f32>,
    /// The gradient at the pre-activations, `[D, N]`.
    delta: Vec<f32>,
    /// The gradient at the inputs, `[C, N]`.
    dx: Vec<f32>,
}

/// One query row of the backward pass, every batch element at once, as five matrix products
/// over the row's `N = batch × visible` pairs (DAPE's layers are far too narrow for a per-pair
/// loop to keep its weight-gradient sums in registers; as products they are `[D, N] · [N, C]`):
/// writes `d logits` into `da`, adds `d bias` into `db` (each batch element's into its map's
/// rows: summed over the batch for a shared map) and the weight gradients into `acc`.
fn backward_row(
    mlp: &Mlp,
    rows: &BackwardRow,
    da: &mut [&mut [f32]],
    db: &mut [&mut [f32]],
    cols: &mut Columns,
    acc: &mut WeightGrads,
) {
    use std::borrow::Cow::Borrowed;
    let (c, d, h) = (mlp.c, mlp.d, mlp.h);
    let b = rows.a.len() / h.max(1);
    let vis = rows.visible;
    let n = b * vis;
    if n > 0 {
        let Columns {
            x,
            g,
            z,
            hidden,
            delta,
            dx,
        } = cols;
        for (buf, channels) in [
            (&mut *x, c),
            (g, h),
            (z, d),
            (hidden, d),
            (delta, d),
            (dx, c),
        ] {
            buf.resize(channels * n, 0.0);
        }
        // Column `bi · vis + j` is key `j` of batch element `bi`.
        for bi in 0..b {
            let bias = batch_rows(rows.bias, h, bi);
            for hh in 0..h {
                let (plane, at) = (bi * h + hh, hh * n + bi * vis);
                x[at..at + vis].copy_from_slice(&rows.a[plane][..vis]);
                g[at..at + vis].copy_from_slice(&rows.g[plane][..vis]);
                if let Some(bias) = bias.get(hh) {
                    x[(h + hh) * n + bi * vis..][..vis].copy_from_slice(&bias[..vis]);
                }
            }
        }
        fn mat(v: &[f32], r: usize, n: usize) -> Mat<'_> {
            Mat::row_major(std::borrow::Cow::Borrowed(&v[..r * n]), r, n)
        }
        // z = W1 x + b1; hidden = LeakyReLU(z).
        for (row, &bias) in z.chunks_exact_mut(n).zip(&mlp.b1) {
            row.fill(bias);
        }
        let w1 = Mat::row_major(Borrowed(&mlp.w1), d, c);
        gemm(&w1, &mat(x, c, n), 1.0, z);
        for (hd, &zv) in hidden.iter_mut().zip(z.iter()) {
            *hd = if zv >= 0.0 { zv } else { zv * mlp.slope };
        }
        // dW2 += g · hiddenᵀ, db2 += Σ g.
        gemm(&mat(g, h, n), &mat(hidden, d, n).t(), 1.0, &mut acc.w2);
        for (s, row) in acc.b2.iter_mut().zip(g.chunks_exact(n)) {
            *s += lane_sum(row);
        }
        // δ = (W2ᵀ g) ⊙ LeakyReLU'(z).
        gemm(
            &Mat::row_major(Borrowed(&mlp.w2t), d, h),
            &mat(g, h, n),
            0.0,
            delta,
        );
        for (dl, &zv) in delta.iter_mut().zip(z.iter()) {
            if zv < 0.0 {
                *dl *= mlp.slope;
            }
        }
        // dW1 += δ · xᵀ, db1 += Σ δ.
        gemm(&mat(delta, d, n), &mat(x, c, n).t(), 1.0, &mut acc.w1);
        for (s, row) in acc.b1.iter_mut().zip(delta.chunks_exact(n)) {
            *s += lane_sum(row);
        }
        // dx = W1ᵀ δ: the logits' and the bias's halves; the identity paths add g.
        let w1t = Mat::row_major(Borrowed(&mlp.w1t), c, d);
        gemm(&w1t, &mat(delta, d, n), 0.0, dx);
        for bi in 0..b {
            for hh in 0..h {
                let (at, gv) = (hh * n + bi * vis, &g[hh * n + bi * vis..][..vis]);
                for ((o, &gl), &dl) in da[bi * h + hh][..vis].iter_mut().zip(gv).zip(&dx[at..]) {
                    *o = gl + dl;
                }
                let n_bias = db.len();
                if let Some(db) = db.get_mut(bias_plane(bi * h + hh, h, n_bias)) {
                    let dxb = &dx[(h + hh) * n + bi * vis..][..vis];
                    for ((o, &gl), &dl) in db[..vis].iter_mut().zip(gv).zip(dxb) {
                        *o += gl + dl;
                    }
                }
            }
        }
    }
    future_key_grads(rows, da, db, h);
}
