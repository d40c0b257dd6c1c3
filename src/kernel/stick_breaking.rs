//! Stick-breaking attention's weights from the logits: which backend gets which kernel, and
//! the tensor path every other backend takes (and the kernel is tested against).
//!
//! For logits `z` `[batch, heads, rows, keys]` whose row `r` is the query of token
//! `i = query_start + r`, a stick broken outward from the query gives key `j`
//!
//! ```text
//! A_ij = exp(log σ(z_ij) − Σ_k softplus(z_ik))     over the stick's keys k nearer than j
//! ```
//!
//! Causal: one stick over the keys `j < i` (`j ≤ i` with `attend_current`), broken from `i − 1`
//! (or `i`) downwards. Bidirectional: that stick and a second over the keys `j > i` (`j ≥ i`),
//! broken upwards, each weighted ½. Keys off every stick get exactly 0.

use burn::prelude::*;
use burn::tensor::activation::relu;

use super::attention::operands_fit;

#[cfg(feature = "ndarray")]
use super::ndarray::{
    applies, applies_autodiff, attention_autodiff, attention_nd, stick_breaking_autodiff,
    stick_breaking_nd,
};

/// Where the rows of a block of logits sit, and which keys their sticks hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sticks {
    /// Token index of the first row's query.
    pub query_start: usize,
    /// One stick over the earlier keys (causal), or one on either side (bidirectional).
    pub causal: bool,
    /// Whether the query's own key is on its stick(s), breaking first.
    pub attend_current: bool,
}

/// The weights `[batch, heads, rows, keys]` of `logits` under `sticks` (see the module docs):
/// one pass forward and one backward (recomputing the weights) on ndarray, the tensor path
/// elsewhere.
pub fn stick_breaking<B: Backend>(logits: Tensor<B, 4>, sticks: Sticks) -> Tensor<B, 4> {
    #[cfg(feature = "ndarray")]
    if logits.dtype() == burn::tensor::DType::F32 {
        if applies::<B>() {
            if let Some(w) = stick_breaking_nd(logits.clone(), sticks) {
                return w;
            }
        } else if applies_autodiff::<B>() {
            if let Some(w) = stick_breaking_autodiff(logits.clone(), sticks) {
                return w;
            }
        }
    }
    stick_breaking_tensor(logits, sticks)
}

/// Whether [`stick_breaking_attention`] has a kernel for backend `B`: ndarray (f32), with or
/// without autodiff.
pub fn stick_breaking_attention_applies<B: Backend>() -> bool {
    #[cfg(feature = "ndarray")]
    if applies::<B>() || applies_autodiff::<B>() {
        return true;
    }
    false
}

/// Stick-breaking attention from the queries to the output in one node on ndarray:
/// `A · v` with `A` = [`stick_breaking`]`(scale · q kᵀ + bias, sticks)`, for `q`
/// `[batch, heads, rows, d_head]` (row `r` is the query of token `sticks.query_start + r`),
/// `k` `[batch, heads, keys, d_head]`, `v` `[batch, heads, keys, d_v]` and an optional additive
/// `bias` `[1 or batch, heads, rows, keys]`; the output is `[batch, rows, heads, d_v]`.
///
/// The softmax attention node's tile ([`crate::kernel::attention`]) with the sticks in place of
/// the mask and softmax: each head is one task, the logits and weights of a (batch, head) live
/// only while it is computed, and the backward pass recomputes them (the gradient of the
/// weights, `dA = dO · vᵀ`, goes through the sticks' scan from the far end). The node keeps
/// its inputs and output, no `[batch, heads, rows, keys]` tensor. `None` on other backends or
/// element types, or for mismatched shapes: the caller takes the tensor path (the logits,
/// [`stick_breaking`], the product with v).
pub fn stick_breaking_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    bias: Option<Tensor<B, 4>>,
    scale: f32,
    sticks: Sticks,
) -> Option<Tensor<B, 4>> {
    if !operands_fit(&q, &k, &v, bias.as_ref()) {
        return None;
    }
    #[cfg(feature = "ndarray")]
    {
        if applies::<B>() {
            return attention_nd(q, k, v, bias, scale, None, Some(sticks));
        }
        if applies_autodiff::<B>() {
            return attention_autodiff(q, k, v, bias, scale, None, Some(sticks));
        }
    }
    let _ = (scale, sticks);
    None
}

/// The tensor path of [`stick_breaking`]: stable `softplus` and `log σ`, and the sum over the
/// nearer keys as a cumulative sum running outward from the query (flip, cumsum, flip for the
/// earlier keys), so that the weights near the query never come from the difference of two
/// long sums.
pub fn stick_breaking_tensor<B: Backend>(logits: Tensor<B, 4>, sticks: Sticks) -> Tensor<B, 4> {
    let [b, h, rows, keys] = logits.dims();
    let device = logits.device();
    let shape = [b, h, rows, keys];
    let q0 = sticks.query_start as i64;
    let i = Tensor::<B, 1, Int>::arange(q0..q0 + rows as i64, &device)
        .reshape([rows, 1])
        .expand([rows, keys]);
    let j = Tensor::<B, 1, Int>::arange(0..keys as i64, &device)
        .reshape([1, keys])
        .expand([rows, keys]);
    let own = |mask: Tensor<B, 2, Bool>| mask.unsqueeze::<4>().expand(shape);
    // ln(1 + e^{−|z|}), shared by softplus(z) = relu(z) + t and −log σ(z) = relu(−z) + t.
    let t = logits.clone().abs().neg().exp().log1p();
    let log_take = -(relu(logits.clone().neg()) + t.clone());
    let log_keep = -(relu(logits) + t);
    let before = if sticks.attend_current {
        j.clone().lower_equal(i.clone())
    } else {
        j.clone().lower(i.clone())
    };
    let past = one_stick(
        log_take.clone(),
        log_keep.clone(),
        own(before),
        Direction::Downwards,
    );
    if sticks.causal {
        return past;
    }
    let after = if sticks.attend_current {
        j.greater_equal(i)
    } else {
        j.greater(i)
    };
    let future = one_stick(log_take, log_keep, own(after), Direction::Upwards);
    (past + future) * 0.5
}

/// Which way a stick is broken from the query.
#[derive(Clone, Copy)]
enum Direction {
    /// Over the keys before the query, from the nearest (`k` descending).
    Downwards,
    /// Over the keys after the query, from the nearest (`k` ascending).
    Upwards,
}

/// One stick over the keys where `on` holds: `exp(log σ(z_ij) + Σ log(1 − σ(z_ik)))`, the sum
/// over the stick's keys `k` nearer to the query than `j`; 0 off the stick.
fn one_stick<B: Backend>(
    log_take: Tensor<B, 4>,
    log_keep: Tensor<B, 4>,
    on: Tensor<B, 4, Bool>,
    direction: Direction,
) -> Tensor<B, 4> {
    let off = on.bool_not();
    let log_keep = log_keep.mask_fill(off.clone(), 0.0);
    // The sum over j and the stick's keys nearer the query, then j's own term removed.
    let inclusive = match direction {
        Direction::Downwards => log_keep.clone().flip([3]).cumsum(3).flip([3]),
        Direction::Upwards => log_keep.clone().cumsum(3),
    };
    let nearer = inclusive - log_keep;
    (log_take + nearer).mask_fill(off, f32::NEG_INFINITY).exp()
}
