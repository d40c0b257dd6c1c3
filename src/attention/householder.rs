//! The attention layer's forward pass for PaTH ([`Hook::Householder`]): the logits come from
//! the blockwise products of [`householder`](crate::encoding::householder) rather than from
//! `QKᵀ`, and the KV cache holds keys carried through every cached token's transform.
//!
//! The steps: the transforms `w, β` from the layer's input (continuing the cache's convolution
//! inputs), the QKV projection (QK-norm and temperature tuning where the layer has them), the
//! blocks of the new tokens, the cache update, then per chunk of query rows the logits
//! `q_iᵀ H_i ⋯ H_{j+1} k_j / √d` (PaTH-FoX adds its gate's sums before the scale, as fla;
//! `dape_path` then adds DAPE's `f` of the scaled logits), the normaliser and the product with V.
//!
//! [`Hook::Householder`]: crate::encoding::Hook::Householder

use burn::prelude::*;

use super::{path_stats, KvCache, MultiHeadAttention};
use crate::encoding::householder::{bidirectional_logits, Blocks};
use crate::encoding::{Fox, Path, Span};
use crate::kernel::batched_matmul;

/// Rows `r0 .. r0 + span.query_len` and keys `0 .. span.key_len` of `logits: [g, rows, keys]`
/// (no copy where they are all of it).
fn rows_and_keys<B: Backend>(logits: Tensor<B, 3>, r0: usize, span: &Span) -> Tensor<B, 3> {
    let [_, rows, keys] = logits.dims();
    let logits = if r0 == 0 && span.query_len == rows {
        logits
    } else {
        logits.narrow(1, r0, span.query_len)
    };
    if span.key_len == keys {
        logits
    } else {
        logits.narrow(2, 0, span.key_len)
    }
}

/// The first `keys` entries along dim 2 of `t: [batch, heads, keys', ·]` (no slice where
/// that is all of it: a slice's backward pass writes a zero-filled copy of the whole).
fn first_keys<B: Backend, const D: usize>(t: Tensor<B, D>, keys: usize) -> Tensor<B, D> {
    if t.dims()[2] == keys {
        t
    } else {
        t.narrow(2, 0, keys)
    }
}

/// `[batch, heads, seq, d]` → `[batch·heads, seq, d]`.
fn fold<B: Backend>(t: Tensor<B, 4>) -> Tensor<B, 3> {
    let [b, h, l, d] = t.dims();
    t.reshape([b * h, l, d])
}

impl<B: Backend> MultiHeadAttention<B> {
    /// Self-attention over `x: [batch, seq, d_model]` with PaTH's transforms `path`, continuing
    /// and updating `cache` (causal layers only; the caller checks).
    pub(super) fn attend_householder(
        &self,
        path: &Path<B>,
        x: Tensor<B, 3>,
        cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        let [b, l, _] = x.dims();
        let h = self.n_heads;
        let device = x.device();
        let offset = cache.as_deref().map_or(0, |c| c.len());
        let (cached_keys, conv_tail) = cache
            .as_deref()
            .map_or((None, None), |c| c.householder_state());
        let forget_rows = path.forget_gate().map(|fox| {
            let carried = cache.as_deref().and_then(|c| c.last_forget_sum());
            fox.cumulative(x.clone(), carried)
        });
        let transforms = path.transforms(x.clone(), conv_tail);
        let [q, k, v] = self.project_qkv(x);
        let (q, k) = self.normalise_qk(q, k, offset);
        let (q, k, w) = (fold(q), fold(k), fold(transforms.w));
        let beta = transforms.beta.reshape([b * h, l]);
        let cached = cached_keys.map(fold);
        let bidirectional = (!self.causal).then(|| {
            bidirectional_logits(q.clone(), k.clone(), w.clone(), beta.clone(), path.block)
        });
        let blocks = self.causal.then(|| Blocks::new(q, k, w, beta, path.block));
        let (values, forget_keys) = match cache {
            Some(c) => {
                let blocks = blocks.as_ref().expect("a cache needs a causal layer");
                let carried = blocks.carry_keys(cached.clone());
                let total = carried.dims()[1];
                let carried = carried.reshape([b, h, total, self.head_dim]);
                let values = c.store_householder(carried, v, transforms.conv_tail);
                let forget_keys = forget_rows.clone().map(|f| c.append_forget_sums(f));
                (values, forget_keys)
            }
            None => (v, forget_rows.clone()),
        };
        let scale = (self.head_dim as f64).sqrt().recip();
        // The chunks of query rows with their logits `[b·h, rows, keys]`, made lazily: causal,
        // one query block's logits at a time (split further where the layer's chunk is
        // smaller); bidirectional, rows of the whole matrix.
        let chunks: Box<dyn Iterator<Item = (usize, Span, Tensor<B, 3>)> + '_> =
            match (&blocks, bidirectional) {
                (Some(blocks), _) => {
                    let c = blocks.block_size();
                    let sub = match self.chunk_size {
                        0 => c,
                        chunk => chunk.min(c),
                    };
                    Box::new(blocks.block_rows(cached.as_ref()).enumerate().flat_map(
                        move |(i, row)| {
                            let (start, rows) = (i * c, row.dims()[1]);
                            self.spans_every(sub, offset + start, rows, offset + start + rows, None)
                                .into_iter()
                                .map(move |(r, span)| {
                                    let logits = rows_and_keys(row.clone(), r, &span);
                                    (start + r, span, logits)
                                })
                        },
                    ))
                }
                (None, Some(all)) => Box::new(
                    self.chunk_spans(offset, l, offset + l, None)
                        .into_iter()
                        .map(move |(r0, span)| {
                            let logits = rows_and_keys(all.clone(), r0, &span);
                            (r0, span, logits)
                        }),
                ),
                (None, None) => unreachable!("causal or bidirectional"),
            };
        let outputs: Vec<Tensor<B, 4>> = chunks
            .map(|(r0, span, logits)| {
                path_stats::record(false);
                let rows = span.query_len;
                let keys = span.key_len;
                let logits = logits.reshape([b, h, rows, keys]);
                let logits = match (&forget_rows, &forget_keys) {
                    (Some(fr), Some(fk)) => {
                        logits
                            + Fox::bias(
                                fr.clone().narrow(2, r0, rows),
                                first_keys(fk.clone(), keys),
                            )
                    }
                    _ => logits,
                };
                let scaled = logits * scale;
                let scaled = match &path.dape {
                    Some(dape) => dape.forward(scaled, &span),
                    None => scaled,
                };
                let probs = self.normalise(scaled, &span, &device);
                batched_matmul(probs, first_keys(values.clone(), keys)).swap_dims(1, 2)
            })
            .collect();
        self.project_chunks(outputs)
    }
}
