//! Two models built from the same pre-LN blocks: a decoder-only language model (GPT-NeoX-like,
//! untied head) and the bidirectional sequence model used for the CHE tasks.

use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::prelude::*;

use crate::attention::{
    AttentionConfig, KvCache, MultiHeadAttention, QkNormConfig, SsmaxConfig, StickBreakingConfig,
    TemperatureConfig,
};
use crate::encoding::{Hook, PositionalEncoding, PositionalEncodingConfig, Positions};
use crate::error::{ensure, Error, Result};
use crate::kernel::{gelu, linear_layer};
pub use crate::norm::LayerNorm;
use crate::schedule::LayerEncodings;
use crate::util::materialize;

/// Position-wise feed-forward network: `Linear(d -> r·d) -> GELU -> Linear(r·d -> d)`.
#[derive(Module, Debug)]
pub struct FeedForward<B: Backend> {
    /// Expansion.
    pub fc_in: Linear<B>,
    /// Projection back.
    pub fc_out: Linear<B>,
}

impl<B: Backend> FeedForward<B> {
    /// `[.., d_model] -> [.., d_model]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        linear_layer(&self.fc_out, gelu(linear_layer(&self.fc_in, x)))
    }
}

/// A pre-LN transformer block: `x + attn(ln1(x))`, then `x + ffn(ln2(x))`; with
/// `parallel_residual`, GPT-NeoX's `x + attn(ln1(x)) + ffn(ln2(x))`.
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    /// Norm before attention.
    pub norm_attn: LayerNorm<B>,
    /// Self-attention with the positional hook.
    pub attention: MultiHeadAttention<B>,
    /// Norm before the feed-forward network.
    pub norm_ffn: LayerNorm<B>,
    /// Feed-forward network.
    pub ffn: FeedForward<B>,
    /// GPT-NeoX parallel residual.
    pub parallel_residual: bool,
}

impl<B: Backend> Block<B> {
    /// The block's rows `first ..` (all of them for `first = 0`); every row's keys and
    /// values reach `cache`.
    fn forward(
        &self,
        x: Tensor<B, 3>,
        cache: Option<&mut KvCache<B>>,
        segments: Option<Tensor<B, 2, Int>>,
        positions: Option<&Positions>,
        first: usize,
    ) -> Result<Tensor<B, 3>> {
        let normed = self.norm_attn.forward(x.clone());
        // Absolute encodings read the positions at the embeddings, not in attention.
        let positions = positions.filter(|_| self.attention.encoding.takes_positions());
        let attended = self
            .attention
            .forward_rows(normed, positions, segments, cache, first)?;
        let x = if first == 0 {
            x
        } else {
            let l = x.dims()[1];
            x.narrow(1, first, l - first)
        };
        Ok(if self.parallel_residual {
            let ffn = self.ffn.forward(self.norm_ffn.forward(x.clone()));
            x + attended + ffn
        } else {
            let x = x + attended;
            x.clone() + self.ffn.forward(self.norm_ffn.forward(x))
        })
    }
}

