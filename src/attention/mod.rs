//! Multi-head self-attention with one positional hook, a KV cache and an exact query-chunked
//! path.
//!
//! For query rows `i` and key columns `j`, the logits are `A = QKᵀ / sqrt(d_head)` after the
//! rotary hook, then the encoding's logit hook (bias, Shaw, CoPE, DAPE), then the causal mask
//! and the softmax. Rows are independent, so query chunks of `C` rows give exactly the full
//! result; a causal chunk only reads the keys up to its last row (plus one masked column for
//! DAPE V2 in the reference's form, whose rows read key `i + 1`), so the largest tensor is
//! `[batch, heads, C, keys]` (and `[batch, C, keys, D]` inside DAPE).
//!
//! BiPE's relative part acts on segment indices rather than positions: pass them with
//! [`MultiHeadAttention::forward_segmented`] (the model does); the cache keeps the keys' indices.
//!
//! Scalable-Softmax ([`SsmaxConfig`]) is an option of the layer rather than an encoding, so it
//! composes with every encoding: after the encoding's hook, row `i`'s logits are multiplied by
//! `s_h · ln n_i`, with `n_i` the number of keys the row sees and `s_h` learned per head.
//!
//! Stick-breaking attention ([`StickBreakingConfig`]) replaces the softmax: each row breaks a
//! stick over its keys from the nearest outward, in log space. It too composes with every
//! encoding (and with Scalable-Softmax, whose factor it applies first).
//!
//! Three more options make the layers of a hybrid stack (Llama 4's iRoPE): QK-norm
//! ([`QkNormConfig`]), attention temperature tuning ([`TemperatureConfig`]) and a sliding window
//! (`sliding_window`: a row sees only the keys less than `W` positions back).
//!
//! The layer's forward pass runs these steps (`forward.rs`), each a function of its own:
//! the QKV projection, the cache update, the rotary hook, and per chunk of query rows the
//! logit hook, the normaliser (mask, softmax, Scalable-Softmax) and the product with V; the
//! fused attention kernel takes the last three in one node where it applies.

mod cache;
mod forward;
#[cfg(test)]
mod fused_tests;
mod householder;
mod path_stats;
mod qk_norm;
mod ssmax;
mod stick_breaking;
mod temperature;

pub use cache::KvCache;
pub use path_stats::{attention_path_counts, AttentionPathCounts};
pub use qk_norm::QkNormConfig;
pub use ssmax::SsmaxConfig;
pub use stick_breaking::StickBreakingConfig;
pub use temperature::TemperatureConfig;

use burn::module::Param;
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;

use crate::encoding::{
    Fox, Hook, PositionalEncoding, PositionalEncodingConfig, Positions, SegmentIds, Span,
};
use crate::error::{ensure, Error, Result};

/// Configuration of [`MultiHeadAttention`].
#[derive(Config, Debug)]
pub struct AttentionConfig {
    /// Model width; must be a multiple of `n_heads`.
    pub d_model: usize,
    /// Number of heads.
    pub n_heads: usize,
    /// The positional encoding. Absolute encodings (sinusoidal, learned) act on embeddings,
    /// not here: the attention layer treats them as NoPE and the model applies them.
    #[config(default = "PositionalEncodingConfig::Nope")]
    pub encoding: PositionalEncodingConfig,
    /// Causal (decoder) or bidirectional (encoder) attention.
    #[config(default = true)]
    pub causal: bool,
    /// Query rows per chunk; `None` processes all rows at once. The result is the same.
    #[config(default = "None")]
    pub chunk_size: Option<usize>,
    /// Whether the projections have biases.
    #[config(default = true)]
    pub bias: bool,
    /// Scalable-Softmax on the logits (`None`: the plain softmax).
    #[config(default = "None")]
    pub ssmax: Option<SsmaxConfig>,
    /// Stick-breaking attention in place of the softmax (`None`: the softmax).
    #[config(default = "None")]
    pub stick_breaking: Option<StickBreakingConfig>,
    /// QK-norm: queries and keys scaled to a fixed length (`None`: as projected).
    #[config(default = "None")]
    pub qk_norm: Option<QkNormConfig>,
    /// Temperature tuning of the queries by position (`None`: off).
    #[config(default = "None")]
    pub temperature: Option<TemperatureConfig>,
    /// Sliding-window attention: row `i` sees only keys `j` with `i − j < W` (`None`: all).
    #[config(default = "None")]
    pub sliding_window: Option<usize>,
}

