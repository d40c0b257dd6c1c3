//! The backward pass of DAPE V2's kernel, [`dape_v2_backward`]: the hidden channels are
//! recomputed row by row, not stored. Each `1 × k` convolution of a query row (every batch
//! element at once) is one matrix product over `k` key-shifted copies of its input
//! (`[out, in · k] · [in · k, columns]`), and its adjoint sums the shifted gradients back
//! ([`unshift_add`]).

use super::backward::{backward_by_rows, BackwardInputs, BackwardRow, WeightGrads, ZGrad};
use super::rows::{batch_rows, bias_plane};
use super::v1_backward::{leaky_relu_grad_simd, leaky_relu_simd};
use super::v2::KeyConvs;
use crate::encoding::Span;
use crate::kernel::{gemm, lane_sum, Mat};

/// Gradients of [`dape_v2`] for the output gradient `grad: [batch, H, rows, keys]`.
///
/// [`dape_v2`]: super::dape_v2
#[derive(Debug)]
pub(crate) struct V2Grads {
    /// `[batch, H, rows, keys]`.
    pub logits: Vec<f32>,
    /// The bias map's shape (`[1, ..]` summed over the batch); `None` without a bias.
    pub bias: Option<Vec<f32>>,
    /// `[D, C, 1, k]`, `Conv2d`'s layout.
    pub w1: Vec<f32>,
    /// `[D]`.
    pub b1: Vec<f32>,
    /// `[H, D, 1, k]`.
    pub w2: Vec<f32>,
    /// `[H]`.
    pub b2: Vec<f32>,
}

/// The backward pass of [`dape_v2`] (the hidden channels are recomputed, not stored): each
/// query row, every batch element at once, as matrix products over the row's
/// `(batch element, key)` columns, each `1 × k` convolution being one product over its `k`
/// key-shifted copies of the input (`[out, in · k] · [in · k, columns]`).
///
/// The output gradient `grad` is given, or formed from the output by the tile's softmax
/// backward.
///
/// [`dape_v2`]: super::dape_v2
pub(crate) fn dape_v2_backward(
    logits: &[f32],
    bias: Option<&[f32]>,
    grad: ZGrad,
    dims: [usize; 4],
    span: &Span,
    convs: &KeyConvs,
) -> V2Grads {
    let [c, d, h, k] = convs.dims;
    let mut d_logits = vec![0.0f32; logits.len()];
    let mut d_bias = bias.map(|m| vec![0.0f32; m.len()]);
    let sums = backward_by_rows(
        BackwardInputs {
            logits,
            bias,
            grad,
            dims,
            span,
        },
        (&mut d_logits, d_bias.as_deref_mut()),
        || WeightGrads::zeros([d * c * k, d, h * d * k, h]),
        |rows, da, db, cols: &mut ConvColumns, acc| v2_backward_row(convs, rows, da, db, cols, acc),
    );
    V2Grads {
        logits: d_logits,
        bias: d_bias,
        w1: sums.w1,
        b1: sums.b1,
        w2: sums.w2,
        b2: sums.b2,
    }
}

/// A task's working memory for one query row of [`dape_v2_backward`], row-major
/// `[channels, columns]`: `N_h = batch × hidden keys` columns for the first convolution's
/// outputs, `N = batch × visible keys` for the second's.
#[derive(Default)]
struct ConvColumns {
    /// The inputs' `k` key-shifted copies, `[C · k, N_h]`.
    x: Vec<f32>,
    /// Pre-activations, `[D, N_h]`.
    z: Vec<f32>,
    /// Hidden values, `[D, N_h]`.
    hidden: Vec<f32>,
    /// The hidden values' `k` key-shifted copies, `[D · k, N]`.
    hx: Vec<f32>,
    /// The output gradient, `[H, N]`.
    g: Vec<f32>,
    /// `f`'s output, `[H, N]` (only where the gradient is formed from it).
    out: Vec<f32>,
    /// The gradient at the hidden copies, `[D · k, N]`.
    dhx: Vec<f32>,
    /// The gradient at the pre-activations, `[D, N_h]`.
    delta: Vec<f32>,
    /// The gradient at the input copies, `[C · k, N_h]`.
    dx: Vec<f32>,
}

/// `dst[j] = src[j + t - half]` where that index lies in `src`, 0 elsewhere: one key-shifted
/// copy of a zero-padded row.
fn shifted(dst: &mut [f32], src: &[f32], t: usize, half: usize) {
    dst.fill(0.0);
    let from = half.saturating_sub(t);
    let to = dst.len().min((src.len() + half).saturating_sub(t));
    if from < to {
        dst[from..to].copy_from_slice(&src[from + t - half..to + t - half]);
    }
}

/// The adjoint of [`shifted`] summed over the `k` shifts: `dst[p] += Σ_t cols_t[p - t + half]`,
/// `cols_t` being the `t`-th row of `cols` (length `cols_t.len()`), where that index lies in it.
fn unshift_add(dst: &mut [f32], cols: &[&[f32]], half: usize) {
    for (t, col) in cols.iter().enumerate() {
        // p = j + t - half for j in 0..col.len().
        let from = half.saturating_sub(t);
        let to = col.len().min((dst.len() + half).saturating_sub(t));
        if from < to {
            let out = &mut dst[from + t - half..to + t - half];
            for (o, &v) in out.iter_mut().zip(&col[from..to]) {
                *o += v;
            }
        }
    }
}