/// The shape of a stack of blocks, shared by both models.
#[derive(Config, Debug)]
pub struct TransformerConfig {
    /// Model width.
    pub d_model: usize,
    /// Number of blocks.
    pub n_layers: usize,
    /// Heads per block.
    pub n_heads: usize,
    /// Feed-forward expansion ratio.
    #[config(default = 4)]
    pub ffn_ratio: usize,
    /// The positional encoding.
    #[config(default = "PositionalEncodingConfig::Nope")]
    pub encoding: PositionalEncodingConfig,
    /// Query rows per attention chunk (`None`: no chunking).
    #[config(default = "None")]
    pub chunk_size: Option<usize>,
    /// GPT-NeoX parallel residual.
    #[config(default = false)]
    pub parallel_residual: bool,
    /// LayerNorm epsilon.
    #[config(default = 1e-5)]
    pub layer_norm_eps: f64,
    /// Scalable-Softmax in every attention layer (`None`: the plain softmax).
    #[config(default = "None")]
    pub ssmax: Option<SsmaxConfig>,
    /// Stick-breaking attention in place of the softmax in every layer (`None`: the softmax).
    #[config(default = "None")]
    pub stick_breaking: Option<StickBreakingConfig>,
    /// A per-layer encoding schedule (a hybrid stack such as iRoPE; `None`: `encoding` in every
    /// layer). See [`crate::schedule`].
    #[config(default = "None")]
    pub layer_encodings: Option<LayerEncodings>,
    /// QK-norm: on every layer, or on the unscheduled layers of a hybrid stack.
    #[config(default = "None")]
    pub qk_norm: Option<QkNormConfig>,
    /// Temperature tuning: on every layer, or on the scheduled layers of a hybrid stack.
    #[config(default = "None")]
    pub temperature: Option<TemperatureConfig>,
    /// Sliding-window attention of width `W`: on every layer, or on the unscheduled layers of a
    /// hybrid stack.
    #[config(default = "None")]
    pub sliding_window: Option<usize>,
}

/// Token embedding, absolute positions (if any), blocks and final norm.
#[derive(Module, Debug)]
pub struct Transformer<B: Backend> {
    /// Token embedding.
    pub embedding: Embedding<B>,
    /// Absolute positional encoding (sinusoidal, learned), or BiPE, whose token-id hook
    /// segments the tokens and whose in-segment positions go on the embeddings; `None`
    /// otherwise.
    pub absolute: Option<PositionalEncoding<B>>,
    /// The blocks.
    pub blocks: Vec<Block<B>>,
    /// Final norm.
    pub norm: LayerNorm<B>,
}

