//! DAPE V1 and the attention around it in one kernel: [`Dape::attention`] (separate q, k, v,
//! any chunk of query rows) and [`Dape::attention_packed`] (the packed projection of a whole
//! sequence), over `fused/attention.rs`'s tile on ndarray.

use burn::prelude::*;

use super::{Dape, Span, ATTENTION_TILE};

impl<B: Backend> Dape<B> {
    /// DAPE and the attention around it in one kernel: `softmax(Z, mask) · v` with
    /// `Z = S + B + f([S ‖ B])`, `S = scale · q kᵀ`, for `q` `[batch, H, rows, d_head]`, `k`
    /// `[batch, H, keys, d_head]`, `v` `[batch, H, keys, d_v]` over the rows and keys of `span`;
    /// `[batch, rows, H, d_v]`. `B` is `map` when given (`[1 or batch, H, rows, keys]`, a base
    /// bias computed outside: forgetting attention's), else this module's own bias over `span`
    /// (none over NoPE).
    ///
    /// On ndarray (`f32`, with or without autodiff) it runs one block of query rows at a time
    /// and, in training, is one graph node that keeps no `[batch, H, rows, keys]` tensor: its
    /// backward pass recomputes each block. `None` elsewhere (the caller takes the tensor path:
    /// the logits, [`Self::forward`], the softmax and the product with `v`).
    pub fn attention(
        &self,
        qkv: [Tensor<B, 4>; 3],
        map: Option<Tensor<B, 4>>,
        span: &Span,
        scale: f32,
    ) -> Option<Tensor<B, 4>> {
        self.attention_in_blocks(qkv, map, span, scale, ATTENTION_TILE)
    }

    /// [`Self::attention`] with blocks of query rows `[batch, H, rows, keys]` under `budget`
    /// floats (one row at least; `attention` uses [`ATTENTION_TILE`]). The result does not
    /// depend on the budget (up to rounding).
    pub fn attention_in_blocks(
        &self,
        qkv: [Tensor<B, 4>; 3],
        map: Option<Tensor<B, 4>>,
        span: &Span,
        scale: f32,
        budget: usize,
    ) -> Option<Tensor<B, 4>> {
        self.tile(Qkv::Separate(qkv), map, None, span, scale, budget)
    }

    /// [`Self::attention`] under Scalable-Softmax: the softmax of row `i` in head `h` reads
    /// `c_hi · Z_ij`, with `row_scale` `c` `[H, rows]` (the layer's `s_h · ln n_i`; see
    /// [`crate::SsmaxConfig`]). Under autodiff `c` is one more parent of the node, and its
    /// gradient `Σ_batch Σ_j Z_ij · dZ'_ij` comes from the same recomputed blocks.
    pub fn attention_row_scaled(
        &self,
        qkv: [Tensor<B, 4>; 3],
        map: Option<Tensor<B, 4>>,
        row_scale: Tensor<B, 2>,
        span: &Span,
        scale: f32,
    ) -> Option<Tensor<B, 4>> {
        self.tile(
            Qkv::Separate(qkv),
            map,
            Some(row_scale),
            span,
            scale,
            ATTENTION_TILE,
        )
    }

    /// [`Self::attention`] over the packed projection of a whole sequence, `qkv` `[batch, seq,
    /// 3 · H, d_head]` (q's heads, then k's, then v's); `span` covers the sequence (`seq` rows
    /// and keys). Under autodiff the node's parent is `qkv` itself, so its backward pass writes
    /// the packed gradient at once. `[batch, seq, H, d_head]`.
    pub fn attention_packed(
        &self,
        qkv: Tensor<B, 4>,
        map: Option<Tensor<B, 4>>,
        span: &Span,
        scale: f32,
    ) -> Option<Tensor<B, 4>> {
        self.attention_packed_in_blocks(qkv, map, span, scale, ATTENTION_TILE)
    }

    /// [`Self::attention_packed`] with blocks under `budget` floats, as
    /// [`Self::attention_in_blocks`].
    pub fn attention_packed_in_blocks(
        &self,
        qkv: Tensor<B, 4>,
        map: Option<Tensor<B, 4>>,
        span: &Span,
        scale: f32,
        budget: usize,
    ) -> Option<Tensor<B, 4>> {
        let seq = qkv.dims()[1];
        if (span.query_len, span.key_len) != (seq, seq) {
            return None;
        }
        self.tile(Qkv::Packed(qkv), map, None, span, scale, budget)
    }

    /// The tile on ndarray (`f32`, ± autodiff), with Scalable-Softmax's `row_scale` `[H,
    /// rows]` when given; `None` elsewhere or when a shape does not fit.
    #[cfg(feature = "ndarray")]
    pub(super) fn tile(
        &self,
        qkv: Qkv<Tensor<B, 4>>,
        map: Option<Tensor<B, 4>>,
        row_scale: Option<Tensor<B, 2>>,
        span: &Span,
        scale: f32,
        budget: usize,
    ) -> Option<Tensor<B, 4>> {
        use super::fused;
        if !(fused::applies::<B>() || fused::applies_autodiff::<B>()) {
            return None;
        }
        let device = self.mlp_in.weight.device();
        let bias = map.or_else(|| self.bias.as_ref().map(|bias| bias.forward(span, &device)));
        let inputs = fused::DapeAttentionInputs {
            qkv,
            heads: self.mlp_out.weight.dims()[1],
            bias,
            w1t: self.mlp_in.weight.val(),
            b1: self.mlp_in.bias.as_ref().map(|b| b.val()),
            w2t: self.mlp_out.weight.val(),
            b2: self.mlp_out.bias.as_ref().map(|b| b.val()),
            row_scale,
            slope: self.negative_slope as f32,
            scale,
            budget,
        };
        fused::dape_attention(inputs, span)
    }

    /// Without ndarray there is no tile: `None`, and the caller takes the tensor path.
    #[cfg(not(feature = "ndarray"))]
    pub(super) fn tile(
        &self,
        qkv: Qkv<Tensor<B, 4>>,
        map: Option<Tensor<B, 4>>,
        row_scale: Option<Tensor<B, 2>>,
        span: &Span,
        scale: f32,
        budget: usize,
    ) -> Option<Tensor<B, 4>> {
        let _ = (qkv, map, row_scale, span, scale, budget);
        None
    }
}

/// Queries, keys and values as the tile takes them (the queries not yet scaled).
#[derive(Debug)]
pub(crate) enum Qkv<T> {
    /// q `[batch, H, rows, d_head]`, k `[batch, H, keys, d_head]`, v `[batch, H, keys, d_v]`.
    Separate([T; 3]),
    /// `[batch, seq, 3 · H, d_head]` as one projection yields them: q's heads, then k's, then
    /// v's (rows = keys = seq). Under autodiff the node's parent is this tensor itself, and
    /// its backward pass writes the packed gradient at once (no zero-filled copies per part).
    Packed(T),
}
