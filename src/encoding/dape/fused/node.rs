//! DAPE's kernels as graph nodes on `Autodiff<NdArray<f32>>` (training): each version's forward
//! kernel runs on the host values of its inputs and is recorded as one node over six parents
//! (logits, bias map, both layers' weights and biases) whose backward pass is the version's
//! fused backward ([`dape_v1_backward`], [`dape_v2_backward`]). The node keeps the logits and
//! the bias map (shared, not copied), not the hidden activations that the tensor path keeps.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::NoCheckpointing};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::autodiff::NodeId;
use burn::prelude::*;
use burn::tensor::ops::{FloatTensor, FloatTensorOps};
use burn::tensor::{TensorData, TensorPrimitive};

use super::backward::ZGrad;
use super::host;
use super::v1::{dape_v1, Mlp};
use super::v1_backward::dape_v1_backward;
use super::v2::{dape_v2, KeyConvs};
use super::v2_backward::dape_v2_backward;
use crate::encoding::Span;
use crate::kernel::{cast, cast_opt, finish_node, row_major_values, Ad, Nd};

/// DAPE V1's fused operation on `Autodiff<NdArray<f32>>`: the forward pass of [`dape_v1`],
/// recorded as one node whose backward is [`dape_v1_backward`]. The backward state holds host
/// copies of the logits and the bias map (not the `[batch, D, pairs]` hidden activations of the
/// tensor path). The bias map is `[1, H, rows, keys]` or `[batch, H, rows, keys]`. `B` must be
/// `Autodiff<NdArray<f32>>` ([`applies_autodiff`]); `None` when a tensor is not `f32` or the
/// map has another shape.
///
/// [`applies_autodiff`]: super::applies_autodiff
#[allow(clippy::too_many_arguments)]
pub(crate) fn dape_v1_autodiff<B: Backend>(
    logits: Tensor<B, 4>,
    bias: Option<Tensor<B, 4>>,
    w1t: Tensor<B, 2>,
    b1: Option<Tensor<B, 1>>,
    w2t: Tensor<B, 2>,
    b2: Option<Tensor<B, 1>>,
    span: &Span,
    slope: f32,
) -> Option<Tensor<B, 4>> {
    let logits: Tensor<Ad, 4> = cast(logits)?;
    let bias: Option<Tensor<Ad, 4>> = cast_opt(bias)?;
    let (w1t, w2t): (Tensor<Ad, 2>, Tensor<Ad, 2>) = (cast(w1t)?, cast(w2t)?);
    let b1: Option<Tensor<Ad, 1>> = cast_opt(b1)?;
    let b2: Option<Tensor<Ad, 1>> = cast_opt(b2)?;
    let device = logits.device();
    let dims = logits.dims();
    let [_, h, _, _] = dims;
    let [c, d] = w1t.dims();
    if !map_fits(&bias, dims) {
        return None;
    }
    let mlp = Mlp::new(
        [c, d, h],
        host(w1t.clone().inner())?,
        host_opt(&b1)?,
        host(w2t.clone().inner())?,
        host_opt(&b2)?,
        slope,
    );
    let (a_saved, bias_saved, out) =
        forward_saved(&logits, &bias, |a, m| dape_v1(a, m, dims, span, &mlp))?;

    let state = Arc::new(V1State {
        logits: a_saved,
        bias: bias_saved,
        dims,
        span: span.clone(),
        mlp,
    });
    let parents = [
        Some(prim(logits)),
        bias.map(prim),
        Some(prim(w1t)),
        b1.map(prim),
        Some(prim(w2t)),
        b2.map(prim),
    ];
    cast(record_dape_node(V1Backward, parents, state, out, &device))
}

/// What the backward pass of [`dape_v1_autodiff`] needs, on the host.
#[derive(Debug)]
struct V1State {
    /// The logits (`f32`, checked in the forward pass).
    logits: burn_ndarray::NdArrayTensor,
    /// The base bias's map (`f32`).
    bias: Option<burn_ndarray::NdArrayTensor>,
    dims: [usize; 4],
    span: Span,
    mlp: Mlp,
}

#[derive(Debug)]
struct V1Backward;

impl Backward<Nd, 6> for V1Backward {
    type State = Arc<V1State>;

    fn backward(self, ops: Ops<Self::State, 6>, grads: &mut Gradients, _: &mut Checkpointer) {
        let st = Arc::clone(&ops.state);
        let Mlp { c, d, h, .. } = st.mlp;
        node_backward(
            ops,
            grads,
            &st.logits,
            st.bias.as_ref(),
            |logits, bias, grad| {
                let g =
                    dape_v1_backward(logits, bias, ZGrad::Given(grad), st.dims, &st.span, &st.mlp);
                [
                    (g.logits, st.dims.to_vec()),
                    (g.bias.unwrap_or_default(), bias_shape(bias, st.dims)),
                    (g.w1t, vec![c, d]),
                    (g.b1, vec![d]),
                    (g.w2t, vec![d, h]),
                    (g.b2, vec![h]),
                ]
            },
        );
    }
}

