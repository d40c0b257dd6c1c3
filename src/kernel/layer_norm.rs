//! Layer normalization over the last dimension: which backend gets which kernel, and the
//! tensor path.

use burn::prelude::*;

#[cfg(feature = "ndarray")]
use super::ndarray::{applies, applies_autodiff, layer_norm_autodiff, layer_norm_nd};

#[cfg(feature = "tch")]
use super::torch;

/// Layer normalization over the last dimension of `x` `[.., d]`:
/// `(x − mean) / √(var + epsilon) · gamma + beta`, with the mean and the biased variance of each
/// row, and `gamma`, `beta` `[d]` (as `B::layer_norm`, which Burn's `LayerNorm` calls).
///
/// On ndarray it is one graph node: the forward pass is one pass per row (its mean and
/// reciprocal standard deviation are all it keeps besides the input), and the backward pass
/// one pass per row for the input's gradient, with the gradients of `gamma` and `beta` summed
/// over rayon tasks of rows. Burn's op is a composite of nine tensor ops (two of them means
/// whose backward passes fill a tensor of ones of the input's size). On LibTorch under autodiff
/// it is one node too: PyTorch's `native_layer_norm` forward and the closed-form backward from
/// its saved row statistics (Burn's autodiff would run the nine-op composite). Every other
/// backend runs `B::layer_norm` (native on LibTorch without autodiff): the tensor path, which
/// the tests hold these to in values and in every gradient. An input with a zero-sized last dimension, or whose `gamma`
/// does not match it, takes the tensor path too.
pub fn layer_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    gamma: Tensor<B, 1>,
    beta: Option<Tensor<B, 1>>,
    epsilon: f64,
) -> Tensor<B, D> {
    #[cfg(feature = "ndarray")]
    if applies::<B>() || applies_autodiff::<B>() {
        let d = x.dims()[D - 1];
        let f32s = [&x.dtype(), &gamma.dtype()]
            .into_iter()
            .chain(beta.as_ref().map(|b| b.dtype()).as_ref())
            .all(|t| *t == burn::tensor::DType::F32);
        let fits = d > 0 && gamma.dims()[0] == d && beta.as_ref().is_none_or(|b| b.dims()[0] == d);
        if f32s && fits {
            let fused = if applies::<B>() {
                layer_norm_nd(x.clone(), gamma.clone(), beta.clone(), epsilon)
            } else {
                layer_norm_autodiff(x.clone(), gamma.clone(), beta.clone(), epsilon)
            };
            if let Some(y) = fused {
                return y;
            }
        }
    }
    #[cfg(feature = "tch")]
    if let Some(y) = torch::layer_norm_autodiff(x.clone(), gamma.clone(), beta.clone(), epsilon) {
        return y;
    }
    layer_norm_tensor(x, gamma, beta, epsilon)
}

/// [`layer_norm`] by the backend's own op (`B::layer_norm`): the tensor path.
pub fn layer_norm_tensor<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    gamma: Tensor<B, 1>,
    beta: Option<Tensor<B, 1>>,
    epsilon: f64,
) -> Tensor<B, D> {
    use burn::tensor::TensorPrimitive;
    Tensor::from_primitive(TensorPrimitive::Float(B::layer_norm(
        x.into_primitive().tensor(),
        gamma.into_primitive().tensor(),
        beta.map(|b| b.into_primitive().tensor()),
        epsilon,
    )))
}
