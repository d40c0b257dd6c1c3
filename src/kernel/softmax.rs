//! The softmax of adjusted logits with the causal mask folded in: which backend gets which
//! kernel (`Err`: the caller takes the tensor path).

use burn::prelude::*;

#[cfg(feature = "ndarray")]
use super::ndarray::{applies, applies_autodiff, softmax_autodiff, softmax_nd};

#[cfg(feature = "tch")]
use super::torch;

/// Softmax over the keys of `logits` `[batch, heads, rows, keys]` as one fused pass forward and
/// one backward on ndarray (on LibTorch, PyTorch's softmax kernels as one graph node), with the
/// causal mask folded in: with `causal_from = Some(q0)`, row `r` (absolute position `q0 + r`)
/// sees keys `0..=q0 + r` and gets probability 0 elsewhere, as `mask_fill(-inf)` then `softmax`
/// give. `Err(logits)` hands the input back when no kernel applies (another backend or element
/// type, or neither the `ndarray` nor the `tch` feature on): the caller then takes the tensor
/// path.
pub fn fused_softmax<B: Backend>(
    logits: Tensor<B, 4>,
    causal_from: Option<usize>,
) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    #[cfg(feature = "ndarray")]
    if logits.dtype() == burn::tensor::DType::F32 {
        if applies::<B>() {
            if let Some(p) = softmax_nd(logits.clone(), causal_from) {
                return Ok(p);
            }
        } else if applies_autodiff::<B>() {
            if let Some(p) = softmax_autodiff(logits.clone(), causal_from) {
                return Ok(p);
            }
        }
    }
    #[cfg(feature = "tch")]
    if logits.dtype() == burn::tensor::DType::F32 && torch::applies_any::<B>() {
        if let Some(p) = torch::softmax(logits.clone(), causal_from) {
            return Ok(p);
        }
    }
    #[cfg(not(any(feature = "ndarray", feature = "tch")))]
    let _ = causal_from;
    Err(logits)
}
