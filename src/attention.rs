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

use burn::module::Param;
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::softmax;

use crate::encoding::{
    Fox, Hook, PositionalEncoding, PositionalEncodingConfig, Positions, SegmentIds, SegmentState,
    Span,
};
use crate::error::{ensure, Error, Result};
use crate::kernel::{
    attention, attention_applies, attention_packed, batched_matmul, fused_softmax, linear_layer,
};

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
}

/// Scalable-Softmax (Nakanishi, 2025, "Scalable-Softmax Is Superior for Attention", arXiv
/// 2501.19399): the softmax of row `i` reads `(s_h · ln n_i) · z_ij` instead of `z_ij`, where
/// `z` are the logits after the encoding's hook (scaled `QKᵀ`, plus any bias), `n_i` is the
/// number of keys row `i` sees (`i + 1` under the causal mask, all keys otherwise) and `s_h` is
/// a learned scale per head. It keeps attention from flattening as the context grows.
///
/// It depends on a row's absolute position only through `n_i`, so a KV-cache decode step and a
/// query chunk give what the full forward gives. A row that sees one key gets the factor 0,
/// which changes nothing (its softmax is 1 either way).
///
/// In JSON: `{"init_length": 256}` (every field optional; an unknown field is an error).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SsmaxConfig {
    /// Each `s_h` starts at `1 / ln(init_length)`, so that a row seeing `init_length` keys
    /// starts with the plain softmax (the paper learns `s` per head and layer; this makes its
    /// starting point explicit). At least 2; default 256.
    pub init_length: usize,
}

impl Default for SsmaxConfig {
    fn default() -> Self {
        Self { init_length: 256 }
    }
}

impl SsmaxConfig {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// With another `init_length`.
    pub fn with_init_length(mut self, init_length: usize) -> Self {
        self.init_length = init_length;
        self
    }

    /// The per-head scales `[n_heads]`, or an error naming a bad `init_length`.
    pub fn init<B: Backend>(
        &self,
        n_heads: usize,
        device: &B::Device,
    ) -> Result<Param<Tensor<B, 1>>> {
        ensure(
            self.init_length >= 2,
            "ssmax.init_length",
            self.init_length,
            "must be at least 2 (ln 1 = 0)",
        )?;
        let s = 1.0 / (self.init_length as f64).ln();
        Ok(Param::from_tensor(Tensor::full([n_heads], s, device)))
    }
}

/// `s_h · ln n_i` as `[1, heads, rows, 1]` for the rows of `span`.
fn ssmax_factor<B: Backend>(s: Tensor<B, 1>, span: &Span, device: &B::Device) -> Tensor<B, 4> {
    let heads = s.dims()[0];
    let ln_n: Vec<f32> = (0..span.query_len)
        .map(|r| (span.visible_keys(r) as f32).ln())
        .collect();
    let ln_n =
        Tensor::<B, 1>::from_floats(ln_n.as_slice(), device).reshape([1, 1, span.query_len, 1]);
    s.reshape([1, heads, 1, 1]) * ln_n
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
        }))
    }
}

/// Keys and values of the positions seen so far, for incremental decoding. Keys are stored
/// before the rotary hook, so that rotary encodings whose frequencies depend on the length
/// (dynamic NTK) stay exact. For BiPE it also holds the keys' segment indices and the segment
/// state the next token continues from.
#[derive(Clone, Debug)]
pub struct KvCache<B: Backend> {
    keys: Option<Tensor<B, 4>>,
    values: Option<Tensor<B, 4>>,
    key_segments: Option<Tensor<B, 2, Int>>,
    segment_state: Option<SegmentState>,
    /// Forgetting attention: the keys' cumulative log forget gates `[batch, heads, keys]`.
    forget_sums: Option<Tensor<B, 3>>,
}

impl<B: Backend> Default for KvCache<B> {
    fn default() -> Self {
        Self {
            keys: None,
            values: None,
            key_segments: None,
            segment_state: None,
            forget_sums: None,
        }
    }
}