/// DAPE V2's fused operation on `Autodiff<NdArray<f32>>`: the forward pass of [`dape_v2`],
/// recorded as one node whose backward is [`dape_v2_backward`]; the state keeps the logits and
/// the bias map, not the hidden channels. The convolutions' weights are `Conv2d`'s
/// (`[D, C, 1, k]`, `[H, D, 1, k]`). `B` must be `Autodiff<NdArray<f32>>`
/// ([`applies_autodiff`]); `None` when a tensor is not `f32` or the map is not `[1 or batch, H,
/// rows, keys]`.
///
/// [`applies_autodiff`]: super::applies_autodiff
#[allow(clippy::too_many_arguments)]
pub(crate) fn dape_v2_autodiff<B: Backend>(
    logits: Tensor<B, 4>,
    bias: Option<Tensor<B, 4>>,
    w1: Tensor<B, 4>,
    b1: Option<Tensor<B, 1>>,
    w2: Tensor<B, 4>,
    b2: Option<Tensor<B, 1>>,
    span: &Span,
    slope: f32,
    mask_future_hidden: bool,
) -> Option<Tensor<B, 4>> {
    let logits: Tensor<Ad, 4> = cast(logits)?;
    let bias: Option<Tensor<Ad, 4>> = cast_opt(bias)?;
    let (w1, w2): (Tensor<Ad, 4>, Tensor<Ad, 4>) = (cast(w1)?, cast(w2)?);
    let b1: Option<Tensor<Ad, 1>> = cast_opt(b1)?;
    let b2: Option<Tensor<Ad, 1>> = cast_opt(b2)?;
    let device = logits.device();
    let dims = logits.dims();
    let [_, h, _, _] = dims;
    let [d, c, _, k] = w1.dims();
    if !map_fits(&bias, dims) || w2.dims() != [h, d, 1, k] {
        return None;
    }
    let convs = KeyConvs {
        dims: [c, d, h, k],
        w1: host(w1.clone().inner())?,
        b1: host_opt(&b1)?.unwrap_or_else(|| vec![0.0; d]),
        w2: host(w2.clone().inner())?,
        b2: host_opt(&b2)?.unwrap_or_else(|| vec![0.0; h]),
        slope,
        mask_future_hidden,
    };
    let (a_saved, bias_saved, out) =
        forward_saved(&logits, &bias, |a, m| dape_v2(a, m, dims, span, &convs))?;
    let state = Arc::new(V2State {
        logits: a_saved,
        bias: bias_saved,
        dims,
        span: span.clone(),
        convs,
    });
    let parents = [
        Some(prim(logits)),
        bias.map(prim),
        Some(prim(w1)),
        b1.map(prim),
        Some(prim(w2)),
        b2.map(prim),
    ];
    cast(record_dape_node(V2Backward, parents, state, out, &device))
}

/// What the backward pass of [`dape_v2_autodiff`] needs, on the host.
#[derive(Debug)]
struct V2State {
    logits: burn_ndarray::NdArrayTensor,
    bias: Option<burn_ndarray::NdArrayTensor>,
    dims: [usize; 4],
    span: Span,
    convs: KeyConvs,
}

#[derive(Debug)]
struct V2Backward;

impl Backward<Nd, 6> for V2Backward {
    type State = Arc<V2State>;

    fn backward(self, ops: Ops<Self::State, 6>, grads: &mut Gradients, _: &mut Checkpointer) {
        let st = Arc::clone(&ops.state);
        let [c, d, h, k] = st.convs.dims;
        node_backward(
            ops,
            grads,
            &st.logits,
            st.bias.as_ref(),
            |logits, bias, grad| {
                let g = dape_v2_backward(
                    logits,
                    bias,
                    ZGrad::Given(grad),
                    st.dims,
                    &st.span,
                    &st.convs,
                );
                [
                    (g.logits, st.dims.to_vec()),
                    (g.bias.unwrap_or_default(), bias_shape(bias, st.dims)),
                    (g.w1, vec![d, c, 1, k]),
                    (g.b1, vec![d]),
                    (g.w2, vec![h, d, 1, k]),
                    (g.b2, vec![h]),
                ]
            },
        );
    }
}

/// Whether a fused node's bias map fits logits `dims`: `[1, H, rows, keys]` or `[batch, H, rows,
/// keys]` (or absent).
fn map_fits(bias: &Option<Tensor<Ad, 4>>, dims: [usize; 4]) -> bool {
    let [_, h, lq, lk] = dims;
    bias.as_ref()
        .is_none_or(|m| m.dims() == [1, h, lq, lk] || m.dims() == dims)
}

