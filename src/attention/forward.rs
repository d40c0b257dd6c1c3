//! The steps of [`MultiHeadAttention`]'s forward pass, in the order they run:
//!
//! 1. [`packed_qkv`](MultiHeadAttention::packed_qkv): the QKV projection,
//!    `[batch, seq, 3·heads, d_head]`;
//! 2. [`attend_packed`](MultiHeadAttention::attend_packed): the whole sequence in one fused
//!    node, where the kernel applies (no cache, no chunks, no rotation): the attention kernel
//!    with the encoding's bias, or DAPE's tile ([`crate::encoding::Dape::attention_packed`]);
//! 3. [`update_cache`](MultiHeadAttention::update_cache): the new keys and values (and what
//!    the encodings carry beside them) appended to the cache;
//! 4. the rotary hook ([`PositionalEncoding::rotate`]) on q and k;
//! 5. per chunk of query rows ([`attend_chunk`](MultiHeadAttention::attend_chunk)): the fused
//!    kernel (or DAPE's tile) where it applies, else the logit hook ([`logits`](MultiHeadAttention::logits)),
//!    the normaliser ([`normalise`](MultiHeadAttention::normalise)) and the product with V;
//! 6. [`project_out`](MultiHeadAttention::project_out): the output projection.

use burn::prelude::*;
use burn::tensor::activation::softmax;

use super::qk_norm::qk_normalise;
use super::ssmax::ssmax_factor;
use super::stick_breaking::stick_breaking_weights;
use super::{path_stats, KvCache, MultiHeadAttention};
use crate::encoding::dape::{
    tile_attention, whole_sequence, TileQkv, TiledCorrection, ATTENTION_TILE,
};
use crate::encoding::{Fox, Hook, PositionalEncoding, Positions, SegmentIds, Span};
use crate::kernel::{
    attention, attention_applies, attention_packed, batched_matmul, fused_softmax, linear_layer,
    stick_breaking_attention, stick_breaking_attention_applies, Sticks,
};

