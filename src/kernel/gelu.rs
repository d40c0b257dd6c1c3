//! Exact GELU, `x·Φ(x)`: which backend gets which kernel.

use burn::prelude::*;

#[cfg(feature = "ndarray")]
use super::ndarray::{applies, applies_autodiff, gelu_autodiff, gelu_nd};

#[cfg(feature = "tch")]
use super::torch;

/// Exact GELU, `x Φ(x)`, as one pass forward and one pass backward on ndarray (elementwise over
/// rayon chunks, in f32 with a branch-free `erfc`), PyTorch's exact GELU kernel forward and
/// backward on LibTorch, and [`crate::util::gelu_exact`] on every other backend. Same
/// function: the tests hold them to 1e-6.
pub fn gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    #[cfg(feature = "ndarray")]
    if x.dtype() == burn::tensor::DType::F32 {
        if applies::<B>() {
            if let Some(y) = gelu_nd(x.clone()) {
                return y;
            }
        } else if applies_autodiff::<B>() {
            if let Some(y) = gelu_autodiff(x.clone()) {
                return y;
            }
        }
    }
    #[cfg(feature = "tch")]
    if let Some(y) = torch::gelu(x.clone()) {
        return y;
    }
    crate::util::gelu_exact(x)
}