/// The forward pass of a fused node: `kernel(logits, bias map)` on the host values, and the
/// inputs that the backward pass keeps (the tensors themselves, shared, not copied). `None` when
/// a tensor is not `f32`.
#[allow(clippy::type_complexity)]
fn forward_saved(
    logits: &Tensor<Ad, 4>,
    bias: &Option<Tensor<Ad, 4>>,
    kernel: impl FnOnce(Vec<f32>, Option<&[f32]>) -> Vec<f32>,
) -> Option<(
    burn_ndarray::NdArrayTensor,
    Option<burn_ndarray::NdArrayTensor>,
    FloatTensor<Nd>,
)> {
    let dims = logits.dims();
    let a_saved = logits.clone().inner().into_primitive().tensor();
    let bias_saved = bias
        .as_ref()
        .map(|m| m.clone().inner().into_primitive().tensor());
    let bias_values = match &bias_saved {
        Some(m) => Some(row_major_values(m)?),
        None => None,
    };
    let out = kernel(
        row_major_values(&a_saved)?.into_owned(),
        bias_values.as_deref(),
    );
    drop(bias_values);
    let out = Tensor::<Nd, 4>::from_data(TensorData::new(out, dims), &logits.device())
        .into_primitive()
        .tensor();
    Some((a_saved, bias_saved, out))
}

/// The autodiff primitive of a tensor.
pub(super) fn prim<const D: usize>(t: Tensor<Ad, D>) -> FloatTensor<Ad> {
    t.into_primitive().tensor()
}

/// Records a fused DAPE node over its `N` parents (here: logits, bias map, first layer's weight
/// and bias, second layer's weight and bias; a constant stands in for an absent one and never
/// requires a gradient) with its backward pass and state, and returns the output tensor.
pub(super) fn record_dape_node<BW: Backward<Nd, N>, const N: usize>(
    backward: BW,
    parents: [Option<FloatTensor<Ad>>; N],
    state: BW::State,
    out: FloatTensor<Nd>,
    device: &burn_ndarray::NdArrayDevice,
) -> Tensor<Ad, 4> {
    let nodes = parents.map(|p| {
        p.unwrap_or_else(|| prim(Tensor::<Ad, 1>::zeros([1], device)))
            .node
    });
    let out = finish_node(
        backward
            .prepare::<NoCheckpointing>(nodes)
            .compute_bound()
            .stateful(),
        state,
        out,
    );
    Tensor::<Ad, 4>::from_primitive(TensorPrimitive::Float(out))
}

/// Host values of an optional `f32` layer bias: `Some(None)` when absent, `None` when not `f32`.
pub(super) fn host_opt<B: Backend>(b: &Option<Tensor<B, 1>>) -> Option<Option<Vec<f32>>> {
    match b {
        Some(b) => host(b.clone()).map(Some),
        None => Some(None),
    }
}

/// The shape of a bias map of `bias.len()` values over logits `dims`: `[1 or batch, H, rows,
/// keys]` (empty without a bias).
fn bias_shape(bias: Option<&[f32]>, [_, h, lq, lk]: [usize; 4]) -> Vec<usize> {
    bias.map_or_else(Vec::new, |m| {
        vec![m.len() / (h * lq * lk).max(1), h, lq, lk]
    })
}

/// The backward pass of a fused DAPE node: reads its saved inputs and the output gradient,
/// computes the six gradients `(values, shape)` in the parents' order (logits, bias map, the
/// layers' weights and biases) with `compute(logits, bias, grad)`, and registers those of
/// tracked parents.
fn node_backward<S>(
    ops: Ops<S, 6>,
    grads: &mut Gradients,
    logits: &burn_ndarray::NdArrayTensor,
    bias: Option<&burn_ndarray::NdArrayTensor>,
    compute: impl FnOnce(&[f32], Option<&[f32]>, &[f32]) -> [(Vec<f32>, Vec<usize>); 6],
) {
    let grad = grads.consume::<Nd>(&ops.node);
    let grad = row_major_values(&grad).expect("the gradient of an f32 output is f32");
    let logits = row_major_values(logits).expect("f32 logits (checked forward)");
    let bias = bias.map(|m| row_major_values(m).expect("an f32 bias map (checked forward)"));
    let values = compute(&logits, bias.as_deref(), &grad);
    register(ops.parents.map(|p| p.map(|n| n.id)), values, grads);
}

/// Registers the gradients `(values, shape)` of the tracked parents (`Some(id)`), in the
/// parents' order.
pub(super) fn register(
    parents: impl IntoIterator<Item = Option<NodeId>>,
    values: impl IntoIterator<Item = (Vec<f32>, Vec<usize>)>,
    grads: &mut Gradients,
) {
    let device = Default::default();
    for (parent, (values, shape)) in parents.into_iter().zip(values) {
        if let Some(id) = parent {
            let t = Nd::float_from_data(TensorData::new(values, shape), &device);
            grads.register::<Nd>(id, t);
        }
    }
}
