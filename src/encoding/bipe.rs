//! BiPE, bilevel positional encoding (He et al., ICML 2024, "Two Stones Hit One Bird: Bilevel
//! Positional Encoding for Better Length Extrapolation").
//!
//! The text is cut into segments at boundary tokens (by default the bytes of `\n` and `.`, the
//! paper's choice for natural language). Each token gets
//!
//! * an **intra-segment** position `p_t`, its offset inside its segment (0 at the first token
//!   after a boundary), encoded absolutely: the sinusoidal vector of `p_t` (Vaswani et al.,
//!   2017) is added to the token embedding, so it extrapolates to long segments; and
//! * an **inter-segment** index `s_t`, the number of boundary tokens before it, on which a
//!   relative encoding acts instead of the token position: BiPE-ALiBi adds
//!   `-m_h · |s_i - s_j|` to the logits; BiPE-RoPE rotates `q_i` by `s_i` and `k_j` by `s_j`.
//!
//! A boundary token is the last token of its segment: `s` and `p` of a token depend only on the
//! tokens before it, so the encoding is causal, and a boundary at position `t` changes nothing
//! at positions `<= t`. For incremental decoding the model carries a [`SegmentState`] (per batch
//! row: the segment index and in-segment position the next token gets) in the KV cache, and the
//! attention layers cache the keys' segment indices, so decoding is exact.

use burn::prelude::*;

use super::absolute::{Sinusoidal, SinusoidalConfig};
use super::bias::{Alibi, AlibiConfig};
use super::default_from_new;
use super::rotary::{RopeConfig, RopeScaling, Rotary};
use crate::error::{ensure, Error, Result};

/// Configuration of BiPE's segmentation and intra-segment encoding, shared by `bipe_alibi` and
/// `bipe_rope`.
#[derive(Config, Debug, PartialEq)]
pub struct BipeConfig {
    /// Token ids that end a segment. The default, newline (10) and full stop (46), is for the
    /// bytes tokenizer; set the ids of your tokenizer's boundary tokens otherwise.
    #[config(default = "vec![10, 46]")]
    pub boundary_tokens: Vec<i64>,
    /// Wavelength base of the sinusoidal intra-segment positions.
    #[config(default = 10000.0)]
    pub base: f64,
}
default_from_new!(BipeConfig);

/// Which relative encoding acts on the segment indices.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum BipeInter<B: Backend> {
    /// ALiBi over segment indices: `-m_h · |s_i - s_j|`.
    Alibi(Alibi<B>),
    /// RoPE over segment indices (no frequency scaling).
    Rope(Rotary),
}

/// Per-token segment indices and in-segment positions, `[batch, seq]` each.
#[derive(Clone, Debug)]
pub struct Segments<B: Backend> {
    /// Segment index `s_t` (number of boundary tokens before `t`, plus the carried index).
    pub index: Tensor<B, 2, Int>,
    /// Position `p_t` inside the segment (0 at a segment's first token).
    pub position: Tensor<B, 2, Int>,
}

/// Segment indices of the query rows and key columns of one attention block:
/// `query: [batch, seq_q]`, `key: [batch, seq_k]`.
#[derive(Clone, Debug)]
pub struct SegmentIds<B: Backend> {
    /// Segment index of each query row.
    pub query: Tensor<B, 2, Int>,
    /// Segment index of each key column.
    pub key: Tensor<B, 2, Int>,
}

/// Where each batch row stands after the tokens seen so far: the segment index and in-segment
/// position that the next token gets. Carried by the KV cache.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SegmentState {
    /// Next segment index, one per batch row.
    pub next_index: Vec<i64>,
    /// Next in-segment position, one per batch row.
    pub next_position: Vec<i64>,
}

impl BipeConfig {
    fn check(&self, d_model: usize) -> Result<Sinusoidal> {
        ensure(
            !self.boundary_tokens.is_empty(),
            "boundary_tokens",
            "[]",
            "BiPE needs at least one segment boundary token",
        )?;
        if let Some(bad) = self.boundary_tokens.iter().find(|t| **t < 0) {
            return Err(Error::invalid(
                "boundary_tokens",
                bad,
                "token ids are not negative",
            ));
        }
        SinusoidalConfig::new().with_base(self.base).init(d_model)
    }

    /// BiPE-ALiBi for `n_heads` heads of size `head_dim`.
    pub fn init_alibi<B: Backend>(
        &self,
        alibi: &AlibiConfig,
        n_heads: usize,
        head_dim: usize,
        device: &B::Device,
    ) -> Result<Bipe<B>> {
        Ok(Bipe {
            intra: self.check(n_heads * head_dim)?,
            boundary_tokens: self.boundary_tokens.clone(),
            inter: BipeInter::Alibi(alibi.init(n_heads, device)?),
        })
    }

