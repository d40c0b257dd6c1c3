//! DAPE's correction `f` as the attention tile runs it, [`Correction`]: DAPE V1's MLP over each
//! (query, key) pair or DAPE V2's two convolutions along each row of keys. Both read one query
//! row's keys at a time, so the tile (`attention.rs`) holds whole rows of keys and is the same
//! for both: it calls [`Correction::forward`] for `Z` and [`Correction::backward`] for `dS`,
//! the bias block's gradient and `f`'s four weight gradients.

use super::backward::ZGrad;
use super::distance_half::DistanceHalf;
use super::v1::{dape_v1_rows, Mlp};
use super::v1_backward::{dape_v1_backward, V1Grads};
use super::v2::{dape_v2, KeyConvs};
use super::v2_backward::{dape_v2_backward, V2Grads};
use crate::encoding::Span;

/// `f`'s weights on the host.
#[derive(Clone, Debug)]
pub(crate) enum Correction {
    /// DAPE V1: `Linear(C → D) → LeakyReLU → Linear(D → H)` per pair.
    V1(Mlp),
    /// DAPE V2: `Conv(1 × k, C → D) → LeakyReLU → Conv(1 × k, D → H)` along the keys.
    V2(KeyConvs),
}

/// The gradients of one block through [`Correction::backward`].
pub(crate) struct CorrectionGrads {
    /// The logits' `[batch, H, rows, keys]`.
    pub logits: Vec<f32>,
    /// The bias block's (its shape); `None` without a bias.
    pub bias: Option<Vec<f32>>,
    /// `f`'s first weight, first bias, second weight and second bias, row-major in the
    /// layouts of [`Correction::weight_sizes`].
    pub weights: [Vec<f32>; 4],
}

impl Correction {
    /// `Z = logits + bias + f(..)` for a block `logits: [batch, H, rows, keys]` and its rows
    /// of the bias map (`[1 or batch, H, rows, keys]`; `None` over NoPE). Keys after a causal
    /// row's position get `logits + bias` only. `distance`: DAPE V1's first layer reads the
    /// bias's half from that table (a bias of the distance alone; V2 ignores it).
    pub(crate) fn forward(
        &self,
        logits: Vec<f32>,
        bias: Option<&[f32]>,
        dims: [usize; 4],
        span: &Span,
        distance: Option<&DistanceHalf>,
    ) -> Vec<f32> {
        match self {
            Self::V1(mlp) => dape_v1_rows(logits, bias, dims, span, mlp, distance),
            Self::V2(convs) => dape_v2(logits, bias, dims, span, convs),
        }
    }

    /// The backward pass of [`Self::forward`] for the gradient `grad` of `Z`, given or formed
    /// from `Z` row by row by the tile's softmax backward (the hidden values are recomputed
    /// from `logits` and `bias`).
    pub(crate) fn backward(
        &self,
        logits: &[f32],
        bias: Option<&[f32]>,
        grad: ZGrad,
        dims: [usize; 4],
        span: &Span,
    ) -> CorrectionGrads {
        match self {
            Self::V1(mlp) => {
                let V1Grads {
                    logits,
                    bias,
                    w1t,
                    b1,
                    w2t,
                    b2,
                } = dape_v1_backward(logits, bias, grad, dims, span, mlp);
                CorrectionGrads {
                    logits,
                    bias,
                    weights: [w1t, b1, w2t, b2],
                }
            }
            Self::V2(convs) => {
                let V2Grads {
                    logits,
                    bias,
                    w1,
                    b1,
                    w2,
                    b2,
                } = dape_v2_backward(logits, bias, grad, dims, span, convs);
                CorrectionGrads {
                    logits,
                    bias,
                    weights: [w1, b1, w2, b2],
                }
            }
        }
    }

    /// The sizes of `f`'s four tensors: `[C · D, D, D · H, H]` for V1 (Burn's `Linear`
    /// layouts `[C, D]` and `[D, H]`), `[D · C · k, D, H · D · k, H]` for V2 (`Conv2d`'s
    /// `[D, C, 1, k]` and `[H, D, 1, k]`).
    pub(crate) fn weight_sizes(&self) -> [usize; 4] {
        match self {
            Self::V1(Mlp { c, d, h, .. }) => [c * d, *d, d * h, *h],
            Self::V2(KeyConvs {
                dims: [c, d, h, k], ..
            }) => [d * c * k, *d, h * d * k, *h],
        }
    }
}