impl TransformerConfig {
    /// Builds the stack over `vocab` input ids; `causal` selects decoder or encoder attention.
    pub fn init<B: Backend>(
        &self,
        vocab: usize,
        causal: bool,
        device: &B::Device,
    ) -> Result<Transformer<B>> {
        ensure(vocab > 0, "vocab_size", vocab, "must be at least 1")?;
        ensure(
            self.n_layers > 0,
            "n_layers",
            self.n_layers,
            "must be at least 1",
        )?;
        ensure(
            self.ffn_ratio > 0,
            "ffn_ratio",
            self.ffn_ratio,
            "must be at least 1",
        )?;
        if let Some(schedule) = &self.layer_encodings {
            schedule.validate(self.n_layers)?;
        }
        let norm = || LayerNorm::new(self.d_model, self.layer_norm_eps, device);
        let hidden = self.ffn_ratio * self.d_model;
        let blocks = (0..self.n_layers)
            .map(|layer| {
                Ok(Block {
                    norm_attn: norm()?,
                    attention: self.layer_attention(layer, causal).init(device)?,
                    norm_ffn: norm()?,
                    ffn: FeedForward {
                        fc_in: LinearConfig::new(self.d_model, hidden).init(device),
                        fc_out: LinearConfig::new(hidden, self.d_model).init(device),
                    },
                    parallel_residual: self.parallel_residual,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let absolute = match self.encoding.hook() {
            Hook::Embedding | Hook::Segments => Some(self.encoding.init(
                self.n_heads,
                self.d_model / self.n_heads,
                device,
            )?),
            _ => None,
        };
        Ok(Transformer {
            embedding: EmbeddingConfig::new(vocab, self.d_model).init(device),
            absolute,
            blocks,
            norm: norm()?,
        })
    }
}

/// The stack options of a hybrid model in one object, as `dape che train --hybrid` takes them:
/// `{"layer_encodings": {"every": 4, "encoding": "nope"}, "qk_norm": {}, "temperature":
/// {"floor": 40}, "sliding_window": 16}` (every field optional; an unknown field is an error).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StackOptions {
    /// See [`TransformerConfig::layer_encodings`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer_encodings: Option<LayerEncodings>,
    /// See [`TransformerConfig::qk_norm`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qk_norm: Option<QkNormConfig>,
    /// See [`TransformerConfig::temperature`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<TemperatureConfig>,
    /// See [`TransformerConfig::sliding_window`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
}

impl TransformerConfig {
    /// The same stack with `options` (replacing the four fields).
    pub fn with_stack(self, options: StackOptions) -> Self {
        self.with_layer_encodings(options.layer_encodings)
            .with_qk_norm(options.qk_norm)
            .with_temperature(options.temperature)
            .with_sliding_window(options.sliding_window)
    }

    /// Layer `layer`'s attention: its encoding from the schedule (if any), and the layer
    /// options the schedule gives it (see [`crate::schedule`]).
    pub fn layer_attention(&self, layer: usize, causal: bool) -> AttentionConfig {
        let (encoding, scheduled) = match &self.layer_encodings {
            Some(s) => s.layer(layer, &self.encoding),
            None => (self.encoding.clone(), false),
        };
        let hybrid = self.layer_encodings.is_some();
        let (unscheduled_options, scheduled_options) =
            (!hybrid || !scheduled, !hybrid || scheduled);
        AttentionConfig::new(self.d_model, self.n_heads)
            .with_encoding(encoding)
            .with_causal(causal)
            .with_chunk_size(self.chunk_size)
            .with_ssmax(self.ssmax.clone())
            .with_stick_breaking(self.stick_breaking.clone())
            .with_qk_norm(self.qk_norm.clone().filter(|_| unscheduled_options))
            .with_sliding_window(self.sliding_window.filter(|_| unscheduled_options))
            .with_temperature(self.temperature.clone().filter(|_| scheduled_options))
    }
}

impl<B: Backend> Transformer<B> {
    fn vocab(&self) -> usize {
        self.embedding.weight.dims()[0]
    }

    /// Hidden states `[batch, seq, d_model]` for `tokens: [batch, seq]`. With `caches` (one per
    /// block, causal only) the tokens continue the cached positions.
    pub fn forward(
        &self,
        tokens: Tensor<B, 2, Int>,
        caches: Option<&mut [KvCache<B>]>,
    ) -> Result<Tensor<B, 3>> {
        self.forward_at(tokens, caches, None)
    }

    /// `head` over the hidden states of `tokens` at `positions` (both models' logits).
    fn head_logits(
        &self,
        head: &Linear<B>,
        tokens: Tensor<B, 2, Int>,
        positions: Option<&Positions>,
    ) -> Result<Tensor<B, 3>> {
        Ok(linear_layer(
            head,
            self.forward_at(tokens, None, positions)?,
        ))
    }

    /// Whether the encoding reads the tokens' positions (so that it can run at randomized
    /// positions).
    pub fn takes_positions(&self) -> bool {
        self.absolute
            .as_ref()
            .is_some_and(PositionalEncoding::takes_positions)
            || self
                .blocks
                .iter()
                .any(|b| b.attention.encoding.takes_positions())
    }

    /// [`forward`](Self::forward) with the tokens at `positions` (randomized positions, shared
    /// by the batch; `None`: token `t` at position `t`). `positions` has one entry per token
    /// seen, the cached ones included. An error when the encoding reads no positions.
    pub fn forward_at(
        &self,
        tokens: Tensor<B, 2, Int>,
        caches: Option<&mut [KvCache<B>]>,
        positions: Option<&Positions>,
    ) -> Result<Tensor<B, 3>> {
        self.forward_rows(tokens, caches, positions, 0)
    }

    /// [`forward_at`](Self::forward_at)'s hidden states of rows `first ..` only, `[batch, seq −
    /// first, d_model]`: the last block skips the attention and the feed-forward network of the
    /// rows before `first` (their keys and values still reach its cache). An error when `first`
    /// is not below `seq`.
    pub fn forward_rows(
        &self,
        tokens: Tensor<B, 2, Int>,
        mut caches: Option<&mut [KvCache<B>]>,
        positions: Option<&Positions>,
        first: usize,
    ) -> Result<Tensor<B, 3>> {
        self.check_tokens(&tokens)?;
        if positions.is_some() && !self.takes_positions() {
            return Err(Error::InvalidInput(
                "positions were given, but this model's encoding reads no token positions".into(),
            ));
        }
        let start = match caches.as_deref() {
            Some(c) => {
                if c.len() != self.blocks.len() {
                    return Err(Error::InvalidInput(format!(
                        "{} caches given for {} blocks",
                        c.len(),
                        self.blocks.len()
                    )));
                }
                c.first().map_or(0, KvCache::len)
            }
            None => 0,
        };
        // BiPE: segment the tokens, continuing the state the caches carry.
        let segmented = match &self.absolute {
            Some(abs) => {
                let carried = caches
                    .as_deref()
                    .and_then(|c| c.first())
                    .and_then(KvCache::segment_state);
                abs.segments(&tokens, carried)?
            }
            None => None,
        };
        let mut x = self.embedding.forward(tokens);
        if let Some(abs) = &self.absolute {
            x = abs.embed(x, start, positions, segmented.as_ref().map(|(s, _)| s))?;
        }
        let index = segmented.as_ref().map(|(s, _)| s.index.clone());
        let last = self.blocks.len().saturating_sub(1);
        for (i, block) in self.blocks.iter().enumerate() {
            let cache = caches.as_deref_mut().map(|c| &mut c[i]);
            let rows = if i == last { first } else { 0 };
            x = block.forward(x, cache, index.clone(), positions, rows)?;
        }
        if let (Some(caches), Some((_, state))) = (caches, segmented) {
            for cache in caches.iter_mut() {
                cache.set_segment_state(state.clone());
            }
        }
        Ok(self.norm.forward(x))
    }

    /// What the positional encoding adds to the logits of block `layer` on `tokens: [batch,
    /// seq]` (see [`MultiHeadAttention::positional_logits`]): `[batch, heads, seq, seq]`. Runs
    /// the blocks before it, then that block's norm, on the tokens.
    pub fn positional_logits(
        &self,
        tokens: Tensor<B, 2, Int>,
        layer: usize,
    ) -> Result<Tensor<B, 4>> {
        if layer >= self.blocks.len() {
            return Err(Error::invalid(
                "layer",
                layer,
                format!("the model has blocks 0..{}", self.blocks.len()),
            ));
        }
        self.check_tokens(&tokens)?;
        let segmented = match &self.absolute {
            Some(abs) => abs.segments(&tokens, None)?,
            None => None,
        };
        let mut x = self.embedding.forward(tokens);
        if let Some(abs) = &self.absolute {
            x = abs.embed(x, 0, None, segmented.as_ref().map(|(s, _)| s))?;
        }
        let index = segmented.as_ref().map(|(s, _)| s.index.clone());
        for block in &self.blocks[..layer] {
            x = block.forward(x, None, index.clone(), None, 0)?;
        }
        let block = &self.blocks[layer];
        block
            .attention
            .positional_logits(block.norm_attn.forward(x), index)
    }

    /// Checks that every token id is below the vocabulary size.
    fn check_tokens(&self, tokens: &Tensor<B, 2, Int>) -> Result<()> {
        let [batch, len] = tokens.dims();
        if batch == 0 || len == 0 {
            return Err(Error::InvalidInput(format!(
                "token batch of shape [{batch}, {len}] is empty; batch and length must be at least 1"
            )));
        }
        let max = tokens.clone().max().into_scalar().elem::<i64>();
        let min = tokens.clone().min().into_scalar().elem::<i64>();
        if min < 0 || max >= self.vocab() as i64 {
            let bad = if min < 0 { min } else { max };
            return Err(Error::InvalidInput(format!(
                "token id {bad} is outside the vocabulary 0..{}",
                self.vocab()
            )));
        }
        Ok(())
    }

    /// The same stack with another attention chunk size (`None`: no chunking).
    pub fn with_chunk_size(mut self, chunk_size: Option<usize>) -> Self {
        self.blocks = self
            .blocks
            .into_iter()
            .map(|mut b| {
                b.attention = b.attention.with_chunk_size(chunk_size);
                b
            })
            .collect();
        self
    }
}

/// Configuration of [`LanguageModel`].
#[derive(Config, Debug)]
pub struct LanguageModelConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// The blocks.
    pub transformer: TransformerConfig,
}

impl LanguageModelConfig {
    /// Builds the model, or an error naming the offending value.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<LanguageModel<B>> {
        Ok(materialize(LanguageModel {
            transformer: self.transformer.init(self.vocab_size, true, device)?,
            head: LinearConfig::new(self.transformer.d_model, self.vocab_size)
                .with_bias(false)
                .init(device),
        }))
    }
}

/// A decoder-only language model: causal pre-LN blocks and an untied output head.
#[derive(Module, Debug)]
pub struct LanguageModel<B: Backend> {
    /// Embedding, positions and blocks.
    pub transformer: Transformer<B>,
    /// Output head `d_model -> vocab` (untied).
    pub head: Linear<B>,
}

/// Per-block KV caches of a [`LanguageModel`], for incremental decoding.
#[derive(Clone, Debug)]
pub struct LmCache<B: Backend> {
    /// One cache per block.
    pub layers: Vec<KvCache<B>>,
}

impl<B: Backend> LmCache<B> {
    /// Number of positions seen.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, KvCache::len)
    }