impl<B: Backend> KvCache<B> {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.keys.as_ref().map_or(0, |k| k.dims()[2])
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where the next token's segment starts (BiPE); `None` before any BiPE forward.
    pub fn segment_state(&self) -> Option<&SegmentState> {
        self.segment_state.as_ref()
    }

    /// Records the segment state after the tokens just appended (set by the model).
    pub fn set_segment_state(&mut self, state: SegmentState) {
        self.segment_state = Some(state);
    }

    /// Appends the segment indices `[batch, new]` of new keys; returns those of all keys.
    fn append_segments(&mut self, s: Tensor<B, 2, Int>) -> Tensor<B, 2, Int> {
        let s = match self.key_segments.take() {
            Some(old) => Tensor::cat(vec![old, s], 1),
            None => s,
        };
        self.key_segments = Some(s.clone());
        s
    }

    /// The last cached key's cumulative log forget gate `[batch, heads, 1]` (forgetting
    /// attention), which the next tokens' sums continue.
    fn last_forget_sum(&self) -> Option<Tensor<B, 3>> {
        self.forget_sums.as_ref().map(|c| {
            let len = c.dims()[2];
            c.clone().narrow(2, len - 1, 1)
        })
    }

    /// Appends the cumulative log forget gates `[batch, heads, new]` of new keys; returns
    /// those of all keys.
    fn append_forget_sums(&mut self, c: Tensor<B, 3>) -> Tensor<B, 3> {
        let c = match self.forget_sums.take() {
            Some(old) => Tensor::cat(vec![old, c], 2),
            None => c,
        };
        self.forget_sums = Some(c.clone());
        c
    }

