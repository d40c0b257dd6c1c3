//! Fused CPU kernels for DAPE's correction on the ndarray backend.
//!
//! DAPE's `f` is two skinny matrix products and an activation over every (query, key) pair. As
//! separate tensor operations each is a pass over `D × pairs` floats (`D` = 32), bound by memory
//! bandwidth on the CPU, and under autodiff each also keeps its activations for the backward
//! pass. Here one pass over a row of keys does all of it with the hidden vector in registers:
//! for a block of 16 keys it gathers the `C` input channels, forms the `D` hidden values,
//! applies LeakyReLU and the second layer, and writes `logits + bias + f`. Query rows run in
//! parallel (rayon); keys a causal row may not attend to are skipped (they are masked
//! afterwards, so only their finite `logits + bias` is written). The inner loops are compiled
//! twice, for AVX2 + FMA (picked at run time when the CPU has them) and for the baseline target.
//!
//! * [`dape_v1`] and [`dape_v2`] (both convolutions of a row in one pass) run for
//!   `NdArray<f32>`, checked by type: evaluation, validation and decoding.
//! * [`dape_v1_autodiff`] runs for `Autodiff<NdArray<f32>>` (training): DAPE V1 is recorded as
//!   one graph node whose backward pass, [`dape_v1_backward`], recomputes the hidden layer row by
//!   row and returns the gradients of the logits, the bias map and both layers. It runs each
//!   query row (all batch elements at once) as five matrix products over the row's (batch
//!   element, key) pairs, through the `gemm` crate: a per-pair loop cannot keep the weight
//!   gradients' sums in registers. [`dape_v2_autodiff`] does the same for DAPE V2: its
//!   backward pass, [`dape_v2_backward`], runs each `1 × k` convolution as one product over
//!   `k` key-shifted copies of its input.
//! * The bias map is `[1, H, rows, keys]` (a base bias shared by the batch) or `[batch, H, rows,
//!   keys]` (forgetting attention's, one per sequence: `dape_fox`).
//!
//! Every other backend (WGPU, LibTorch) keeps the tensor path. Sums run in another order than
//! the tensor path's, so results agree to float32 rounding, not bit for bit; the unit tests in
//! `dape/tests.rs` check values and gradients against the tensor path.
//!
//! | file | holds |
//! | --- | --- |
//! | `mod.rs` | the host glue: [`run_fused`], [`host_bias`], [`bias_fits`] |
//! | `rows.rs` | one task per query row, the bias map's rows, the keys a row can see |
//! | `simd.rs` | blocks of 16 keys, the multiply-add, the AVX2 + FMA / baseline dispatch |
//! | `v1.rs` | [`dape_v1`]: DAPE V1's MLP over each row |
//! | `distance_half.rs` | the bias's half of V1's first layer once per distance, for a bias of the distance alone (evaluation in the tile) |
//! | `v2.rs` | [`dape_v2`]: DAPE V2's two key convolutions over each row |
//! | `backward.rs` | the backward passes' frame: row groups, deterministic weight sums, the gradient of `Z` given or formed per row |
//! | `softmax_rows.rs` | the tile's softmax backward for one query row, run inside `f`'s backward rows |
//! | `v1_backward.rs` | [`dape_v1_backward`]: five matrix products per row |
//! | `v2_backward.rs` | [`dape_v2_backward`]: each convolution as a product over key shifts |
//! | `node.rs` | [`dape_v1_autodiff`], [`dape_v2_autodiff`]: the training graph nodes |
//! | `correction.rs` | `f` as the tile runs it: DAPE V1's MLP or DAPE V2's key convolutions |
//! | `attention.rs` | DAPE (V1 or V2) inside the attention tile: logits, `f`, softmax and `· V` per block of rows, and the backward pass that recomputes them |
//! | `attention_node.rs` | [`dape_attention`]: that tile for evaluation, and as one training graph node over q, k, v, the bias map and `f` |
//!
//! The plain reference that each kernel must equal is the tensor path beside this folder
//! (`dape/tensor_path.rs`: `Dape::forward_tensor_path`, `Dape::forward_with_map_tensor_path`,
//! `DapeV2::forward_tensor_path`).
//!
//! [`dape_v1_backward`]: v1_backward::dape_v1_backward
//! [`dape_v2_backward`]: v2_backward::dape_v2_backward

// The lane loops index several fixed-size arrays in step (`acc[l] += w · x[l]`); written with
// an index they are what LLVM vectorises, and zipped iterators would hide nothing but that.
#![allow(clippy::needless_range_loop)]

mod attention;
mod attention_node;
mod backward;
mod correction;
mod distance_half;
mod node;
mod rows;
mod simd;
mod softmax_rows;
mod v1;
mod v1_backward;
mod v2;
mod v2_backward;

use burn::prelude::*;
use burn::tensor::TensorData;

use crate::encoding::{AdditiveBias, Span};
pub(crate) use crate::kernel::{applies, applies_autodiff, host};
pub(crate) use attention_node::{dape_attention, DapeAttentionInputs};
pub(crate) use node::{dape_v1_autodiff, dape_v2_autodiff};
pub(crate) use v1::{dape_v1, Mlp};
pub(crate) use v2::{dape_v2, KeyConvs};

/// Reads an optional layer bias (`Some(None)` when the layer has none; `None` when not `f32`).
pub(crate) fn host_bias<B: Backend>(
    bias: &Option<burn::module::Param<Tensor<B, 1>>>,
) -> Option<Option<Vec<f32>>> {
    match bias {
        Some(b) => host(b.val()).map(Some),
        None => Some(None),
    }
}

/// Runs a fused kernel `kernel(logits, bias map, dims)` on the host values of `logits` and of
/// the base bias's map over `span`, and returns its result as a tensor on the logits' device.
/// `None` (the caller then takes the tensor path) when a tensor is not `f32` or the bias map is
/// not `[1, H, rows, keys]`.
pub(crate) fn run_fused<B: Backend>(
    logits: &Tensor<B, 4>,
    bias: Option<&AdditiveBias<B>>,
    span: &Span,
    kernel: impl FnOnce(Vec<f32>, Option<&[f32]>, [usize; 4]) -> Vec<f32>,
) -> Option<Tensor<B, 4>> {
    let device = logits.device();
    let dims = logits.dims();
    let [_, h, lq, lk] = dims;
    let map = match bias {
        Some(bias) => {
            let m = bias.forward(span, &device);
            if m.dims() != [1, h, lq, lk] {
                return None;
            }
            Some(host(m)?)
        }
        None => None,
    };
    let out = kernel(host(logits.clone())?, map.as_deref(), dims);
    Some(Tensor::from_data(TensorData::new(out, dims), &device))
}

/// Whether a bias map of `len` values fits logits `[batch, H, lq, lk]`: `[1, H, lq, lk]` (shared
/// by the batch) or `[batch, H, lq, lk]` (one per sequence).
pub(crate) fn bias_fits(len: usize, [b, h, lq, lk]: [usize; 4]) -> bool {
    let plane = h * lq * lk;
    len == plane || len == b * plane
}