/// Queries, keys and values as the DAPE tile takes them: separate, or the packed projection.
enum Qkv<'a, B: Backend> {
    Separate([&'a Tensor<B, 4>; 3]),
    Packed(&'a Tensor<B, 4>),
}

/// Which fused node a chunk of query rows goes through, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fused {
    /// The tensor path: the logit hook, the normaliser, the product with V.
    No,
    /// The softmax attention node ([`attention`]).
    Softmax,
    /// The stick-breaking attention node ([`stick_breaking_attention`]).
    Sticks,
}

/// What the query rows of one forward pass attend over: the keys and values (the cached ones
/// first), and beside them the segment indices (BiPE) and cumulative forget gates (FoX) of the
/// query rows and of the keys.
struct Keys<B: Backend> {
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    segment_ids: Option<SegmentIds<B>>,
    forget_rows: Option<Tensor<B, 3>>,
    forget_keys: Option<Tensor<B, 3>>,
}

/// The queries of one forward pass after the rotary hook: `q` `[batch, heads, seq, d_head]`,
/// and, on the tensor path, `q · scale` computed once for every chunk.
struct Queries<B: Backend> {
    q: Tensor<B, 4>,
    scaled: Option<Tensor<B, 4>>,
    scale: f64,
}

/// `t` narrowed to `len` entries from `start` along the rows or keys axis (2); a narrow of the
/// whole range is still an op (whose backward pass fills a zero tensor), so it is skipped.
fn narrow_rows<B: Backend>(t: &Tensor<B, 4>, start: usize, len: usize) -> Tensor<B, 4> {
    if start == 0 && len == t.dims()[2] {
        t.clone()
    } else {
        t.clone().narrow(2, start, len)
    }
}

/// Scalable-Softmax on a fused node's operands: the factor `c = s_h · ln n_i`
/// (`[1, heads, rows, 1]`) multiplies the logits `scale · q kᵀ + bias` of row `i`, which is
/// `scale · (c q) kᵀ + c · bias`. So the queries `[batch, heads, rows, d_head]` and the bias
/// `[1 or batch, heads, rows, keys]` are scaled, and the node runs unchanged; the gradient of
/// `s` comes back through the two products. Without the option, the operands as they are.
fn ssmax_scaled<B: Backend>(
    q: &Tensor<B, 4>,
    bias: Option<Tensor<B, 4>>,
    factor: Option<&Tensor<B, 4>>,
) -> (Tensor<B, 4>, Option<Tensor<B, 4>>) {
    match factor {
        Some(c) => (q.clone() * c.clone(), bias.map(|b| b * c.clone())),
        None => (q.clone(), bias),
    }
}

impl<B: Backend> MultiHeadAttention<B> {
    /// Self-attention over `x: [batch, seq, d_model]` once the inputs are checked: the steps
    /// listed in this module's docs.
    pub(super) fn attend(
        &self,
        x: Tensor<B, 3>,
        positions: Option<&Positions>,
        cache: Option<&mut KvCache<B>>,
        segments: Option<Tensor<B, 2, Int>>,
        first: usize,
    ) -> Tensor<B, 3> {
        if let Some(path) = self.encoding.householder() {
            let out = self.attend_householder(path, x, cache);
            let l = out.dims()[1];
            return out.narrow(1, first, l - first);
        }
        let [b, l, _] = x.dims();
        let device = x.device();
        let forget_rows = self.forget_sums(x.clone(), cache.as_deref());
        let qkv = self.packed_qkv(x);
        // The fused kernel (ndarray, LibTorch) takes the bias apart from the logits; elsewhere,
        // and for encodings that read the logits, the tensor path.
        // Stick-breaking has a node of its own (ndarray).
        let plain = self.encoding.hook() != Hook::Segments
            && self.sliding_window.is_none()
            && path_stats::fused_allowed();
        let fused = match &self.stick_breaking {
            None if plain && attention_applies::<B>() => Fused::Softmax,
            Some(_) if plain && stick_breaking_attention_applies::<B>() => Fused::Sticks,
            _ => Fused::No,
        };
        let whole = self.chunk_size == 0 || self.chunk_size >= l;
        let reshapes = self.qk_norm.is_some() || self.temperature.is_some();
        // Scalable-Softmax scales the queries of each chunk (see `attend_chunk`).
        let packed = cache.is_none()
            && first == 0
            && whole
            && !self.encoding.rotates()
            && !reshapes
            && self.ssmax.is_none();
        if fused == Fused::Softmax && packed {
            if let Some(out) =
                self.attend_packed(qkv.clone(), positions, forget_rows.as_ref(), &device)
            {
                path_stats::record(true);
                return self.project_out(out);
            }
        }
        let [q, k, v] = self.split_qkv(qkv);
        let offset = cache.as_ref().map_or(0, |c| c.len());
        let (q, k) = self.normalise_qk(q, k, offset);
        let query_segments = self.query_segments(segments, offset, [b, l], &device);
        let keys = self.update_cache(k, v, query_segments, forget_rows, cache);
        let (q, k) = self
            .encoding
            .rotate(q, keys.k, offset, positions, keys.segment_ids.as_ref());
        let keys = Keys { k, ..keys };
        let scale = (self.head_dim as f64).sqrt().recip();
        // The scale goes on the queries (`rows × d_head` values) rather than on the logits
        // (`rows × keys`): the same scaled logits, one pass fewer over the larger tensor.
        let queries = Queries {
            scaled: (fused == Fused::No).then(|| q.clone() * scale),
            q,
            scale,
        };
        let outputs: Vec<_> = self
            .spans_from(first, offset, l, keys.k.dims()[2], positions)
            .into_iter()
            .map(|(r0, span)| self.attend_chunk(&queries, &keys, r0, &span, fused, &device))
            .collect();
        self.project_chunks(outputs)
    }

    /// QK-norm and temperature tuning, where the layer has them: the queries and keys scaled
    /// before the cache and the rotary hook (the cache holds normalised keys; the rotation
    /// keeps lengths). `offset` is the token index of the first row.
    pub(super) fn normalise_qk(
        &self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        offset: usize,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let (q, k) = match &self.qk_norm {
            Some(_) => qk_normalise(q, k, self.qk_gain.as_ref()),
            None => (q, k),
        };
        let q = match &self.temperature {
            Some(t) => {
                let len = q.dims()[2];
                let factors = t.factors(offset, len, &q.device());
                q * factors
            }
            None => q,
        };
        (q, k)
    }

    /// Forgetting attention: the rows' cumulative log forget gates `[batch, heads, seq]`, from
    /// this layer's input, continuing the cache's; `None` for every other encoding.
    fn forget_sums(&self, x: Tensor<B, 3>, cache: Option<&KvCache<B>>) -> Option<Tensor<B, 3>> {
        self.encoding.forget_gate().map(|fox| {
            let carried = cache.and_then(|c| c.last_forget_sum());
            fox.cumulative(x, carried)
        })
    }

    /// Queries, keys and values `[batch, heads, seq, d_head]` of `x: [batch, seq, d_model]`:
    /// one projection to `[batch, seq, 3·heads, d_head]` (q's heads, then k's, then v's), of
    /// which each part is a view (no copy) that the fused kernel reads through its strides.
    pub(super) fn project_qkv(&self, x: Tensor<B, 3>) -> [Tensor<B, 4>; 3] {
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

    /// The output projection of the heads side by side, `[batch, seq, heads, d_head]` →
    /// `[batch, seq, d_model]`.
    fn project_out(&self, heads: Tensor<B, 4>) -> Tensor<B, 3> {
        let [b, l, h, dh] = heads.dims();
        linear_layer(&self.output, heads.reshape([b, l, h * dh]))
    }

    /// [`Self::project_out`] of the query chunks' outputs `[batch, rows, heads, d_head]`, in
    /// order, joined along the sequence.
    pub(super) fn project_chunks(&self, chunks: Vec<Tensor<B, 4>>) -> Tensor<B, 3> {
        let heads = if chunks.len() == 1 {
            chunks.into_iter().next().expect("one chunk")
        } else {
            Tensor::cat(chunks, 1)
        };
        self.project_out(heads)
    }

    /// The whole sequence through the fused kernel over the packed projection, its backward
    /// pass writing the packed gradient at once: `[batch, seq, heads, d_head]`, or `None` where
    /// the encoding's bias needs the tensor path.
    fn attend_packed(
        &self,
        qkv: Tensor<B, 4>,
        positions: Option<&Positions>,
        forget_rows: Option<&Tensor<B, 3>>,
        device: &B::Device,
    ) -> Option<Tensor<B, 4>> {
        let l = qkv.dims()[1];
        let span = Span {
            query_start: 0,
            query_len: l,
            key_len: l,
            causal: self.causal,
            positions: positions.cloned(),
        };
        let gate = forget_rows.map(|f| Fox::bias(f.clone(), f.clone()));
        let scale = (self.head_dim as f64).sqrt().recip();
        match self.fused_bias(&span, gate.as_ref(), device) {
            Some(bias) => attention_packed(
                qkv,
                self.n_heads,
                bias,
                scale as f32,
                self.causal.then_some(0),
            ),
            None => {
                self.dape_attention(Qkv::Packed(&qkv), gate.as_ref(), None, &span, scale as f32)
            }
        }
    }

    /// BiPE: the segment indices `[batch, seq]` of the query rows (without any, each token is
    /// its own segment, its index its position); `None` for every other encoding.
    fn query_segments(
        &self,
        segments: Option<Tensor<B, 2, Int>>,
        offset: usize,
        [b, l]: [usize; 2],
        device: &B::Device,
    ) -> Option<Tensor<B, 2, Int>> {
        (self.encoding.hook() == Hook::Segments).then(|| {
            segments.unwrap_or_else(|| {
                Tensor::<B, 1, Int>::arange(offset as i64..(offset + l) as i64, device)
                    .reshape([1, l])
                    .expand([b, l])
            })
        })
    }

    /// The cache update: appends this pass's keys, values, key segments and forget sums to the
    /// cache (if any) and returns all of them, cached first.
    fn update_cache(
        &self,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        query_segments: Option<Tensor<B, 2, Int>>,
        forget_rows: Option<Tensor<B, 3>>,
        cache: Option<&mut KvCache<B>>,
    ) -> Keys<B> {
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
        Keys {
            k,
            v,
            segment_ids,
            forget_rows,
            forget_keys,
        }
    }

    /// The chunks of query rows: each chunk's first row (counted in this pass) and its span,
    /// whose keys end at its last row under the causal mask (plus the one column DAPE V2's
    /// rows read past it) and at `keys` otherwise.
    pub(super) fn chunk_spans(
        &self,
        offset: usize,
        l: usize,
        keys: usize,
        positions: Option<&Positions>,
    ) -> Vec<(usize, Span)> {
        self.spans_from(0, offset, l, keys, positions)
    }

    /// [`Self::chunk_spans`] of rows `first .. l` only (the rows before `first` attend to
    /// nothing: their keys and values still reach the cache).
    pub(super) fn spans_from(
        &self,
        first: usize,
        offset: usize,
        l: usize,
        keys: usize,
        positions: Option<&Positions>,
    ) -> Vec<(usize, Span)> {
        let chunk = if self.chunk_size == 0 {
            l
        } else {
            self.chunk_size
        };
        self.spans_of(first, chunk, offset, l, keys, positions)
    }

    /// [`Self::chunk_spans`] with `chunk` rows per chunk (the last may have fewer).
    pub(super) fn spans_every(
        &self,
        chunk: usize,
        offset: usize,
        l: usize,
        keys: usize,
        positions: Option<&Positions>,
    ) -> Vec<(usize, Span)> {
        self.spans_of(0, chunk, offset, l, keys, positions)
    }

    /// Chunks of `chunk` rows over rows `first .. l` of this pass (the last may have fewer).
    fn spans_of(
        &self,
        first: usize,
        chunk: usize,
        offset: usize,
        l: usize,
        keys: usize,
        positions: Option<&Positions>,
    ) -> Vec<(usize, Span)> {
        let lookahead = usize::from(self.encoding.reads_next_column());
        (first..l)
            .step_by(chunk.max(1))
            .map(|r0| {
                let rows = chunk.min(l - r0);
                let span = Span {
                    query_start: offset + r0,
                    query_len: rows,
                    key_len: if self.causal {
                        (offset + r0 + rows + lookahead).min(keys)
                    } else {
                        keys
                    },
                    causal: self.causal,
                    positions: positions.cloned(),
                };
                (r0, span)
            })
            .collect()
    }

    /// One chunk of query rows from row `r0`: `[batch, rows, heads, d_head]`, through the
    /// fused kernel where it applies, else the logit hook, the normaliser and the product
    /// with V on the tensor path.
    fn attend_chunk(
        &self,
        queries: &Queries<B>,
        keys: &Keys<B>,
        r0: usize,
        span: &Span,
        fused: Fused,
        device: &B::Device,
    ) -> Tensor<B, 4> {
        let rows = span.query_len;
        let qc = narrow_rows(&queries.q, r0, rows);
        let kc = narrow_rows(&keys.k, 0, span.key_len);
        let vc = narrow_rows(&keys.v, 0, span.key_len);
        let gate = keys
            .forget_rows
            .as_ref()
            .zip(keys.forget_keys.as_ref())
            .map(|(fr, fk)| {
                Fox::bias(
                    fr.clone().narrow(2, r0, rows),
                    fk.clone().narrow(2, 0, span.key_len),
                )
            });
        let causal_from = span.causal.then_some(span.query_start);
        let scale = queries.scale as f32;
        let ssmax = self
            .ssmax
            .as_ref()
            .filter(|_| fused != Fused::No)
            .map(|s| ssmax_factor(s.val(), span, device));
        let kernel = match (fused, &self.stick_breaking) {
            (Fused::Softmax, _) => match self.fused_bias(span, gate.as_ref(), device) {
                Some(bias) => {
                    let (qs, bias) = ssmax_scaled(&qc, bias, ssmax.as_ref());
                    attention(qs, kc.clone(), vc.clone(), bias, scale, causal_from)
                }
                None => self.dape_attention(
                    Qkv::Separate([&qc, &kc, &vc]),
                    gate.as_ref(),
                    ssmax.as_ref(),
                    span,
                    scale,
                ),
            },
            (Fused::Sticks, Some(sb)) => {
                let sticks = Sticks {
                    query_start: span.query_start,
                    causal: span.causal,
                    attend_current: sb.attend_current,
                };
                self.fused_bias(span, gate.as_ref(), device)
                    .and_then(|bias| {
                        let (qs, bias) = ssmax_scaled(&qc, bias, ssmax.as_ref());
                        stick_breaking_attention(qs, kc.clone(), vc.clone(), bias, scale, sticks)
                    })
            }
            _ => None,
        };
        path_stats::record(kernel.is_some());
        if let Some(out) = kernel {
            return out;
        }
        let ids = keys.segment_ids.as_ref().map(|s| SegmentIds {
            query: s.query.clone().narrow(1, r0, rows),
            key: s.key.clone().narrow(1, 0, span.key_len),
        });
        let q_scaled = queries
            .scaled
            .clone()
            .unwrap_or_else(|| queries.q.clone() * queries.scale);
        let scaled_logits = batched_matmul(q_scaled.narrow(2, r0, rows), kc.clone().transpose());
        let logits = self.logits(scaled_logits, qc, kc, span, ids.as_ref(), gate);
        let probs = self.normalise(logits, span, device);
        batched_matmul(probs, vc).swap_dims(1, 2)
    }

    /// The logit hook: the encoding's adjustment of the scaled logits `QKᵀ/√d_head`
    /// `[batch, heads, rows, keys]` of `span` (a bias, Shaw, CoPE, DAPE), then forgetting
    /// attention's gate `D` where the encoding has one.
    fn logits(
        &self,
        scaled: Tensor<B, 4>,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        span: &Span,
        ids: Option<&SegmentIds<B>>,
        gate: Option<Tensor<B, 4>>,
    ) -> Tensor<B, 4> {
        let logits = self.encoding.adjust_logits(scaled, q, k, span, ids);
        match gate {
            Some(g) => self.encoding.adjust_logits_gated(logits, g, span),
            None => logits,
        }
    }

    /// The normaliser: Scalable-Softmax's factor (if the layer has it), then stick-breaking
    /// (if the layer has it), else the causal mask and the softmax over the keys, one fused
    /// pass on ndarray and LibTorch, else the tensor path. `[batch, heads, rows, keys]`
    /// weights.
    pub(super) fn normalise(
        &self,
        logits: Tensor<B, 4>,
        span: &Span,
        device: &B::Device,
    ) -> Tensor<B, 4> {
        let logits = match &self.ssmax {
            Some(s) => logits * ssmax_factor(s.val(), span, device),
            None => logits,
        };
        let logits = match self.sliding_window {
            Some(w) => {
                let [b, h, rows, keys] = logits.dims();
                let outside = span
                    .offsets::<B>(device)
                    .abs()
                    .greater_equal_elem(w as i64)
                    .unsqueeze::<4>()
                    .expand([b, h, rows, keys]);
                logits.mask_fill(outside, f32::NEG_INFINITY)
            }
            None => logits,
        };
        if let Some(sb) = &self.stick_breaking {
            return stick_breaking_weights(logits, span, sb);
        }
        let causal_from = span.causal.then_some(span.query_start);
        match fused_softmax(logits, causal_from) {
            Ok(probs) => probs,
            Err(mut logits) => {
                if span.has_future() {
                    let [b, h, rows, keys] = logits.dims();
                    let mask = span
                        .future_mask::<B>(&logits.device())
                        .unsqueeze::<4>()
                        .expand([b, h, rows, keys]);
                    logits = logits.mask_fill(mask, f32::NEG_INFINITY);
                }
                softmax(logits, 3)
            }
        }
    }

    /// DAPE (V1 over a bias, NoPE or forgetting attention's gate `D`; V2 over a bias or NoPE)
    /// and the attention around it in one kernel, `[batch, rows, heads,
    /// d_v]`, over separate q, k, v or the packed projection of the whole sequence, with
    /// Scalable-Softmax's factors `ssmax` `[1, heads, rows, 1]` where the layer has them;
    /// `None` for every other encoding or where no kernel applies ([`tile_attention`]).
    fn dape_attention(
        &self,
        qkv: Qkv<'_, B>,
        gate: Option<&Tensor<B, 4>>,
        ssmax: Option<&Tensor<B, 4>>,
        span: &Span,
        scale: f32,
    ) -> Option<Tensor<B, 4>> {
        let (f, map): (&dyn TiledCorrection<B>, _) = match (&self.encoding, gate) {
            (PositionalEncoding::Dape(d), _) => (d, None),
            // In training too: since the tile's backward rows form `Z` from the hidden values
            // they recompute anyway, DAPE V2 trains in the tile as fast as on its own node
            // beside the fused softmax, in 30% less memory at 512 x 4 (`docs/src/performance.md`).
            (PositionalEncoding::DapeV2(d), _) => (d, None),
            (PositionalEncoding::DapeFox(d), Some(g)) => (&d.dape, Some(g.clone())),
            _ => return None,
        };
        let row_scale = ssmax.map(|c| c.clone().reshape([self.n_heads, span.query_len]));
        let qkv = match (qkv, &row_scale) {
            (Qkv::Separate([q, k, v]), _) => TileQkv::Separate([q.clone(), k.clone(), v.clone()]),
            (Qkv::Packed(t), None) => whole_sequence(t.clone(), span)?,
            (Qkv::Packed(_), Some(_)) => return None,
        };
        tile_attention(f, qkv, map, row_scale, span, scale, ATTENTION_TILE)
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
}
