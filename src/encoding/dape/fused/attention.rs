//! DAPE inside the attention tile: `O = softmax(c ⊙ Z, causal mask) · V` with
//! `Z = S + B + f([S ‖ B])` (DAPE V1's MLP or DAPE V2's key convolutions: [`Correction`]),
//! `S = scale · Q Kᵀ` and `c` Scalable-Softmax's factor of each
//! (head, row) where the layer has it (else 1), for one block of query rows at a time
//! ([`DapeTile::forward`]), and its backward pass, which recomputes each block's `S`, `Z` and
//! probabilities instead of keeping them ([`DapeTile::backward`], FlashAttention's trade).
//!
//! A block is every batch element and head over `rb` query rows, `[batch, H, rb, keys]`,
//! sized so that it stays under a budget of floats (`Dape::attention`'s `ATTENTION_TILE`,
//! 8 MiB: the whole sequence at the usual training sizes, a few dozen rows at 8192 keys): memory beyond the inputs and the output is a few
//! blocks, never `[batch, H, L, L]`. Within a block the steps run in parallel (the products
//! over (batch element, head) pairs; DAPE's kernels over query rows), and the blocks run in
//! order, so the key and value gradients accumulate without races and the sums come out the
//! same however rayon schedules the work.
//!
//! Per block (`P = softmax(Z)`, `dO` the output gradient):
//! - forward: `S`, then [`Correction::forward`] (`Z`), the row factors, the softmax, `O = P V`;
//! - backward: `S` again, `dP = dO Vᵀ` and `δ = rowsum(dO ⊙ O)` (no probabilities needed);
//!   then [`Correction::backward`], whose rows recompute `f`'s hidden values once and form
//!   from them `Z`, `P` (kept for `dV += Pᵀ dO`), `dZ' = P ⊙ (dP − δ)` for the softmax's input
//!   `Z' = c ⊙ Z`, `dc_hi += Σ_j Z_ij dZ'_ij` (over the batch) and `dZ = c ⊙ dZ'`
//!   (`softmax_rows.rs`), and go on to `dS`, the bias block's gradient and `f`'s;
//!   `dQ = scale · dS K`, `dK += scale · dSᵀ Q`.
//!
//! The reference it must equal is the layer's tensor path: the logits, `Dape::forward` (or
//! `DapeV2::forward`), the masked softmax and the product with V (`dape/attention_tests.rs`).

use rayon::prelude::*;

use super::backward::ZGrad;
use super::correction::{Correction, CorrectionGrads};
use super::distance_half::DistanceHalf;
use super::softmax_rows::SoftmaxInputs;
use crate::encoding::Span;
use crate::kernel::{gemm_new, gemm_scaled, gemm_scaled_add, softmax_row_simd, view2, Mat};

/// The operands of one call, on the host: `q` `[batch, H, rows, d_head]`, `k` `[batch, H, keys,
/// d_head]`, `v` `[batch, H, keys, d_v]` (read through their strides: views of the packed
/// projection are not copied), and the base bias map `[1 or batch, H, rows, keys]`, row-major
/// (`None` over NoPE). `span` gives the rows' and keys' tokens
/// (causal rows see keys `0..=query_start + row`).
pub(crate) struct DapeTile<'a> {
    pub q: ndarray::ArrayView4<'a, f32>,
    pub k: ndarray::ArrayView4<'a, f32>,
    pub v: ndarray::ArrayView4<'a, f32>,
    pub bias: Option<&'a [f32]>,
    /// `[batch, H, rows, keys, d_head, d_v]`.
    pub dims: [usize; 6],
    pub scale: f32,
    pub span: &'a Span,
    /// DAPE's `f`.
    pub f: &'a Correction,
    /// Scalable-Softmax's factor `c` per head and row, `[H, rows]` (shared by the batch), or
    /// `None` (the plain softmax).
    pub row_scale: Option<&'a [f32]>,
    /// Rows per block (at least 1); [`DapeTile::block_rows`] picks it from a budget of floats.
    pub block: usize,
    /// DAPE V1's bias and first layer by distance for the forward pass ([`DistanceHalf`]: a
    /// bias of the distance alone, rows and keys at their token indices; `bias` is then
    /// `None`); `None`: from the bias map, per pair.
    pub distance: Option<&'a DistanceHalf>,
}

