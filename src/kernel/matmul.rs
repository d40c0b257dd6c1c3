//! Batched matrix products over the last two dimensions: which backend gets which kernel.

use burn::prelude::*;

#[cfg(feature = "ndarray")]
use super::ndarray::{applies, applies_autodiff, matmul_autodiff, matmul_nd};

/// `a · b` over the last two dimensions, for `a: [n0, n1, m, k]` and `b: [n0, n1, k, n]` with
/// the same leading dimensions (no broadcasting). On ndarray, with or without autodiff: one
/// `gemm` call per pair of matrices, in parallel, reading strided operands (a transposed key
/// tensor, say) through their strides, and under autodiff one node whose backward pass is
/// `da = g · bᵀ` and `db = aᵀ · g` per pair. Elsewhere, and for other shapes or element types,
/// Burn's `matmul`. The attention layer's tensor path (the encodings that read or rewrite the
/// logits: DAPE, CoPE, Shaw, Transformer-XL, …) takes it for `q · kᵀ` and `P · V`.
pub fn batched_matmul<B: Backend>(a: Tensor<B, 4>, b: Tensor<B, 4>) -> Tensor<B, 4> {
    #[cfg(feature = "ndarray")]
    {
        let [a0, a1, _, ak] = a.dims();
        let [b0, b1, bk, _] = b.dims();
        let fits = (a0, a1, ak) == (b0, b1, bk)
            && a.dtype() == burn::tensor::DType::F32
            && b.dtype() == burn::tensor::DType::F32;
        let fused = if !fits {
            None
        } else if applies::<B>() {
            matmul_nd(a.clone(), b.clone())
        } else if applies_autodiff::<B>() {
            matmul_autodiff(a.clone(), b.clone())
        } else {
            None
        };
        if let Some(y) = fused {
            return y;
        }
    }
    a.matmul(b)
}
