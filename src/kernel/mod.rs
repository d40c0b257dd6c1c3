//! The fused kernels behind generic functions: each op below runs a kernel of its own where one
//! applies to the backend, checked by type at run time, and the tensor path (Burn's own ops)
//! everywhere else. Each kernel is tested against the tensor path in values and in every
//! gradient.
//!
//! | op | `NdArray<f32>` (± autodiff) | `LibTorch<f32>` (± autodiff) | elsewhere |
//! | --- | --- | --- | --- |
//! | [`gelu`] | `ndarray/gelu.rs` | PyTorch's exact GELU | [`crate::util::gelu_exact`] |
//! | [`linear`] | `ndarray/linear.rs` | [`linear_tensor`] | [`linear_tensor`] |
//! | [`layer_norm`] | `ndarray/layer_norm.rs` | `torch/layer_norm.rs` (autodiff) | [`layer_norm_tensor`] |
//! | [`attention`], [`attention_packed`] | `ndarray/attention*.rs` | `torch/attention.rs` | `None`: the caller's tensor path |
//! | [`batched_matmul`] | `ndarray/matmul.rs` | Burn's `matmul` | Burn's `matmul` |
//! | [`distance_table_bias`], [`past_distance_table_bias`] | `ndarray/distance_table.rs` | `None` | `None` |
//! | [`scalar_mlp_bias`] | `ndarray/scalar_mlp.rs` | `None` | `None` |
//! | [`fused_softmax`] | `ndarray/softmax.rs` | `torch/softmax.rs` | `Err`: the caller's tensor path |
//! | [`stick_breaking`] | `ndarray/stick_breaking.rs` | [`stick_breaking_tensor`] | [`stick_breaking_tensor`] |
//! | [`stick_breaking_attention`] | `ndarray/attention_sticks.rs` | `None` | `None`: the caller's tensor path |
//! | [`token_nll`] | `ndarray/token_nll.rs` | [`token_nll_tensor`] | [`token_nll_tensor`] |
//! | [`unit_lower_inverse`] | `ndarray/unit_lower_inverse.rs` | [`unit_lower_inverse_tensor`] | [`unit_lower_inverse_tensor`] |
//! | AdamW ([`crate::optim::FusedAdamW`]) | `ndarray/adamw.rs` | `torch/adamw.rs` | Burn's `AdamW` |
//! | DAPE's correction ([`crate::encoding::Dape`]) | `encoding/dape/fused/` | `torch/dape.rs` | its tensor path |
//!
//! The kernels run when the backend is `NdArray<f32>` (evaluation) or `Autodiff<NdArray<f32>>`
//! (training, as one graph node with a hand-written backward pass); with the `tch` feature,
//! `LibTorch<f32>` gets PyTorch's own fused kernels where Burn 0.21 does not reach them under
//! autodiff, each one graph node or one in-place step (`tests/torch_kernels.rs` holds them to
//! the tensor path). With the `ndarray` feature off, every op takes the tensor path. This file
//! is the dispatch; each op's routing is in its own file beside it, its ndarray kernel under
//! `ndarray/` and its LibTorch kernel under `torch/`.

mod adamw;
mod attention;
mod distance_table;
mod gelu;
mod layer_norm;
mod linear;
mod matmul;
mod scalar_mlp;
mod softmax;
mod stick_breaking;
mod token_nll;
mod unit_lower_inverse;
mod workers;

#[cfg(feature = "ndarray")]
mod ndarray;
#[cfg(feature = "tch")]
mod torch;

#[cfg(test)]
mod tests;

pub use attention::{attention, attention_applies, attention_packed};
pub use distance_table::{distance_table_applies, distance_table_bias, past_distance_table_bias};
pub use gelu::gelu;
pub use layer_norm::{layer_norm, layer_norm_tensor};
pub use linear::{linear, linear_layer, linear_tensor};
pub use matmul::batched_matmul;
pub use scalar_mlp::{scalar_mlp_applies, scalar_mlp_bias, ScalarMlp};
pub use softmax::fused_softmax;
pub use stick_breaking::{
    stick_breaking, stick_breaking_attention, stick_breaking_attention_applies,
    stick_breaking_tensor, Sticks,
};
pub use token_nll::{token_nll, token_nll_tensor};
pub use unit_lower_inverse::{unit_lower_inverse, unit_lower_inverse_tensor};
pub use workers::join_compute_pool;

pub(crate) use adamw::AdamWStep;
#[cfg(any(feature = "ndarray", feature = "tch"))]
pub(crate) use adamw::{adamw_fits, AdamWResult, Moments};

// What DAPE's kernels (`encoding/dape/`) and the optimiser share with the kernels here.
#[cfg(feature = "ndarray")]
pub(crate) use ndarray::*;
#[cfg(feature = "tch")]
pub(crate) use torch::{
    adamw as adamw_tch, applies_any as applies_tch, dape_v1 as dape_v1_tch, dape_v2 as dape_v2_tch,
};

/// Moves a value to the type it is known to have (`None` if it has another).
#[cfg_attr(not(any(feature = "ndarray", feature = "tch")), allow(dead_code))]
pub(crate) fn cast<T: 'static, U: 'static>(x: T) -> Option<U> {
    (Box::new(x) as Box<dyn std::any::Any>)
        .downcast::<U>()
        .ok()
        .map(|u| *u)
}

/// [`cast`] of an optional value: `Some(None)` for `None`, `None` if it has another type.
#[cfg_attr(not(any(feature = "ndarray", feature = "tch")), allow(dead_code))]
pub(crate) fn cast_opt<T: 'static, U: 'static>(x: Option<T>) -> Option<Option<U>> {
    match x {
        Some(x) => cast(x).map(Some),
        None => Some(None),
    }
}