impl AttentionConfig {
    /// Builds the layer, or an error naming the offending value.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<MultiHeadAttention<B>> {
        ensure(
            self.n_heads > 0,
            "n_heads",
            self.n_heads,
            "must be at least 1",
        )?;
        ensure(
            self.d_model > 0 && self.d_model.is_multiple_of(self.n_heads),
            "d_model",
            self.d_model,
            &format!("must be a positive multiple of n_heads = {}", self.n_heads),
        )?;
        if let Some(c) = self.chunk_size {
            ensure(c > 0, "chunk_size", c, "must be at least 1")?;
        }
        if let Some(w) = self.sliding_window {
            ensure(w > 0, "sliding_window", w, "must be at least 1")?;
        }
        if let Some(t) = &self.temperature {
            ensure(
                t.alpha.is_finite() && t.alpha >= 0.0,
                "temperature.alpha",
                t.alpha,
                "must be finite and at least 0",
            )?;
            ensure(
                t.floor > 0,
                "temperature.floor",
                t.floor,
                "must be at least 1",
            )?;
        }
        let head_dim = self.d_model / self.n_heads;
        let encoding = match self.encoding.hook() {
            Hook::Embedding => {
                // Validate it anyway, so a bad absolute config is reported here too.
                self.encoding.init::<B>(self.n_heads, head_dim, device)?;
                PositionalEncodingConfig::Nope.init(self.n_heads, head_dim, device)?
            }
            _ => self.encoding.init(self.n_heads, head_dim, device)?,
        };
        let linear = |d_out| {
            LinearConfig::new(self.d_model, d_out)
                .with_bias(self.bias)
                .init(device)
        };
        Ok(crate::util::materialize(MultiHeadAttention {
            qkv: linear(3 * self.d_model),
            output: linear(self.d_model),
            encoding,
            n_heads: self.n_heads,
            head_dim,
            causal: self.causal,
            chunk_size: self.chunk_size.unwrap_or(0),
            ssmax: self
                .ssmax
                .as_ref()
                .map(|c| c.init(self.n_heads, device))
                .transpose()?,
            stick_breaking: self.stick_breaking.clone(),
            qk_norm: self.qk_norm.clone(),
            qk_gain: self
                .qk_norm
                .as_ref()
                .and_then(|c| c.init(self.n_heads, device)),
            temperature: self.temperature.clone(),
            sliding_window: self.sliding_window,
        }))
    }
}

/// Multi-head self-attention with a positional hook. Built by [`AttentionConfig::init`].
#[derive(Module, Debug)]
pub struct MultiHeadAttention<B: Backend> {
    /// Joint query/key/value projection `d_model -> 3 d_model`.
    pub qkv: Linear<B>,
    /// Output projection.
    pub output: Linear<B>,
    /// The positional encoding acting inside attention.
    pub encoding: PositionalEncoding<B>,
    /// Number of heads.
    pub n_heads: usize,
    /// Size of each head.
    pub head_dim: usize,
    /// Causal or bidirectional.
    pub causal: bool,
    /// Query rows per chunk; 0 for no chunking.
    pub chunk_size: usize,
    /// Scalable-Softmax's per-head scales `s_h` `[heads]`; `None` for the plain softmax.
    pub ssmax: Option<Param<Tensor<B, 1>>>,
    /// Stick-breaking attention in place of the softmax; `None` for the softmax. A setting,
    /// not a parameter: the config rebuilds it, the record does not carry it.
    #[module(skip)]
    pub stick_breaking: Option<StickBreakingConfig>,
    /// QK-norm (a setting; its learned gains are `qk_gain`).
    #[module(skip)]
    pub qk_norm: Option<QkNormConfig>,
    /// QK-norm's learned gain per head `[heads]` on the queries; `None` when fixed or off.
    pub qk_gain: Option<Param<Tensor<B, 1>>>,
    /// Temperature tuning of the queries (a setting).
    #[module(skip)]
    pub temperature: Option<TemperatureConfig>,
    /// Sliding-window attention's width `W` (a setting).
    #[module(skip)]
    pub sliding_window: Option<usize>,
}