/// One query row of [`dape_v2_backward`], every batch element at once: writes `d logits` into
/// `da`, adds `d bias` into `db` (each batch element's into its map's rows) and the weight
/// gradients into `acc`.
fn v2_backward_row(
    convs: &KeyConvs,
    rows: &mut BackwardRow,
    da: &mut [&mut [f32]],
    db: &mut [&mut [f32]],
    cols: &mut ConvColumns,
    acc: &mut WeightGrads,
) {
    use std::borrow::Cow::Borrowed;
    let [c, d, h, k] = convs.dims;
    let half = k / 2;
    let b = rows.a.len() / h.max(1);
    let vis = rows.visible;
    let lk = rows.a.first().map_or(0, |r| r.len());
    // The hidden keys that the second convolution reads for the visible ones (as `v2_row`).
    let hk = if convs.mask_future_hidden {
        vis
    } else {
        (vis + half).min(lk)
    };
    let (nh, n) = (b * hk, b * vis);
    let n_bias = db.len();
    if n > 0 {
        let ConvColumns {
            x,
            z,
            hidden,
            hx,
            g,
            out,
            dhx,
            delta,
            dx,
        } = cols;
        for (buf, len) in [
            (&mut *x, c * k * nh),
            (z, d * nh),
            (hidden, d * nh),
            (hx, d * k * n),
            (g, h * n),
            (dhx, d * k * n),
            (delta, d * nh),
            (dx, c * k * nh),
        ] {
            buf.resize(len, 0.0);
        }
        fn mat(v: &[f32], r: usize, n: usize) -> Mat<'_> {
            Mat::row_major(std::borrow::Cow::Borrowed(&v[..r * n]), r, n)
        }
        // The input channels of batch element `bi` at the visible keys (future keys are zero).
        let input = |ch: usize, bi: usize| -> &[f32] {
            if ch < h {
                &rows.a[bi * h + ch][..vis]
            } else {
                &batch_rows(rows.bias, h, bi)[ch - h][..vis]
            }
        };
        for ch in 0..c {
            for t in 0..k {
                for bi in 0..b {
                    shifted(
                        &mut x[(ch * k + t) * nh + bi * hk..][..hk],
                        input(ch, bi),
                        t,
                        half,
                    );
                }
            }
        }
        // z = W1 x + b1; hidden = LeakyReLU(z).
        for (row, &bias) in z.chunks_exact_mut(nh).zip(&convs.b1) {
            row.fill(bias);
        }
        let w1 = Mat::row_major(Borrowed(&convs.w1), d, c * k);
        gemm(&w1, &mat(x, c * k, nh), 1.0, z);
        leaky_relu_simd(hidden, z, convs.slope);
        for dd in 0..d {
            for t in 0..k {
                for bi in 0..b {
                    let src = &hidden[dd * nh + bi * hk..][..hk];
                    shifted(&mut hx[(dd * k + t) * n + bi * vis..][..vis], src, t, half);
                }
            }
        }
        let w2 = Mat::row_major(Borrowed(&convs.w2), h, d * k);
        if rows.needs_output() {
            // f's output W2 hx + b2, for the tile's backward pass (it forms Z here).
            out.resize(h * n, 0.0);
            for (row, &bias) in out.chunks_exact_mut(n).zip(&convs.b2) {
                row.fill(bias);
            }
            gemm(&w2, &mat(hx, d * k, n), 1.0, out);
        }
        rows.grad_columns(out, da, g, h);
        // dW2 += g · hxᵀ, db2 += Σ g; d hx = W2ᵀ g.
        gemm(&mat(g, h, n), &mat(hx, d * k, n).t(), 1.0, &mut acc.w2);
        for (s, row) in acc.b2.iter_mut().zip(g.chunks_exact(n)) {
            *s += lane_sum(row);
        }
        gemm(&w2.t(), &mat(g, h, n), 0.0, dhx);
        // δ = (Σ over shifts of d hx) ⊙ LeakyReLU'(z).
        delta.fill(0.0);
        for dd in 0..d {
            for bi in 0..b {
                let shifts: Vec<&[f32]> = (0..k)
                    .map(|t| &dhx[(dd * k + t) * n + bi * vis..][..vis])
                    .collect();
                unshift_add(&mut delta[dd * nh + bi * hk..][..hk], &shifts, half);
            }
        }
        leaky_relu_grad_simd(delta, z, convs.slope);
        // dW1 += δ · xᵀ, db1 += Σ δ; d x = W1ᵀ δ.
        gemm(&mat(delta, d, nh), &mat(x, c * k, nh).t(), 1.0, &mut acc.w1);
        for (s, row) in acc.b1.iter_mut().zip(delta.chunks_exact(nh)) {
            *s += lane_sum(row);
        }
        gemm(&w1.t(), &mat(delta, d, nh), 0.0, dx);
        // The inputs' gradients at the visible keys: the identity paths' g plus the sum over
        // shifts of d x.
        let shifts = |ch: usize, bi: usize| -> Vec<&[f32]> {
            (0..k)
                .map(|t| &dx[(ch * k + t) * nh + bi * hk..][..hk])
                .collect()
        };
        for bi in 0..b {
            for hh in 0..h {
                let plane = bi * h + hh;
                let gv = &g[hh * n + bi * vis..][..vis];
                let out = &mut da[plane][..vis];
                out.copy_from_slice(gv);
                unshift_add(out, &shifts(hh, bi), half);
                if let Some(db) = db.get_mut(bias_plane(plane, h, n_bias)) {
                    let out = &mut db[..vis];
                    for (o, &gv) in out.iter_mut().zip(gv) {
                        *o += gv;
                    }
                    unshift_add(out, &shifts(h + hh, bi), half);
                }
            }
        }
    }
    rows.future_key_grads(da, db, h);
}
