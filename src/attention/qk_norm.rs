//! QK-norm, an option of the attention layer: every query and key scaled to a fixed length
//! before the logits, as Llama 4 does on its RoPE layers.
//!
//! Each head's `q` and `k` are divided by their root mean square over `d_head`
//! (`x / sqrt(mean(x²) + ε)`, ε = 1e-6, Llama 4's `L2Norm`), so that `‖q‖ = ‖k‖ = √d_head` and the
//! scaled logit `q·k/√d_head` is `√d_head · cos(q, k)`. With `learned`, the queries of head `h`
//! are then multiplied by a learned gain `g_h` (initialised to 1), so a head can sharpen or
//! soften its attention; without it the scale stays fixed, as in Llama 4.
//!
//! Each query and key is normalised on its own, and the rotary hook preserves lengths, so the
//! KV cache holds normalised keys and decoding and chunks stay exact.

use burn::module::Param;
use burn::prelude::*;

/// QK-norm. In JSON: `{"learned": false}` (every field optional; an unknown field is an error).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QkNormConfig {
    /// A learned gain per head on the normalised queries (default `false`: fixed, as Llama 4).
    pub learned: bool,
}

impl QkNormConfig {
    /// The defaults (a fixed scale).
    pub fn new() -> Self {
        Self::default()
    }

    /// With a learned gain per head, or not.
    pub fn with_learned(mut self, learned: bool) -> Self {
        self.learned = learned;
        self
    }

    /// The learned gains `[n_heads]` (ones), or `None` for a fixed scale.
    pub(super) fn init<B: Backend>(
        &self,
        n_heads: usize,
        device: &B::Device,
    ) -> Option<Param<Tensor<B, 1>>> {
        self.learned
            .then(|| Param::from_tensor(Tensor::ones([n_heads], device)))
    }
}

/// `x / sqrt(mean(x²) + ε)` over the last axis of `[batch, heads, seq, d_head]`.
pub(super) fn rms_normalise<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let ms = x.clone().powi_scalar(2).mean_dim(3);
    x / (ms + 1e-6).sqrt()
}

/// The normalised `q` and `k`, the queries times the gains `[heads]` where learned.
pub(super) fn qk_normalise<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    gain: Option<&Param<Tensor<B, 1>>>,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let q = rms_normalise(q);
    let q = match gain {
        Some(g) => {
            let heads = g.dims()[0];
            q * g.val().reshape([1, heads, 1, 1])
        }
        None => q,
    };
    (q, rms_normalise(k))
}
