//! The backward pass of DAPE V1's kernel, [`dape_v1_backward`]: the hidden layer is recomputed
//! row by row, not stored. Each query row (every batch element at once) is five matrix products
//! over its `N = batch × visible keys` pairs through `gemm` (over a bias map shared by the
//! batch, the bias's halves over the visible keys once: see `backward_row`):
//!
//! `z = W1 x + b1`, `hidden = LeakyReLU(z)`; `dW2 += g · hiddenᵀ`, `db2 += Σ g`;
//! `δ = (W2ᵀ g) ⊙ LeakyReLU'(z)`; `dW1 += δ · xᵀ`, `db1 += Σ δ`; `dx = W1ᵀ δ`, and the identity
//! paths add `g` to the logits' and the bias's gradients.

use super::backward::{backward_by_rows, BackwardInputs, BackwardRow, WeightGrads, ZGrad};
use super::rows::{batch_rows, bias_plane};
use super::simd::simd_entry;
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

/// The backward pass of [`dape_v1`] (the hidden layer is recomputed, not stored), for the
/// output gradient `grad` (given, or formed from the output by the tile's softmax backward).
///
/// [`dape_v1`]: super::dape_v1
pub(crate) fn dape_v1_backward(
    logits: &[f32],
    bias: Option<&[f32]>,
    grad: ZGrad,
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
    /// The MLP's inputs, `[C, N]`; with a map shared by the batch only the logits' half,
    /// `[H, N]` (the bias's half is `bias`).
    x: Vec<f32>,
    /// The output gradient, `[H, N]`.
    g: Vec<f32>,
    /// `f`'s output, `[H, N]` (only where the gradient is formed from it).
    out: Vec<f32>,
    /// Pre-activations, `[D, N]`.
    z: Vec<f32>,
    /// Hidden values after LeakyReLU, `[D, N]`.
    hidden: Vec<f32>,
    /// The gradient at the pre-activations, `[D, N]`.
    delta: Vec<f32>,
    /// The gradient at the inputs, like `x`.
    dx: Vec<f32>,
    /// A map shared by the batch: its row `[H, vis]`, the bias's half of the first layer plus
    /// `b1` `[D, vis]`, `δ` summed over the batch `[D, vis]`, the bias row's gradient through
    /// the MLP `[H, vis]`, and the first layer's weight gradient per half `[D, H]`.
    shared: SharedBias,
}

/// The working memory of [`backward_row`]'s shared-map form (see [`Columns::shared`]).
#[derive(Default)]
struct SharedBias {
    bias: Vec<f32>,
    pre: Vec<f32>,
    delta_sum: Vec<f32>,
    dx: Vec<f32>,
    dw1: Vec<f32>,
}

/// One query row of the backward pass, every batch element at once, as five matrix products
/// over the row's `N = batch × visible` pairs (DAPE's layers are far too narrow for a per-pair
/// loop to keep its weight-gradient sums in registers; as products they are `[D, N] · [N, C]`):
/// writes `d logits` into `da`, adds `d bias` into `db` (each batch element's into its map's
/// rows: summed over the batch for a shared map) and the weight gradients into `acc`.
///
/// When the batch shares the bias map, the bias's half of every product that reads or writes it
/// runs over the row's `vis` keys once instead of over all `N` pairs: `W1[:, H..] B + b1`
/// (then added to each batch element's pre-activations), `dW1[:, H..] += (Σ_batch δ) Bᵀ` and
/// `d B = Σ_batch g + W1[:, H..]ᵀ (Σ_batch δ)`: 3·H·D of the 8·H·D multiply-adds per pair,
/// each divided by the batch size.
fn backward_row(
    mlp: &Mlp,
    rows: &mut BackwardRow,
    da: &mut [&mut [f32]],
    db: &mut [&mut [f32]],
    cols: &mut Columns,
    acc: &mut WeightGrads,
) {
    let h = mlp.h;
    let b = rows.a.len() / h.max(1);
    let n = b * rows.visible;
    if n > 0 {
        let shared = b > 1 && rows.bias.len() == h;
        gather_columns(mlp, rows, cols, shared);
        pre_activations(mlp, cols, [n, rows.visible], shared);
        if rows.needs_output() {
            output_layer(mlp, cols, n);
        }
        rows.grad_columns(&cols.out, da, &mut cols.g, h);
        second_layer_grads(mlp, cols, n, acc);
        first_layer_grads(mlp, cols, [n, rows.visible], shared, acc);
        scatter_input_grads(mlp, cols, [b, rows.visible], da, db, shared);
    }
    rows.future_key_grads(da, db, h);
}

/// `f`'s output `W2 hidden + b2` (`[H, N]`), for the tile's backward pass, which forms `Z`
/// here instead of before the rows.
fn output_layer(mlp: &Mlp, cols: &mut Columns, n: usize) {
    let (d, h) = (mlp.d, mlp.h);
    cols.out.resize(h * n, 0.0);
    for (row, &bias) in cols.out.chunks_exact_mut(n).zip(&mlp.b2) {
        row.fill(bias);
    }
    gemm(
        &mat(&mlp.w2, h, d),
        &mat(&cols.hidden, d, n),
        1.0,
        &mut cols.out,
    );
}

