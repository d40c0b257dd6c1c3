//! The token-flattened linear layer, `x·W + b` over the last dimension: which backend gets
//! which kernel, and the tensor path.

use burn::prelude::*;

#[cfg(feature = "ndarray")]
use super::ndarray::{applies, applies_autodiff, linear_autodiff, linear_nd};

/// `x · weight + bias` over the last dimension of `x` `[.., d_in]`, with `weight`
/// `[d_in, d_out]` and `bias` `[d_out]` as Burn's `Linear` holds them, giving `[.., d_out]`.
///
/// Every leading dimension is one row of a single matrix product (`[rows, d_in] · [d_in,
/// d_out]`): Burn's `Linear` on a 3-d input runs one product per sequence and sums the weight
/// gradient's batch afterwards. On ndarray it is one graph node whose forward pass is one GEMM
/// (the `gemm` crate, threaded) onto the bias, and whose backward pass is one GEMM for the
/// input's gradient and one for the weight's, reading the transposed operands through their
/// strides instead of copying them, and one pass of column sums for the bias's. Every other
/// backend runs `burn::tensor::module::linear` on the flattened input: the same function (the
/// tests hold the two together in values and in every gradient).
pub fn linear<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, D> {
    #[cfg(feature = "ndarray")]
    if applies::<B>() || applies_autodiff::<B>() {
        let f32s = x.dtype() == burn::tensor::DType::F32
            && weight.dtype() == burn::tensor::DType::F32
            && bias
                .as_ref()
                .is_none_or(|b| b.dtype() == burn::tensor::DType::F32);
        if f32s && D >= 2 {
            let fused = if applies::<B>() {
                linear_nd(x.clone(), weight.clone(), bias.clone())
            } else {
                linear_autodiff(x.clone(), weight.clone(), bias.clone())
            };
            if let Some(y) = fused {
                return y;
            }
        }
    }
    linear_tensor(x, weight, bias)
}

/// [`linear`] by Burn's own op on `[rows, d_in]`: the tensor path.
pub fn linear_tensor<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, D> {
    let dims = x.dims();
    if D < 2 {
        return burn::tensor::module::linear(x, weight, bias);
    }
    let d_in = dims[D - 1];
    let rows = dims[..D - 1].iter().product::<usize>();
    let y = burn::tensor::module::linear(x.reshape([rows, d_in]), weight, bias);
    let mut out = dims;
    out[D - 1] = y.dims()[1];
    y.reshape(out)
}

/// A Burn `Linear` layer through [`linear`]: every token of `x` `[.., d_in]` in one product.
pub fn linear_layer<B: Backend, const D: usize>(
    layer: &burn::nn::Linear<B>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    linear(x, layer.weight.val(), layer.bias.as_ref().map(|b| b.val()))
}