/// The gradients of one call, row-major: q, k, v in their shapes, the bias map's (its shape;
/// empty without one) and `f`'s four tensors (in [`Correction::weight_sizes`]' layouts).
pub(crate) struct TileGrads {
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub bias: Vec<f32>,
    pub weights: [Vec<f32>; 4],
    /// The row factors' `[H, rows]` (empty without them).
    pub row_scale: Vec<f32>,
}

/// One block's scores: `S` (the scaled logits, `[batch, H, rb, keys]`) and the block's rows of
/// the bias map (`[1 or batch, H, rb, keys]`).
struct Scores<'a> {
    rb: usize,
    span: Span,
    logits: Vec<f32>,
    bias: Option<std::borrow::Cow<'a, [f32]>>,
}

impl<'a> DapeTile<'a> {
    /// Rows per block for `[batch, H, ·, keys]` so that a block stays under `budget` floats
    /// (one row at least).
    pub(crate) fn block_rows([b, h, rows, keys]: [usize; 4], budget: usize) -> usize {
        (budget / (b * h * keys).max(1)).clamp(1, rows.max(1))
    }

    fn bias_maps(&self) -> usize {
        let [_, h, rows, keys, _, _] = self.dims;
        self.bias.map_or(0, |m| m.len() / (h * rows * keys).max(1))
    }

    /// The output `[batch, rows, H, d_v]`, row-major.
    pub(crate) fn forward(&self) -> Vec<f32> {
        let [b, h, rows, keys, _, dv] = self.dims;
        let mut out = vec![0.0f32; b * rows * h * dv];
        for r0 in (0..rows).step_by(self.block.max(1)) {
            let (rb, probs) = self.probabilities(r0);
            let heads: Vec<Vec<f32>> = (0..b * h)
                .into_par_iter()
                .map(|plane| {
                    let p = block_plane(&probs, plane, [rb, keys]);
                    gemm_new(1.0, &p, &self.v_mat(plane))
                })
                .collect();
            for (plane, values) in heads.iter().enumerate() {
                let (bi, hh) = (plane / h, plane % h);
                for (r, row) in values.chunks_exact(dv.max(1)).enumerate() {
                    let at = ((bi * rows + r0 + r) * h + hh) * dv;
                    out[at..at + dv].copy_from_slice(row);
                }
            }
        }
        out
    }