fn mat(v: &[f32], r: usize, n: usize) -> Mat<'_> {
    Mat::row_major(std::borrow::Cow::Borrowed(&v[..r * n]), r, n)
}

/// Rows `from .. from + count` of `W1ᵀ` (`[C, D]`): the first layer's columns for those
/// inputs, `[count, D]`.
fn w1t_rows(mlp: &Mlp, from: usize, count: usize) -> Mat<'_> {
    mat(&mlp.w1t[from * mlp.d..], count, mlp.d)
}

/// The columns of the row: the logits (and, per batch element, the bias unless `shared`) into
/// `x` (the output gradient's `g` is sized for [`BackwardRow::grad_columns`]); with `shared`,
/// the map's row once into `shared.bias`.
/// Column `bi · vis + j` is key `j` of batch element `bi`.
fn gather_columns(mlp: &Mlp, rows: &BackwardRow, cols: &mut Columns, shared: bool) {
    let (c, d, h) = (mlp.c, mlp.d, mlp.h);
    let vis = rows.visible;
    let b = rows.a.len() / h.max(1);
    let n = b * vis;
    let cx = if shared { h } else { c };
    for (buf, channels) in [
        (&mut cols.x, cx),
        (&mut cols.g, h),
        (&mut cols.z, d),
        (&mut cols.hidden, d),
        (&mut cols.delta, d),
        (&mut cols.dx, cx),
    ] {
        buf.resize(channels * n, 0.0);
    }
    for bi in 0..b {
        let bias = batch_rows(rows.bias, h, bi);
        for hh in 0..h {
            let (plane, at) = (bi * h + hh, hh * n + bi * vis);
            cols.x[at..at + vis].copy_from_slice(&rows.a[plane][..vis]);
            if let (false, Some(bias)) = (shared, bias.get(hh)) {
                cols.x[(h + hh) * n + bi * vis..][..vis].copy_from_slice(&bias[..vis]);
            }
        }
    }
    if shared {
        let sb = &mut cols.shared;
        sb.bias.clear();
        for row in rows.bias {
            sb.bias.extend_from_slice(&row[..vis]);
        }
        for (buf, len) in [
            (&mut sb.pre, d * vis),
            (&mut sb.delta_sum, d * vis),
            (&mut sb.dx, h * vis),
            (&mut sb.dw1, d * h),
        ] {
            buf.resize(len, 0.0);
        }
    }
}

/// `z = W1 x + b1` (`[D, N]`), and `hidden = LeakyReLU(z)`. With `shared`, `W1[:, H..] B + b1`
/// over the `vis` keys once, copied into each batch element's columns, then `W1[:, ..H]` times
/// the logits added.
fn pre_activations(mlp: &Mlp, cols: &mut Columns, [n, vis]: [usize; 2], shared: bool) {
    let (c, h) = (mlp.c, mlp.h);
    let Columns {
        x,
        z,
        hidden,
        shared: sb,
        ..
    } = cols;
    if shared {
        for (row, &bias) in sb.pre.chunks_exact_mut(vis).zip(&mlp.b1) {
            row.fill(bias);
        }
        gemm(
            &w1t_rows(mlp, h, h).t(),
            &mat(&sb.bias, h, vis),
            1.0,
            &mut sb.pre,
        );
        for (zrow, prow) in z.chunks_exact_mut(n).zip(sb.pre.chunks_exact(vis)) {
            for block in zrow.chunks_exact_mut(vis) {
                block.copy_from_slice(prow);
            }
        }
        gemm(&w1t_rows(mlp, 0, h).t(), &mat(x, h, n), 1.0, z);
    } else {
        for (row, &bias) in z.chunks_exact_mut(n).zip(&mlp.b1) {
            row.fill(bias);
        }
        gemm(&mat(&mlp.w1, mlp.d, c), &mat(x, c, n), 1.0, z);
    }
    leaky_relu_simd(hidden, z, mlp.slope);
}

/// `dW2 += g · hiddenᵀ`, `db2 += Σ g`, and `δ = (W2ᵀ g) ⊙ LeakyReLU'(z)`.
fn second_layer_grads(mlp: &Mlp, cols: &mut Columns, n: usize, acc: &mut WeightGrads) {
    let (d, h) = (mlp.d, mlp.h);
    let Columns {
        g,
        z,
        hidden,
        delta,
        ..
    } = cols;
    gemm(&mat(g, h, n), &mat(hidden, d, n).t(), 1.0, &mut acc.w2);
    for (s, row) in acc.b2.iter_mut().zip(g.chunks_exact(n)) {
        *s += lane_sum(row);
    }
    gemm(&mat(&mlp.w2t, d, h), &mat(g, h, n), 0.0, delta);
    leaky_relu_grad_simd(delta, z, mlp.slope);
}

