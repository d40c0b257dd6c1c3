//! The hooks of [`PositionalEncoding`] that the attention layer calls, each the identity for
//! the encodings that do not act there: on the embeddings ([`PositionalEncoding::embed`]), on
//! q and k ([`PositionalEncoding::rotate`]), on the scaled logits
//! ([`PositionalEncoding::adjust_logits`], [`PositionalEncoding::additive_logit_bias`]), with the
//! layer's input (forgetting attention's [`PositionalEncoding::adjust_logits_gated`]) and with
//! the token ids (BiPE's [`PositionalEncoding::segments`]).

use burn::prelude::*;

use super::{Fox, Hook, PositionalEncoding, Positions, SegmentIds, SegmentState, Segments, Span};
use crate::error::{Error, Result};

impl<B: Backend> PositionalEncoding<B> {
    /// Where this encoding acts.
    pub fn hook(&self) -> Hook {
        match self {
            Self::Nope(_) => Hook::None,
            Self::Sinusoidal(_) | Self::Learned(_) => Hook::Embedding,
            Self::Rotary(_) => Hook::Rotary,
            Self::Bipe(_) => Hook::Segments,
            Self::Fox(_) | Self::DapeFox(_) => Hook::InputGate,
            Self::Path(_) => Hook::Householder,
            _ => Hook::Logits,
        }
    }

    /// The forget gate whose cumulative sums over the layer's input make the bias of
    /// forgetting attention (`fox`, `dape_fox`); `None` for every other encoding.
    pub fn forget_gate(&self) -> Option<&Fox<B>> {
        match self {
            Self::Fox(f) => Some(f),
            Self::DapeFox(d) => Some(&d.fox),
            _ => None,
        }
    }

    /// The input-gate hook: adds forgetting attention's bias `gate` `[batch, heads, rows, keys]`
    /// (from [`Fox::bias`] over [`Self::forget_gate`]'s sums) to the scaled logits of `span`'s
    /// rows and keys, or DAPE over it for `dape_fox`. Identity for every other encoding.
    pub fn adjust_logits_gated(
        &self,
        logits: Tensor<B, 4>,
        gate: Tensor<B, 4>,
        span: &Span,
    ) -> Tensor<B, 4> {
        match self {
            Self::Fox(_) => logits + gate,
            Self::DapeFox(d) => d.forward(logits, gate, span),
            _ => logits,
        }
    }

    /// PaTH's transforms (the Householder hook); `None` for every other encoding.
    pub fn householder(&self) -> Option<&super::Path<B>> {
        match self {
            Self::Path(p) => Some(p),
            _ => None,
        }
    }

    /// Whether the logits of row `i` depend on key column `i + 1` existing (DAPE V2 in the
    /// reference's form). The chunked attention path then keeps one extra (masked) column per
    /// chunk so that it stays equal to the unchunked forward.
    pub fn reads_next_column(&self) -> bool {
        matches!(self, Self::DapeV2(d) if d.reads_next_column())
    }

    /// The token-id hook: BiPE's segments of `tokens: [batch, seq]`, continuing `carried` (the
    /// state a KV cache holds; `None` starts fresh), and the state after them. `None` for every
    /// other encoding.
    pub fn segments(
        &self,
        tokens: &Tensor<B, 2, Int>,
        carried: Option<&SegmentState>,
    ) -> Result<Option<(Segments<B>, SegmentState)>> {
        match self {
            Self::Bipe(b) => b.segment(tokens, carried).map(Some),
            _ => Ok(None),
        }
    }

    /// Whether this encoding reads the tokens' positions, so that it can run at randomized
    /// [`Positions`] (see [`PositionalEncodingConfig::takes_randomized`]).
    ///
    /// [`PositionalEncodingConfig::takes_randomized`]: super::PositionalEncodingConfig::takes_randomized
    pub fn takes_positions(&self) -> bool {
        match self {
            Self::Sinusoidal(_)
            | Self::Learned(_)
            | Self::Rotary(_)
            | Self::Bias(_)
            | Self::Shaw(_)
            | Self::TransformerXl(_) => true,
            Self::Dape(d) => d.bias.is_some(),
            Self::DapeV2(d) => d.bias.is_some(),
            Self::Nope(_)
            | Self::Cope(_)
            | Self::Bipe(_)
            | Self::Fox(_)
            | Self::DapeFox(_)
            | Self::Path(_) => false,
        }
    }