impl<B: Backend> MultiHeadAttention<B> {
    /// Self-attention over `x: [batch, seq, d_model]` -> `[batch, seq, d_model]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.attend(x, None, None, None, 0)
    }

    /// Incremental (causal) self-attention: `x: [batch, new, d_model]` holds the positions that
    /// follow those in `cache`; they are appended to it. Equals the matching rows of
    /// [`forward`](Self::forward) over the whole sequence.
    pub fn forward_cached(&self, x: Tensor<B, 3>, cache: &mut KvCache<B>) -> Result<Tensor<B, 3>> {
        self.forward_segmented(x, None, Some(cache))
    }

    /// Self-attention over `x: [batch, seq, d_model]` with the segment indices
    /// `segments: [batch, seq]` of its tokens (used by BiPE, ignored by other encodings), with
    /// or without a cache. Without segments, BiPE treats every token as its own segment (its
    /// index is its position), so [`forward`](Self::forward) of a BiPE layer is plain ALiBi or
    /// RoPE.
    pub fn forward_segmented(
        &self,
        x: Tensor<B, 3>,
        segments: Option<Tensor<B, 2, Int>>,
        cache: Option<&mut KvCache<B>>,
    ) -> Result<Tensor<B, 3>> {
        self.forward_with(x, None, segments, cache)
    }

    /// Self-attention over `x: [batch, seq, d_model]` whose tokens sit at `positions`
    /// (randomized positions, shared by the batch), with or without a cache. `positions` holds
    /// one position for every token the layer has seen, the cached ones included: at least
    /// `cache.len() + seq` of them (a decode step may pass the whole sequence's positions). A
    /// cached decode over the same positions equals the full forward. An error for an encoding
    /// that does not read positions ([`PositionalEncoding::takes_positions`]).
    pub fn forward_at(
        &self,
        x: Tensor<B, 3>,
        positions: &Positions,
        cache: Option<&mut KvCache<B>>,
    ) -> Result<Tensor<B, 3>> {
        self.forward_with(x, Some(positions), None, cache)
    }

    /// [`forward_segmented`](Self::forward_segmented) and [`forward_at`](Self::forward_at) in
    /// one: positions, segments and the cache are each optional.
    pub fn forward_with(
        &self,
        x: Tensor<B, 3>,
        positions: Option<&Positions>,
        segments: Option<Tensor<B, 2, Int>>,
        cache: Option<&mut KvCache<B>>,
    ) -> Result<Tensor<B, 3>> {
        self.forward_rows(x, positions, segments, cache, 0)
    }

    /// [`forward_with`](Self::forward_with)'s rows `first ..` only, `[batch, seq − first,
    /// d_model]`: every token's keys and values still reach the cache, but the rows before
    /// `first` attend to nothing (a model's last layer, where only the last rows' outputs are
    /// read). An error when `first` is not below `seq`.
    pub fn forward_rows(
        &self,
        x: Tensor<B, 3>,
        positions: Option<&Positions>,
        segments: Option<Tensor<B, 2, Int>>,
        cache: Option<&mut KvCache<B>>,
        first: usize,
    ) -> Result<Tensor<B, 3>> {
        self.check_inputs(&x, positions, segments.as_ref(), cache.as_deref())?;
        ensure(
            first < x.dims()[1],
            "first",
            first,
            "the first row returned must be below the number of rows given",
        )?;
        Ok(self.attend(x, positions, cache, segments, first))
    }

    /// The inputs of [`forward_with`](Self::forward_with) checked against the layer and each
    /// other: positions only for an encoding that reads them, one per token (cached and new);
    /// segments of the input's `[batch, seq]`; a cache only for a causal layer, of the input's
    /// batch size.
    fn check_inputs(
        &self,
        x: &Tensor<B, 3>,
        positions: Option<&Positions>,
        segments: Option<&Tensor<B, 2, Int>>,
        cache: Option<&KvCache<B>>,
    ) -> Result<()> {
        if let Some(p) = positions {
            if !self.encoding.takes_positions() {
                return Err(Error::InvalidInput(
                    "this layer's encoding does not read token positions, so it cannot take randomized positions".into(),
                ));
            }
            let seen = cache.map_or(0, |c| c.len()) + x.dims()[1];
            if p.len() < seen {
                return Err(Error::InvalidInput(format!(
                    "{} positions given for {seen} tokens (cached and new); pass one position per token",
                    p.len()
                )));
            }
        }
        if let Some(s) = segments {
            let (sd, xd) = (s.dims(), x.dims());
            if sd != [xd[0], xd[1]] {
                return Err(Error::InvalidInput(format!(
                    "segment indices of shape {sd:?} do not match the input's [batch, seq] = [{}, {}]",
                    xd[0], xd[1]
                )));
            }
        }
        let Some(cache) = cache else {
            return Ok(());
        };
        if !self.causal {
            return Err(Error::InvalidInput(
                "a KV cache needs causal attention; this layer is bidirectional".into(),
            ));
        }
        if let Some(k) = &cache.keys {
            let [b, ..] = k.dims();
            let [bx, ..] = x.dims();
            if b != bx {
                return Err(Error::InvalidInput(format!(
                    "batch size {bx} does not match the cache's batch size {b}"
                )));
            }
        }
        Ok(())
    }

    /// What the positional encoding adds to this layer's logits on the input
    /// `x: [batch, seq, d_model]` (the normed hidden states the layer reads), before the causal
    /// mask: the logits after the encoding's hook minus the scaled `QKᵀ`, `[batch, heads, seq,
    /// seq]` — `B + f([A ‖ B])` for DAPE, `B` for a static bias, `D` for forgetting attention,
    /// BiPE-ALiBi's bias over the segment indices `segments` (`[batch, seq]`; without them each
    /// token is its own segment). Scalable-Softmax's factor is left out. An error for encodings
    /// that do not act on the logits (NoPE, absolute and rotary encodings), whose bias is zero.
    pub fn positional_logits(
        &self,
        x: Tensor<B, 3>,
        segments: Option<Tensor<B, 2, Int>>,
    ) -> Result<Tensor<B, 4>> {
        let hook = self.encoding.hook();
        if !matches!(hook, Hook::Logits | Hook::InputGate | Hook::Segments)
            || matches!(&self.encoding, PositionalEncoding::Bipe(b) if !b.acts_on_logits())
        {
            return Err(Error::InvalidInput(format!(
                "this layer's encoding acts on {hook:?}, not on the attention logits: it adds no bias to them"
            )));
        }
        let [b, l, _] = x.dims();
        let device = x.device();
        let dh = self.head_dim;
        let gate = self.encoding.forget_gate().map(|fox| {
            let c = fox.cumulative(x.clone(), None);
            Fox::bias(c.clone(), c)
        });
        let [q, k, _] = self.project_qkv(x);
        let ids = (hook == Hook::Segments).then(|| {
            let s = segments.unwrap_or_else(|| {
                Tensor::<B, 1, Int>::arange(0..l as i64, &device)
                    .reshape([1, l])
                    .expand([b, l])
            });
            SegmentIds {
                query: s.clone(),
                key: s,
            }
        });
        let span = Span {
            query_start: 0,
            query_len: l,
            key_len: l,
            causal: self.causal,
            positions: None,
        };
        let raw = q.clone().matmul(k.clone().transpose()) * (dh as f64).sqrt().recip();
        let adjusted = self
            .encoding
            .adjust_logits(raw.clone(), q, k, &span, ids.as_ref());
        let adjusted = match gate {
            Some(g) => self.encoding.adjust_logits_gated(adjusted, g, &span),
            None => adjusted,
        };
        Ok(adjusted - raw)
    }

    /// The same layer with another chunk size (`None` or `Some(0)`: no chunking).
    pub fn with_chunk_size(mut self, chunk_size: Option<usize>) -> Self {
        self.chunk_size = chunk_size.unwrap_or(0);
        self
    }
}