    /// The gradients for the output's gradient `g` (`[batch, rows, H, d_v]`).
    pub(crate) fn backward(&self, g: &[f32]) -> TileGrads {
        let [b, h, rows, keys, dh, dv] = self.dims;
        let mut dq = vec![0.0f32; b * h * rows * dh];
        let mut dk = vec![0.0f32; b * h * keys * dh];
        let mut dvs = vec![0.0f32; b * h * keys * dv];
        let mut dbias = vec![0.0f32; self.bias_maps() * h * rows * keys];
        let mut dc = vec![0.0f32; self.row_scale.map_or(0, <[f32]>::len)];
        let mut weights: Option<[Vec<f32>; 4]> = None;
        for r0 in (0..rows).step_by(self.block.max(1)) {
            let scores = self.scores(r0);
            let (rb, span) = (scores.rb, &scores.span);
            // dP = dO Vᵀ per (batch element, head): it needs no probabilities, so `f`'s
            // backward rows can form `Z`, `P` and `dZ` one row at a time.
            let mut dp = vec![0.0f32; b * h * rb * keys];
            dp.par_chunks_mut((rb * keys).max(1))
                .enumerate()
                .for_each(|(plane, dp)| {
                    let go = self.out_rows(g, plane, r0, rb);
                    gemm_scaled(1.0, &go, &self.v_mat(plane).t(), dp);
                });
            let factor = self.row_scale.map(|c| {
                let mut block = Vec::with_capacity(h * rb);
                for head in c.chunks_exact(rows.max(1)) {
                    block.extend_from_slice(&head[r0..r0 + rb]);
                }
                block
            });
            let inputs = SoftmaxInputs {
                dp: &dp,
                factor: factor.as_deref(),
                dims: [h, rb, keys],
            };
            let mut probs = vec![0.0f32; b * h * rb * keys];
            let mut sums = vec![0.0f32; if factor.is_some() { b * h * rb } else { 0 }];
            let grads = self.f.backward(
                &scores.logits,
                scores.bias.as_deref(),
                ZGrad::Softmax {
                    inputs: &inputs,
                    probs: &mut probs,
                    dc: &mut sums,
                },
                [b, h, rb, keys],
                span,
            );
            drop(dp);
            // The row factors' gradients, summed over the batch in plane order (the same bits
            // on every run).
            for (i, sum) in sums.into_iter().enumerate() {
                let (plane, r) = (i / rb, i % rb);
                dc[(plane % h) * rows + r0 + r] += sum;
            }
            // dV += Pᵀ dO; dQ = scale · dS K (the block's rows), dK += scale · dSᵀ Q.
            dq.par_chunks_mut((rows * dh).max(1))
                .zip(dk.par_chunks_mut((keys * dh).max(1)))
                .zip(dvs.par_chunks_mut((keys * dv).max(1)))
                .enumerate()
                .for_each(|(plane, ((dq_plane, dk_plane), dv_plane))| {
                    let p = block_plane(&probs, plane, [rb, keys]);
                    gemm_scaled_add(1.0, &p.t(), &self.out_rows(g, plane, r0, rb), dv_plane);
                    let ds = block_plane(&grads.logits, plane, [rb, keys]);
                    let q = self.q_rows(plane, r0, rb);
                    gemm_scaled(
                        self.scale,
                        &ds,
                        &self.k_mat(plane),
                        &mut dq_plane[r0 * dh..][..rb * dh],
                    );
                    gemm_scaled_add(self.scale, &ds.t(), &q, dk_plane);
                });
            if let Some(db) = &grads.bias {
                scatter_rows(&mut dbias, db, [rows, keys], r0, rb);
            }
            weights = Some(add_weight_grads(weights, grads));
        }
        TileGrads {
            q: dq,
            k: dk,
            v: dvs,
            bias: dbias,
            weights: weights.unwrap_or_else(|| self.f.weight_sizes().map(|n| vec![0.0; n])),
            row_scale: dc,
        }
    }

    /// The block of rows from `r0`: its scaled logits `S` (`[batch, H, rb, keys]`) and its
    /// rows of the bias map.
    fn scores(&self, r0: usize) -> Scores<'a> {
        let [b, h, rows, keys, _, _] = self.dims;
        let rb = self.block.max(1).min(rows - r0);
        let span = Span {
            query_start: self.span.query_start + r0,
            query_len: rb,
            key_len: keys,
            causal: self.span.causal,
            positions: None,
        };
        let mut logits = vec![0.0f32; b * h * rb * keys];
        logits
            .par_chunks_mut((rb * keys).max(1))
            .enumerate()
            .for_each(|(plane, dst)| {
                let k = self.k_mat(plane);
                gemm_scaled(self.scale, &self.q_rows(plane, r0, rb), &k.t(), dst);
            });
        let bias = self.bias.map(|m| gather_rows(m, [rows, keys], r0, rb));
        Scores {
            rb,
            span,
            logits,
            bias,
        }
    }

    /// The probabilities of the block of rows from `r0`: `Z` through DAPE's kernel, the row
    /// factors, and the masked softmax, `[batch, H, rb, keys]`.
    fn probabilities(&self, r0: usize) -> (usize, Vec<f32>) {
        let [b, h, rows, keys, _, _] = self.dims;
        let Scores {
            rb,
            span,
            logits,
            bias,
        } = self.scores(r0);
        let mut probs = self.f.forward(
            logits,
            bias.as_deref(),
            [b, h, rb, keys],
            &span,
            self.distance,
        );
        probs
            .par_chunks_mut(keys.max(1))
            .enumerate()
            .for_each(|(i, row)| {
                let visible = span.visible_keys(i % rb);
                if let Some(c) = self.row_scale {
                    let factor = c[((i / rb) % h) * rows + r0 + i % rb];
                    row[..visible].iter_mut().for_each(|z| *z *= factor);
                }
                softmax_row_simd(row, visible)
            });
        (rb, probs)
    }

    /// Rows `r0 .. r0 + rb` of plane `plane` (batch element `plane / H`, head `plane % H`)
    /// of q, `[rb, d_head]`.
    fn q_rows(&self, plane: usize, r0: usize, rb: usize) -> Mat<'_> {
        let h = self.dims[1];
        view2(
            self.q
                .slice(ndarray::s![plane / h, plane % h, r0..r0 + rb, ..]),
        )
    }

    /// Plane `plane` of k, `[keys, d_head]`.
    fn k_mat(&self, plane: usize) -> Mat<'_> {
        let h = self.dims[1];
        view2(self.k.slice(ndarray::s![plane / h, plane % h, .., ..]))
    }

    /// Plane `plane` of v, `[keys, d_v]`.
    fn v_mat(&self, plane: usize) -> Mat<'_> {
        let h = self.dims[1];
        view2(self.v.slice(ndarray::s![plane / h, plane % h, .., ..]))
    }

    /// Rows `r0 .. r0 + rb` of head `plane % H` of batch element `plane / H` in an output-shaped
    /// `[batch, rows, H, d_v]` array, `[rb, d_v]` (read through its strides).
    fn out_rows<'x>(&self, x: &'x [f32], plane: usize, r0: usize, rb: usize) -> Mat<'x> {
        let [_, h, _, _, _, dv] = self.dims;
        let rest = self.out_slice(x, plane, r0);
        Mat::strided(&rest[..(rb - 1) * h * dv + dv], [rb, dv], [h * dv, 1])
    }

    /// `x` (output-shaped, `[batch, rows, H, d_v]`) from row `r0` of head `plane % H` of batch
    /// element `plane / H` on: row `r` of the head's block starts at `r · H · d_v`.
    fn out_slice<'x>(&self, x: &'x [f32], plane: usize, r0: usize) -> &'x [f32] {
        let [_, h, rows, _, _, dv] = self.dims;
        let (bi, hh) = (plane / h, plane % h);
        &x[((bi * rows + r0) * h + hh) * dv..]
    }
}