    /// Adds the absolute positions of tokens `start .. start + seq` to embeddings
    /// `x: [batch, seq, d_model]`: token `t` at position `t`, or at `positions[t]`
    /// (randomized positions). BiPE adds its in-segment positions from `segments` (from
    /// [`Self::segments`]) instead. Identity for encodings that do not act on embeddings.
    pub fn embed(
        &self,
        x: Tensor<B, 3>,
        start: usize,
        positions: Option<&Positions>,
        segments: Option<&Segments<B>>,
    ) -> Result<Tensor<B, 3>> {
        let at = positions
            .map(|p| p.window(start, x.dims()[1]))
            .transpose()?;
        match (self, segments) {
            (Self::Sinusoidal(s), _) => Ok(match at {
                Some(at) => s.forward_at(x, at),
                None => s.forward(x, start),
            }),
            (Self::Learned(l), _) => match at {
                Some(at) => l.forward_at(x, at),
                None => l.forward(x, start),
            },
            (Self::Bipe(b), Some(segments)) => Ok(b.embed(x, segments)),
            (Self::Bipe(_), None) => Err(Error::InvalidInput(
                "BiPE needs the segments of the tokens to embed them".into(),
            )),
            _ => Ok(x),
        }
    }

    /// Whether [`rotate`](Self::rotate) changes q and k (rotary encodings, and BiPE's
    /// segment rotation).
    pub fn rotates(&self) -> bool {
        matches!(self, Self::Rotary(_) | Self::Bipe(_))
    }

    /// Rotates queries `q: [batch, heads, seq_q, d_head]` of tokens
    /// `q_start .. q_start + seq_q` and keys `k: [batch, heads, seq_k, d_head]` of tokens
    /// `0 .. seq_k`, token `t` at position `t` or at `positions[t]` (randomized positions; it
    /// needs an entry for every token); BiPE-RoPE rotates them by the segment indices in
    /// `segments`. Identity for non-rotary encodings.
    pub fn rotate(
        &self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        q_start: usize,
        positions: Option<&Positions>,
        segments: Option<&SegmentIds<B>>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        match (self, segments) {
            (Self::Rotary(r), _) => r.rotate_tokens(q, k, q_start, positions.map(|p| p.as_slice())),
            (Self::Bipe(b), Some(ids)) => b.rotate(q, k, ids),
            _ => (q, k),
        }
    }

    /// What the encoding does to the scaled logits, for a fused attention kernel that takes the
    /// bias apart from the logits ([`crate::kernel::attention`]): `Some(None)` when it leaves
    /// them alone (NoPE, absolute and rotary encodings), `Some(Some(bias))` when it adds a bias
    /// `[1, heads, rows, keys]` that reads neither q, k nor the logits (T5, ALiBi, Kerple, FIRE,
    /// Sandwich), and `None` when it needs the logits or the queries themselves (Shaw, CoPE,
    /// DAPE, Transformer-XL, BiPE): those take [`adjust_logits`](Self::adjust_logits).
    pub fn additive_logit_bias(
        &self,
        span: &Span,
        device: &B::Device,
    ) -> Option<Option<Tensor<B, 4>>> {
        match self {
            Self::Nope(_) | Self::Sinusoidal(_) | Self::Learned(_) | Self::Rotary(_) => Some(None),
            Self::Bias(b) => Some(Some(b.forward(span, device))),
            _ => None,
        }
    }

    /// Adds this encoding's terms to scaled logits `[batch, heads, seq_q, seq_k]` (before the
    /// causal mask). `q: [batch, heads, seq_q, d_head]` and `k: [batch, heads, seq_k, d_head]`
    /// are the (rotated) queries and keys of this block; `segments` the segment indices of its
    /// rows and columns (BiPE only).
    pub fn adjust_logits(
        &self,
        logits: Tensor<B, 4>,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        span: &Span,
        segments: Option<&SegmentIds<B>>,
    ) -> Tensor<B, 4> {
        match (self, segments) {
            (Self::Bias(b), _) => logits + b.forward(span, &q.device()),
            (Self::Shaw(s), _) => s.forward(logits, q, span),
            (Self::Cope(c), _) => c.forward(logits, q, span),
            (Self::Dape(d), _) => d.forward(logits, span),
            (Self::DapeV2(d), _) => d.forward(logits, span),
            (Self::TransformerXl(t), _) => t.forward(logits, q, k, span),
            (Self::Bipe(b), Some(ids)) => b.adjust_logits(logits, ids),
            _ => logits,
        }
    }
}