    /// Whether nothing was seen yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<B: Backend> LanguageModel<B> {
    /// Next-token logits `[batch, seq, vocab]` for `tokens: [batch, seq]`.
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Result<Tensor<B, 3>> {
        self.forward_at(tokens, None)
    }

    /// [`forward`](Self::forward) with the tokens at `positions` (randomized positions; see
    /// [`Transformer::forward_at`]).
    pub fn forward_at(
        &self,
        tokens: Tensor<B, 2, Int>,
        positions: Option<&Positions>,
    ) -> Result<Tensor<B, 3>> {
        self.transformer.head_logits(&self.head, tokens, positions)
    }

    /// An empty cache for incremental decoding.
    pub fn new_cache(&self) -> LmCache<B> {
        LmCache {
            layers: vec![KvCache::new(); self.transformer.blocks.len()],
        }
    }

    /// Logits for `tokens` that continue the positions in `cache` (which they extend). Equal to
    /// the matching rows of [`forward`](Self::forward) over the whole sequence.
    pub fn forward_cached(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut LmCache<B>,
    ) -> Result<Tensor<B, 3>> {
        self.forward_cached_at(tokens, cache, None)
    }

    /// [`forward_cached`](Self::forward_cached) at randomized `positions`: one position for
    /// every token of the sequence so far (cached and new); equal to the matching rows of
    /// [`forward_at`](Self::forward_at) over the same positions.
    pub fn forward_cached_at(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut LmCache<B>,
        positions: Option<&Positions>,
    ) -> Result<Tensor<B, 3>> {
        let hidden =
            self.transformer
                .forward_at(tokens, Some(cache.layers.as_mut_slice()), positions)?;
        Ok(linear_layer(&self.head, hidden))
    }