    fn append(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let k = match self.keys.take() {
            Some(old) => Tensor::cat(vec![old, k], 2),
            None => k,
        };
        let v = match self.values.take() {
            Some(old) => Tensor::cat(vec![old, v], 2),
            None => v,
        };
        self.keys = Some(k.clone());
        self.values = Some(v.clone());
        (k, v)
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
}

impl<B: Backend> MultiHeadAttention<B> {
    /// Self-attention over `x: [batch, seq, d_model]` -> `[batch, seq, d_model]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.attend(x, None, None, None)
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
        if let Some(p) = positions {
            if !self.encoding.takes_positions() {
                return Err(Error::InvalidInput(
                    "this layer's encoding does not read token positions, so it cannot take randomized positions".into(),
                ));
            }
            let seen = cache.as_ref().map_or(0, |c| c.len()) + x.dims()[1];
            if p.len() < seen {
                return Err(Error::InvalidInput(format!(
                    "{} positions given for {seen} tokens (cached and new); pass one position per token",
                    p.len()
                )));
            }
        }
        if let Some(s) = &segments {
            let (sd, xd) = (s.dims(), x.dims());
            if sd != [xd[0], xd[1]] {
                return Err(Error::InvalidInput(format!(
                    "segment indices of shape {sd:?} do not match the input's [batch, seq] = [{}, {}]",
                    xd[0], xd[1]
                )));
            }
        }
        let Some(cache) = cache else {
            return Ok(self.attend(x, positions, None, segments));
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
        Ok(self.attend(x, positions, Some(cache), segments))
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

    /// Queries, keys and values `[batch, heads, seq, d_head]` of `x: [batch, seq, d_model]`:
    /// one projection to `[batch, seq, 3·heads, d_head]` (q's heads, then k's, then v's), of
    /// which each part is a view (no copy) that the fused kernel reads through its strides.
    fn project_qkv(&self, x: Tensor<B, 3>) -> [Tensor<B, 4>; 3] {
        self.split_qkv(self.packed_qkv(x))
    }

    /// The QKV projection of `x: [batch, seq, d_model]` as `[batch, seq, 3·heads, d_head]`.
    fn packed_qkv(&self, x: Tensor<B, 3>) -> Tensor<B, 4> {
        let [b, l, _] = x.dims();
        linear_layer(&self.qkv, x).reshape([b, l, 3 * self.n_heads, self.head_dim])
    }

    /// q, k and v `[batch, heads, seq, d_head]` of a packed projection.
    fn split_qkv(&self, qkv: Tensor<B, 4>) -> [Tensor<B, 4>; 3] {
        let h = self.n_heads;
        [0, 1, 2].map(|i| qkv.clone().narrow(2, i * h, h).swap_dims(1, 2))
    }

    /// The bias that the fused attention kernel adds to the scaled logits of `span`:
    /// `Some(None)` for none, `None` when the encoding needs the tensor path.
    fn fused_bias(
        &self,
        span: &Span,
        gate: Option<&Tensor<B, 4>>,
        device: &B::Device,
    ) -> Option<Option<Tensor<B, 4>>> {
        // Forgetting attention's bias is additive: the fused node takes it (one per sequence);
        // DAPE over it reads the logits and takes the tensor path.
        match (&self.encoding, gate) {
            (PositionalEncoding::Fox(_), Some(g)) => Some(Some(g.clone())),
            (PositionalEncoding::DapeFox(_), _) => None,
            _ => self.encoding.additive_logit_bias(span, device),
        }
    }

    fn attend(
        &self,
        x: Tensor<B, 3>,
        positions: Option<&Positions>,
        cache: Option<&mut KvCache<B>>,
        segments: Option<Tensor<B, 2, Int>>,
    ) -> Tensor<B, 3> {
        let [b, l, d_model] = x.dims();
        let x_device = x.device();
        let (h, dh) = (self.n_heads, self.head_dim);
        // Forgetting attention: the rows' cumulative log forget gates, from this layer's input,
        // continuing the cache's.
        let forget_rows = self.encoding.forget_gate().map(|fox| {
            let carried = cache.as_ref().and_then(|c| c.last_forget_sum());
            fox.cumulative(x.clone(), carried)
        });
        let qkv = self.packed_qkv(x);
        let scale = (dh as f64).sqrt().recip();
        // The fused kernel (ndarray, LibTorch) takes the bias apart from the logits; elsewhere,
        // and for encodings that read the logits, the tensor path below.
        let fused = attention_applies::<B>()
            && self.encoding.hook() != Hook::Segments
            && self.ssmax.is_none();
        // Without a cache, chunks or rotation, the fused kernel reads q, k and v from the
        // packed projection, and its backward pass writes the packed gradient at once.
        let whole = self.chunk_size == 0 || self.chunk_size >= l;
        if fused && cache.is_none() && whole && !self.encoding.rotates() {
            let span = Span {
                query_start: 0,
                query_len: l,
                key_len: l,
                causal: self.causal,
                positions: positions.cloned(),
            };
            let gate = forget_rows
                .as_ref()
                .map(|f| Fox::bias(f.clone(), f.clone()));
            let out = self
                .fused_bias(&span, gate.as_ref(), &x_device)
                .and_then(|bias| {
                    attention_packed(qkv.clone(), h, bias, scale as f32, self.causal.then_some(0))
                });
            if let Some(out) = out {
                return linear_layer(&self.output, out.reshape([b, l, d_model]));
            }
        }
        let [q, k, v] = self.split_qkv(qkv);
        let offset = cache.as_ref().map_or(0, |c| c.len());
        // BiPE: segment indices of the query rows; without any, each token is its own segment.
        let query_segments = (self.encoding.hook() == Hook::Segments).then(|| {
            segments.unwrap_or_else(|| {
                Tensor::<B, 1, Int>::arange(offset as i64..(offset + l) as i64, &x_device)
                    .reshape([1, l])
                    .expand([b, l])
            })
        });
        let (k, v, key_segments, forget_keys) = match cache {
            Some(c) => {
                let (k, v) = c.append(k, v);
                let ks = query_segments.clone().map(|s| c.append_segments(s));
                let fk = forget_rows.clone().map(|f| c.append_forget_sums(f));
                (k, v, ks, fk)
            }
            None => (k, v, query_segments.clone(), forget_rows.clone()),
        };
        let segment_ids = query_segments
            .zip(key_segments)
            .map(|(query, key)| SegmentIds { query, key });
        let (q, k) = self
            .encoding
            .rotate(q, k, offset, positions, segment_ids.as_ref());
        let total = offset + l;
        let chunk = if self.chunk_size == 0 {
            l
        } else {
            self.chunk_size
        };
        // The scale goes on the queries (`rows × d_head` values) rather than on the logits
        // (`rows × keys`): the same scaled logits, one pass fewer over the larger tensor.
        let q_scaled = (!fused).then(|| q.clone() * scale);
        let lookahead = usize::from(self.encoding.reads_next_column());
        // Each chunk's output as `[batch, rows, heads, d_head]`.
        let mut outputs = Vec::with_capacity(l.div_ceil(chunk));
        let mut r0 = 0;
        while r0 < l {
            let rows = chunk.min(l - r0);
            let span = Span {
                query_start: offset + r0,
                query_len: rows,
                key_len: if self.causal {
                    (offset + r0 + rows + lookahead).min(total)
                } else {
                    total
                },
                causal: self.causal,
                positions: positions.cloned(),
            };
            // A narrow of the whole range is still an op (whose backward pass fills a zero
            // tensor): skip it.
            let narrow = |t: &Tensor<B, 4>, start: usize, len: usize| {
                if start == 0 && len == t.dims()[2] {
                    t.clone()
                } else {
                    t.clone().narrow(2, start, len)
                }
            };
            let qc = narrow(&q, r0, rows);
            let kc = narrow(&k, 0, span.key_len);
            let vc = narrow(&v, 0, span.key_len);
            let gate = forget_rows
                .as_ref()
                .zip(forget_keys.as_ref())
                .map(|(fr, fk)| {
                    Fox::bias(
                        fr.clone().narrow(2, r0, rows),
                        fk.clone().narrow(2, 0, span.key_len),
                    )
                });
            r0 += rows;
            let causal_from = span.causal.then_some(span.query_start);
            if fused {
                let kernel = self
                    .fused_bias(&span, gate.as_ref(), &x_device)
                    .and_then(|bias| {
                        attention(
                            qc.clone(),
                            kc.clone(),
                            vc.clone(),
                            bias,
                            scale as f32,
                            causal_from,
                        )
                    });
                if let Some(out) = kernel {
                    outputs.push(out);
                    continue;
                }
            }
            let ids = segment_ids.as_ref().map(|s| SegmentIds {
                query: s.query.clone().narrow(1, r0 - rows, rows),
                key: s.key.clone().narrow(1, 0, span.key_len),
            });
            let q_scaled = q_scaled.clone().unwrap_or_else(|| q.clone() * scale);
            let logits =
                batched_matmul(q_scaled.narrow(2, r0 - rows, rows), kc.clone().transpose());
            let logits = self
                .encoding
                .adjust_logits(logits, qc, kc, &span, ids.as_ref());
            let logits = match gate {
                Some(g) => self.encoding.adjust_logits_gated(logits, g, &span),
                None => logits,
            };
            let logits = match &self.ssmax {
                Some(s) => logits * ssmax_factor(s.val(), &span, &x_device),
                None => logits,
            };
            // The causal mask and the softmax: one fused pass on ndarray, else the tensor path.
            let probs = match fused_softmax(logits, causal_from) {
                Ok(probs) => probs,
                Err(mut logits) => {
                    if span.has_future() {
                        let mask = span
                            .future_mask::<B>(&logits.device())
                            .unsqueeze::<4>()
                            .expand([b, h, rows, span.key_len]);
                        logits = logits.mask_fill(mask, f32::NEG_INFINITY);
                    }
                    softmax(logits, 3)
                }
            };
            outputs.push(batched_matmul(probs, vc).swap_dims(1, 2));
        }
        let out = if outputs.len() == 1 {
            outputs.pop().expect("one chunk")
        } else {
            Tensor::cat(outputs, 1)
        };
        linear_layer(&self.output, out.reshape([b, l, d_model]))
    }
}
