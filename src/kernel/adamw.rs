//! The scalars and inputs of one fused AdamW step ([`crate::optim::FusedAdamW`]), shared by the
//! ndarray and LibTorch kernels and the tensor path.

#[cfg(any(feature = "ndarray", feature = "tch"))]
use burn::prelude::*;

/// The scalars of one AdamW step ([`crate::optim::FusedAdamW`]), shared by its fused kernel and
/// its tensor path.
#[derive(Clone, Copy, Debug)]
// Without ndarray or tch only the tensor path reads it (the clipping threshold).
#[cfg_attr(not(any(feature = "ndarray", feature = "tch")), allow(dead_code))]
pub(crate) struct AdamWStep {
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    /// `1 − lr · weight_decay`.
    pub decay: f32,
    pub lr: f32,
    /// `1 − beta_1^t` and `1 − beta_2^t` at this step's time `t`.
    pub correction_1: f32,
    pub correction_2: f32,
    pub clip_norm: Option<f32>,
}

/// One parameter's AdamW moments before a step: the steps taken, the first moment and the
/// second moment (`None` before the first step).
#[cfg(any(feature = "ndarray", feature = "tch"))]
pub(crate) type Moments<B, const D: usize> = Option<(usize, Tensor<B, D>, Tensor<B, D>)>;

/// What a fused AdamW step gives: the updated parameter and its two moments, or (`Err`) its
/// inputs unchanged, for the tensor path.
#[cfg(any(feature = "ndarray", feature = "tch"))]
#[allow(clippy::type_complexity)]
pub(crate) type AdamWResult<B, const D: usize> =
    Result<(Tensor<B, D>, Tensor<B, D>, Tensor<B, D>), (Tensor<B, D>, Tensor<B, D>, Moments<B, D>)>;

/// Whether a fused AdamW step takes these tensors: all `f32`, all of the parameter's shape.
#[cfg(any(feature = "ndarray", feature = "tch"))]
pub(crate) fn adamw_fits<B: Backend, const D: usize>(
    tensor: &Tensor<B, D>,
    grad: &Tensor<B, D>,
    moments: &Moments<B, D>,
) -> bool {
    let dims = tensor.dims();
    let fits = |t: &Tensor<B, D>| t.dtype() == burn::tensor::DType::F32 && t.dims() == dims;
    fits(tensor) && fits(grad) && moments.as_ref().is_none_or(|(_, m, v)| fits(m) && fits(v))
}
