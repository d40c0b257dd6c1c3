//! LibTorch's own fused kernels behind the generic functions of [`crate::kernel`] (feature
//! `tch`), for `LibTorch<f32>` and `Autodiff<LibTorch<f32>>`, checked by type at run time like
//! the ndarray kernels.
//!
//! Under autodiff, Burn 0.21 runs `B::layer_norm` and `burn::tensor::module::attention` as
//! composites of primitive ops (its autodiff backend overrides neither), so on LibTorch each is
//! a chain of small PyTorch kernels forward and twice as many backward. Here each is one graph
//! node over PyTorch's own kernels:
//!
//! * **LayerNorm**: `native_layer_norm` forward (which also returns each row's mean and
//!   reciprocal standard deviation), and the closed-form backward pass in a few whole-tensor
//!   ops from those statistics.
//! * **Attention**: PyTorch's CPU flash attention (`_scaled_dot_product_flash_attention_for_cpu`,
//!   what `F.scaled_dot_product_attention` runs on the CPU) forward and its own backward kernel
//!   for q, k and v; an additive bias and the causal mask go in as one float mask. The
//!   `[rows, keys]` probabilities are never kept. PyTorch's kernel gives no gradient for its
//!   mask, so a bias that needs one (Kerple's, FIRE's, a forget gate's) takes another node:
//!   the logits, bias and mask added in place, PyTorch's softmax, and the backward pass from
//!   the kept probabilities with PyTorch's softmax backward kernel (what eager PyTorch does).
//! * **Softmax** (of the logits that an encoding such as DAPE has adjusted): the causal mask
//!   and PyTorch's softmax forward, its softmax backward kernel backward.
//! * **DAPE V1's correction** ([`crate::encoding::Dape::forward`]): three batched matrix
//!   products and PyTorch's LeakyReLU kernel per block of query rows, and under autodiff one
//!   graph node that keeps only the logits, the bias map and the weights; its backward pass
//!   recomputes each block's pre-activations, so the `[batch, D, rows · keys]` hidden tensors
//!   of the tensor path are never kept. The node takes a bias map shared by the batch or one
//!   per sequence (DAPE-FoX's).
//! * **DAPE V2's correction** ([`crate::encoding::DapeV2::forward`]): PyTorch's `conv2d` and
//!   LeakyReLU kernels per block of query rows, and under autodiff one graph node that keeps
//!   only its inputs; its backward pass recomputes each block's hidden channels and runs the
//!   transposed convolutions and the weights' contractions (`dape_v2.rs`).
//! * **AdamW** ([`crate::optim::FusedAdamW`]): the parameter and both moments updated in place
//!   by PyTorch's `lerp_`, `mul_` and `addcdiv_`, the clipping factor kept on the device.
//! * **GELU**: Burn's own `gelu`, which is PyTorch's exact (erf) GELU forward and backward on
//!   LibTorch; elsewhere the crate writes it from `erf` (Burn's default `gelu_backward` is the
//!   tanh approximation's derivative).
//!
//! This file holds the type checks that route a generic tensor here, and GELU; each other
//! kernel is in its own file beside it.

mod adamw;
mod attention;
mod correction_node;
mod dape;
mod dape_v2;
mod layer_norm;
mod softmax;

pub(crate) use adamw::adamw;
pub(crate) use attention::{attention, attention_packed};
pub(crate) use dape::dape_v1;
pub(crate) use dape_v2::dape_v2;
pub(crate) use layer_norm::layer_norm_autodiff;
pub(crate) use softmax::softmax;

use std::any::TypeId;

use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::ops::Backward;
use burn::backend::autodiff::ops::OpsKind;
use burn::backend::libtorch::TchTensor;
use burn::backend::Autodiff;
use burn::backend::LibTorch;
use burn::prelude::*;

/// The backend these kernels run on outside autodiff.
type Tb = LibTorch<f32>;
/// The backend these kernels run on under autodiff.
type Ta = Autodiff<Tb>;

/// Whether `B` is `LibTorch<f32>` (no autodiff).
pub(crate) fn applies<B: Backend>() -> bool {
    TypeId::of::<B>() == TypeId::of::<Tb>()
}

/// Whether `B` is `Autodiff<LibTorch<f32>>` (training on LibTorch).
pub(crate) fn applies_autodiff<B: Backend>() -> bool {
    TypeId::of::<B>() == TypeId::of::<Ta>()
}

/// Whether `B` is LibTorch over f32, with or without autodiff.
pub(crate) fn applies_any<B: Backend>() -> bool {
    applies::<B>() || applies_autodiff::<B>()
}

/// Exact GELU by PyTorch's kernel (forward and backward); `None` off LibTorch.
pub(crate) fn gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Option<Tensor<B, D>> {
    applies_any::<B>().then(|| burn::tensor::activation::gelu(x))
}

/// Registers a node's output, tracked or not.
fn finish<BW: Backward<Tb, N>, const N: usize>(
    kind: OpsKind<BW, Tb, BW::State, NoCheckpointing, N>,
    state: BW::State,
    out: TchTensor,
) -> burn::tensor::ops::FloatTensor<Ta> {
    match kind {
        OpsKind::Tracked(prep) => prep.finish(state, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}