    /// [`forward_cached`](Self::forward_cached)'s logits of rows `first ..` of `tokens` only,
    /// `[batch, new − first, vocab]`, with `cache` extended by every token (see
    /// [`Transformer::forward_rows`]: the last block skips the other rows' attention and
    /// feed-forward network). Without a cache, the same rows of [`forward`](Self::forward).
    pub fn forward_rows(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: Option<&mut LmCache<B>>,
        first: usize,
    ) -> Result<Tensor<B, 3>> {
        let caches = cache.map(|c| c.layers.as_mut_slice());
        let hidden = self.transformer.forward_rows(tokens, caches, None, first)?;
        Ok(linear_layer(&self.head, hidden))
    }

    /// The same model with another attention chunk size (`None`: no chunking).
    pub fn with_chunk_size(mut self, chunk_size: Option<usize>) -> Self {
        self.transformer = self.transformer.with_chunk_size(chunk_size);
        self
    }
}

/// Configuration of [`SequenceModel`], the bidirectional model of the CHE tasks.
#[derive(Config, Debug)]
pub struct SequenceModelConfig {
    /// Input vocabulary (the task's ids); one more id is added for the output placeholder.
    pub input_vocab: usize,
    /// Output classes.
    pub output_vocab: usize,
    /// The blocks (attention is bidirectional).
    pub transformer: TransformerConfig,
}

