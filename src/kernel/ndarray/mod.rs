//! The fused CPU kernels on `NdArray<f32>`, one op family per file, and what they share: the
//! backend types, the type checks that route a generic tensor here, and the copies between
//! ndarray's arrays and host buffers.
//!
//! Each family holds `*_nd` (the forward pass on `NdArray<f32>`, for evaluation) and
//! `*_autodiff` (one graph node on `Autodiff<NdArray<f32>>`, with a hand-written backward pass);
//! both return `None` where the kernel does not apply, and [`crate::kernel`] then takes the
//! tensor path. `simd.rs` holds the vectorized arithmetic, `gemm.rs` the matrix products and
//! `node.rs` the autodiff plumbing.

mod adamw;
mod attention;
mod attention_packed;
mod attention_sticks;
mod distance_table;
mod gelu;
mod gemm;
mod layer_norm;
mod linear;
mod matmul;
mod node;
mod scalar_mlp;
mod simd;
mod softmax;
mod stick_breaking;
mod token_nll;
mod unit_lower_inverse;

// What the rest of the crate uses: DAPE's kernels, the optimiser, and the dispatch.
pub(crate) use adamw::adamw_nd;
pub(crate) use attention::view4;
pub(crate) use gemm::{gemm, gemm_new, gemm_scaled, gemm_scaled_add, view2, Mat};
pub(crate) use node::finish_node;
pub(crate) use simd::lane_sum;
pub(crate) use softmax::softmax_row_simd;

// Each family's entry points, for the dispatch in `crate::kernel`.
pub(in crate::kernel) use attention::{attention_autodiff, attention_nd};
pub(in crate::kernel) use attention_packed::{attention_packed_autodiff, attention_packed_nd};
pub(in crate::kernel) use distance_table::{distance_table_autodiff, distance_table_nd};
pub(in crate::kernel) use gelu::{gelu_autodiff, gelu_nd};
pub(in crate::kernel) use layer_norm::{layer_norm_autodiff, layer_norm_nd};
pub(in crate::kernel) use linear::{linear_autodiff, linear_nd};
pub(in crate::kernel) use matmul::{matmul_autodiff, matmul_nd};
pub(in crate::kernel) use scalar_mlp::{scalar_mlp_bias_autodiff, scalar_mlp_bias_nd};
#[cfg(test)]
pub(in crate::kernel) use simd::{exp, phi};
pub(in crate::kernel) use softmax::{softmax_autodiff, softmax_nd};
pub(in crate::kernel) use stick_breaking::{stick_breaking_autodiff, stick_breaking_nd};
pub(in crate::kernel) use token_nll::{token_nll_autodiff, token_nll_nd};
pub(in crate::kernel) use unit_lower_inverse::{
    unit_lower_inverse_autodiff, unit_lower_inverse_nd,
};

use std::any::TypeId;

use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::TensorData;
use burn::tensor::TensorPrimitive;

use crate::kernel::cast;

/// The backend the kernels run on outside autodiff.
pub(crate) type Nd = burn_ndarray::NdArray<f32>;
/// The backend the kernels run on under autodiff.
pub(crate) type Ad = Autodiff<Nd>;

/// Whether `B` is `NdArray<f32>` (no autodiff).
pub(crate) fn applies<B: Backend>() -> bool {
    TypeId::of::<B>() == TypeId::of::<Nd>()
}

/// Whether `B` is `Autodiff<NdArray<f32>>` (training on ndarray).
pub(crate) fn applies_autodiff<B: Backend>() -> bool {
    TypeId::of::<B>() == TypeId::of::<Ad>()
}

/// Reads an `f32` tensor's values in row-major order (`None` for another element type). On
/// ndarray this is one copy of the array's memory; `into_data` would walk the elements one
/// by one whenever the array is shared (as a graph's tensors are).
pub(crate) fn host<B: Backend, const D: usize>(x: Tensor<B, D>) -> Option<Vec<f32>> {
    if x.dtype() != DType::F32 {
        return None;
    }
    if applies::<B>() {
        let x: Tensor<Nd, D> = cast(x)?;
        return host_primitive(x.into_primitive().tensor());
    }
    x.into_data().into_vec::<f32>().ok()
}

/// Elements per rayon task of the elementwise kernels.
const CHUNK: usize = 1 << 14;

fn to_nd<const D: usize>(
    values: Vec<f32>,
    dims: [usize; D],
    device: &burn_ndarray::NdArrayDevice,
) -> Tensor<Nd, D> {
    Tensor::from_data(TensorData::new(values, dims), device)
}

/// A view of an `f32` ndarray primitive's values (`None` for another element type).
fn f32_view(
    x: &burn_ndarray::NdArrayTensor,
) -> Option<ndarray::ArrayView<'_, f32, ndarray::IxDyn>> {
    match x {
        burn_ndarray::NdArrayTensor::F32(storage) => Some(storage.view()),
        _ => None,
    }
}

/// The values of a primitive in row-major order, borrowed when it is row-major already.
pub(crate) fn row_major_values(
    x: &burn_ndarray::NdArrayTensor,
) -> Option<std::borrow::Cow<'_, [f32]>> {
    let view = f32_view(x)?;
    Some(match view.to_slice() {
        Some(values) => std::borrow::Cow::Borrowed(values),
        None => std::borrow::Cow::Owned(view.iter().copied().collect()),
    })
}

/// The values of an `f32` ndarray primitive, row-major: one copy of the array's memory when
/// it is contiguous.
fn host_primitive(x: burn_ndarray::NdArrayTensor) -> Option<Vec<f32>> {
    match x {
        burn_ndarray::NdArrayTensor::F32(storage) => {
            let view = storage.view();
            Some(match view.as_slice() {
                Some(values) => values.to_vec(),
                None => view.iter().copied().collect(),
            })
        }
        _ => None,
    }
}

/// A gradient's values (the gradient of an `f32` output is `f32`).
fn host_grad(grad: burn_ndarray::NdArrayTensor) -> Vec<f32> {
    host_primitive(grad).expect("the gradient of an f32 output is f32")
}

/// An `f32` array of `NdArray<f32>` in row-major order, owned (copied only when it is not
/// row-major).
fn owned_f32<const D: usize>(x: Tensor<Nd, D>) -> Option<ndarray::ArcArray<f32, ndarray::IxDyn>> {
    match x.into_primitive().tensor() {
        burn_ndarray::NdArrayTensor::F32(storage) => {
            let a = storage.into_owned();
            Some(if a.is_standard_layout() {
                a
            } else {
                a.as_standard_layout().into_owned().into_shared()
            })
        }
        _ => None,
    }
}

fn from_array<const D: usize>(a: ndarray::ArcArray<f32, ndarray::IxDyn>) -> Tensor<Nd, D> {
    Tensor::from_primitive(TensorPrimitive::Float(burn_ndarray::NdArrayTensor::from(a)))
}