    /// BiPE-RoPE for heads of size `head_dim` (`n_heads · head_dim` features).
    pub fn init_rope<B: Backend>(
        &self,
        rope: &RopeConfig,
        n_heads: usize,
        head_dim: usize,
    ) -> Result<Bipe<B>> {
        Ok(Bipe {
            intra: self.check(n_heads * head_dim)?,
            boundary_tokens: self.boundary_tokens.clone(),
            inter: BipeInter::Rope(rope.init(head_dim, RopeScaling::None)?),
        })
    }
}

/// BiPE, see the module docs. Holds no trainable parameters.
#[derive(Module, Debug)]
pub struct Bipe<B: Backend> {
    /// Sinusoidal table of the intra-segment positions (width `d_model`).
    pub intra: Sinusoidal,
    /// Token ids that end a segment.
    #[module(skip)]
    pub boundary_tokens: Vec<i64>,
    /// The relative encoding over segment indices.
    pub inter: BipeInter<B>,
}

impl<B: Backend> Bipe<B> {
    /// Whether the relative part acts on the logits (BiPE-ALiBi) rather than rotating q and k
    /// (BiPE-RoPE).
    pub fn acts_on_logits(&self) -> bool {
        matches!(self.inter, BipeInter::Alibi(_))
    }

    /// Segments of `tokens: [batch, seq]` continuing `carried` (a fresh start when `None`),
    /// and the state after them. Computed on the host from the token ids.
    pub fn segment(
        &self,
        tokens: &Tensor<B, 2, Int>,
        carried: Option<&SegmentState>,
    ) -> Result<(Segments<B>, SegmentState)> {
        let [batch, len] = tokens.dims();
        let mut state = carried.cloned().unwrap_or_else(|| SegmentState {
            next_index: vec![0; batch],
            next_position: vec![0; batch],
        });
        if state.next_index.len() != batch || state.next_position.len() != batch {
            return Err(Error::InvalidInput(format!(
                "batch size {batch} does not match the carried segment state's {}",
                state.next_index.len()
            )));
        }
        let ids: Vec<i64> = tokens.to_data().iter::<i64>().collect();
        let mut index = Vec::with_capacity(batch * len);
        let mut position = Vec::with_capacity(batch * len);
        for (row, chunk) in ids.chunks(len).enumerate() {
            let (mut s, mut p) = (state.next_index[row], state.next_position[row]);
            for id in chunk {
                index.push(s);
                position.push(p);
                if self.boundary_tokens.contains(id) {
                    s += 1;
                    p = 0;
                } else {
                    p += 1;
                }
            }
            state.next_index[row] = s;
            state.next_position[row] = p;
        }
        let device = tokens.device();
        let tensor = |v: Vec<i64>| -> Tensor<B, 2, Int> {
            Tensor::from_data(TensorData::new(v, [batch, len]), &device)
        };
        Ok((
            Segments {
                index: tensor(index),
                position: tensor(position),
            },
            state,
        ))
    }

    /// `x: [batch, seq, d_model]` plus the sinusoidal vectors of the in-segment positions.
    pub fn embed(&self, x: Tensor<B, 3>, segments: &Segments<B>) -> Tensor<B, 3> {
        let [batch, len, d] = x.dims();
        let max = segments
            .position
            .clone()
            .max()
            .into_scalar()
            .elem::<i64>()
            .max(0) as usize;
        let table = self.intra.table::<B>(0, max + 1, &x.device());
        let rows = table
            .select(0, segments.position.clone().reshape([batch * len]))
            .reshape([batch, len, d]);
        x + rows
    }

    /// BiPE-RoPE: rotates `q` by the query rows' segment indices and `k` by the keys'.
    /// Identity for BiPE-ALiBi.
    pub fn rotate(
        &self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        ids: &SegmentIds<B>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        match &self.inter {
            BipeInter::Rope(r) => r.forward_at(q, k, ids.query.clone(), ids.key.clone()),
            BipeInter::Alibi(_) => (q, k),
        }
    }

    /// BiPE-ALiBi: `logits - m_h · |s_i - s_j|` for `logits: [batch, heads, seq_q, seq_k]`.
    /// Identity for BiPE-RoPE.
    pub fn adjust_logits(&self, logits: Tensor<B, 4>, ids: &SegmentIds<B>) -> Tensor<B, 4> {
        match &self.inter {
            BipeInter::Alibi(a) => {
                let [b, lq] = ids.query.dims();
                let lk = ids.key.dims()[1];
                let h = a.slopes.dims()[0];
                let distance = (ids.query.clone().reshape([b, 1, lq, 1])
                    - ids.key.clone().reshape([b, 1, 1, lk]))
                .abs()
                .float();
                logits - distance * a.slopes.clone().reshape([1, h, 1, 1])
            }
            BipeInter::Rope(_) => logits,
        }
    }
}