/// `hidden = LeakyReLU(z)`, lane by lane (a select, no branch, so that it vectorises).
#[inline(always)]
fn leaky_relu<const FMA: bool>(hidden: &mut [f32], z: &[f32], slope: f32) {
    for (hd, &zv) in hidden.iter_mut().zip(z) {
        *hd = zv * if zv >= 0.0 { 1.0 } else { slope };
    }
}

/// `δ ⊙= LeakyReLU'(z)`, lane by lane (a select: the branch it replaces was 7% of a DAPE
/// training step at 512 × 4, one scalar compare and jump per pair and hidden unit).
#[inline(always)]
fn leaky_relu_grad<const FMA: bool>(delta: &mut [f32], z: &[f32], slope: f32) {
    for (dl, &zv) in delta.iter_mut().zip(z) {
        *dl *= if zv < 0.0 { slope } else { 1.0 };
    }
}

simd_entry! {
    /// [`leaky_relu`] for this CPU (DAPE V2's backward pass uses it too).
    pub(super) fn leaky_relu_simd = leaky_relu(hidden: &mut [f32], z: &[f32], slope: f32)
}

simd_entry! {
    /// [`leaky_relu_grad`] for this CPU (DAPE V2's backward pass uses it too).
    pub(super) fn leaky_relu_grad_simd = leaky_relu_grad(delta: &mut [f32], z: &[f32], slope: f32)
}

/// `dW1 += δ · xᵀ`, `db1 += Σ δ`, and `dx = W1ᵀ δ`. With `shared`, the bias's half through
/// `Σ_batch δ` (`[D, vis]`): `dW1[:, H..] += (Σ_batch δ) Bᵀ`, `dB_mlp = W1[:, H..]ᵀ Σ_batch δ`.
fn first_layer_grads(
    mlp: &Mlp,
    cols: &mut Columns,
    [n, vis]: [usize; 2],
    shared: bool,
    acc: &mut WeightGrads,
) {
    let (c, d, h) = (mlp.c, mlp.d, mlp.h);
    let Columns {
        x,
        delta,
        dx,
        shared: sb,
        ..
    } = cols;
    for (s, row) in acc.b1.iter_mut().zip(delta.chunks_exact(n)) {
        *s += lane_sum(row);
    }
    if !shared {
        gemm(&mat(delta, d, n), &mat(x, c, n).t(), 1.0, &mut acc.w1);
        gemm(&w1t_rows(mlp, 0, c), &mat(delta, d, n), 0.0, dx);
        return;
    }
    for (sum, row) in sb
        .delta_sum
        .chunks_exact_mut(vis)
        .zip(delta.chunks_exact(n))
    {
        sum.copy_from_slice(&row[..vis]);
        for block in row.chunks_exact(vis).skip(1) {
            for (s, &v) in sum.iter_mut().zip(block) {
                *s += v;
            }
        }
    }
    for (half, (xs, cols_of)) in [(&*x, n), (&sb.bias, vis)].into_iter().enumerate() {
        let ds = if half == 0 { &*delta } else { &sb.delta_sum };
        gemm(
            &mat(ds, d, cols_of),
            &mat(xs, h, cols_of).t(),
            0.0,
            &mut sb.dw1,
        );
        for (dst, src) in acc.w1.chunks_exact_mut(c).zip(sb.dw1.chunks_exact(h)) {
            for (o, &v) in dst[half * h..][..h].iter_mut().zip(src) {
                *o += v;
            }
        }
    }
    gemm(&w1t_rows(mlp, 0, h), &mat(delta, d, n), 0.0, dx);
    gemm(
        &w1t_rows(mlp, h, h),
        &mat(&sb.delta_sum, d, vis),
        0.0,
        &mut sb.dx,
    );
}

/// `d logits = g + dx[..H]` per plane, and `d bias += g + dx[H..]` into the map's rows (summed
/// over the batch for a shared map; with `shared`, `Σ_batch g + dB_mlp`).
fn scatter_input_grads(
    mlp: &Mlp,
    cols: &Columns,
    [b, vis]: [usize; 2],
    da: &mut [&mut [f32]],
    db: &mut [&mut [f32]],
    shared: bool,
) {
    let h = mlp.h;
    let n = b * vis;
    let (g, dx) = (&cols.g, &cols.dx);
    let n_bias = db.len();
    for bi in 0..b {
        for hh in 0..h {
            let (at, gv) = (hh * n + bi * vis, &g[hh * n + bi * vis..][..vis]);
            for ((o, &gl), &dl) in da[bi * h + hh][..vis].iter_mut().zip(gv).zip(&dx[at..]) {
                *o = gl + dl;
            }
            let Some(db) = db.get_mut(bias_plane(bi * h + hh, h, n_bias)) else {
                continue;
            };
            let through_mlp = if shared {
                // Added once, with batch element 0.
                (bi == 0).then(|| &cols.shared.dx[hh * vis..][..vis])
            } else {
                Some(&dx[(h + hh) * n + bi * vis..][..vis])
            };
            for (o, &gl) in db[..vis].iter_mut().zip(gv) {
                *o += gl;
            }
            if let Some(dxb) = through_mlp {
                for (o, &dl) in db[..vis].iter_mut().zip(dxb) {
                    *o += dl;
                }
            }
        }
    }
}