/// Plane `plane` of a block-shaped `[batch, H, rb, keys]` array, `[rb, keys]`.
fn block_plane(x: &[f32], plane: usize, [rb, keys]: [usize; 2]) -> Mat<'_> {
    Mat::row_major(
        std::borrow::Cow::Borrowed(&x[plane * rb * keys..][..rb * keys]),
        rb,
        keys,
    )
}

/// Rows `r0 .. r0 + rb` of every plane of `map` (`[planes, rows, keys]`), `[planes, rb, keys]`:
/// `map` itself when the block is every row.
fn gather_rows(
    map: &[f32],
    [rows, keys]: [usize; 2],
    r0: usize,
    rb: usize,
) -> std::borrow::Cow<'_, [f32]> {
    if r0 == 0 && rb == rows {
        return std::borrow::Cow::Borrowed(map);
    }
    let mut block = Vec::with_capacity(map.len() / rows.max(1) * rb);
    for plane in map.chunks_exact((rows * keys).max(1)) {
        block.extend_from_slice(&plane[r0 * keys..(r0 + rb) * keys]);
    }
    std::borrow::Cow::Owned(block)
}

/// Writes `block` (`[planes, rb, keys]`) into rows `r0 .. r0 + rb` of every plane of `dst`.
fn scatter_rows(dst: &mut [f32], block: &[f32], [rows, keys]: [usize; 2], r0: usize, rb: usize) {
    for (plane, src) in dst
        .chunks_exact_mut((rows * keys).max(1))
        .zip(block.chunks_exact((rb * keys).max(1)))
    {
        plane[r0 * keys..(r0 + rb) * keys].copy_from_slice(src);
    }
}

/// `f`'s gradients summed over the blocks so far (`sum`, `None` before the first) and one more
/// block's; the block's other gradients (its logits' and bias's) are dropped.
fn add_weight_grads(sum: Option<[Vec<f32>; 4]>, block: CorrectionGrads) -> [Vec<f32>; 4] {
    let Some(mut sum) = sum else {
        return block.weights;
    };
    for (a, b) in sum.iter_mut().zip(&block.weights) {
        for (x, y) in a.iter_mut().zip(b) {
            *x += y;
        }
    }
    sum
}