impl SequenceModelConfig {
    /// Builds the model, or an error naming the offending value.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<SequenceModel<B>> {
        ensure(
            self.output_vocab > 0,
            "output_vocab",
            self.output_vocab,
            "must be at least 1",
        )?;
        Ok(materialize(SequenceModel {
            transformer: self.transformer.init(self.input_vocab + 1, false, device)?,
            head: LinearConfig::new(self.transformer.d_model, self.output_vocab).init(device),
            placeholder: self.input_vocab,
        }))
    }
}

/// A bidirectional encoder with a classification head at every position. For a CHE task the
/// input is `[x_1..x_L, e, .., e]` with `e` = [`SequenceModel::placeholder`] repeated for
/// each output position, and predictions are read from the last positions.
#[derive(Module, Debug)]
pub struct SequenceModel<B: Backend> {
    /// Embedding, positions and blocks.
    pub transformer: Transformer<B>,
    /// Output head `d_model -> output_vocab`.
    pub head: Linear<B>,
    /// The id of the output placeholder `e` (= the input vocabulary size).
    pub placeholder: usize,
}

impl<B: Backend> SequenceModel<B> {
    /// Logits `[batch, seq, output_vocab]` at every position.
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Result<Tensor<B, 3>> {
        self.forward_at(tokens, None)
    }

    /// [`forward`](Self::forward) with the tokens at `positions` (randomized positions; see
    /// [`Transformer::forward_at`]).
    pub fn forward_at(
        &self,
        tokens: Tensor<B, 2, Int>,
        positions: Option<&Positions>,
    ) -> Result<Tensor<B, 3>> {
        self.transformer.head_logits(&self.head, tokens, positions)
    }

    /// The same model with another attention chunk size (`None`: no chunking).
    pub fn with_chunk_size(mut self, chunk_size: Option<usize>) -> Self {
        self.transformer = self.transformer.with_chunk_size(chunk_size);
        self
    }

    /// Appends `output_len` placeholders to `inputs: [batch, L]` and returns the logits of the
    /// output positions, `[batch, output_len, output_vocab]`.
    pub fn predict(&self, inputs: Tensor<B, 2, Int>, output_len: usize) -> Result<Tensor<B, 3>> {
        self.predict_at(inputs, output_len, None)
    }

    /// [`predict`](Self::predict) with the `L + output_len` tokens (inputs, then placeholders)
    /// at `positions` (randomized positions).
    pub fn predict_at(
        &self,
        inputs: Tensor<B, 2, Int>,
        output_len: usize,
        positions: Option<&Positions>,
    ) -> Result<Tensor<B, 3>> {
        ensure(
            output_len > 0,
            "output_len",
            output_len,
            "must be at least 1",
        )?;
        let [batch, len] = inputs.dims();
        let fill = Tensor::<B, 2, Int>::full(
            [batch, output_len],
            self.placeholder as i64,
            &inputs.device(),
        );
        let logits = self.forward_at(Tensor::cat(vec![inputs, fill], 1), positions)?;
        Ok(logits.narrow(1, len, output_len))
    }
}
