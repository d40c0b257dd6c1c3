//! The attention node over one packed projection `qkv` `[batch, seq, 3·heads, d_head]`: q, k
//! and v read through their strides, and the backward pass writes the packed gradient at once.

use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::Backward;
use burn::backend::autodiff::ops::Ops;
use burn::prelude::*;
use burn::tensor::ops::FloatTensorOps;
use burn::tensor::TensorData;
use burn::tensor::TensorPrimitive;

use super::attention::{view4, AttentionViews};
use super::node::{backward_for_parents, finish_node};
use super::{to_nd, Ad, Nd};
use crate::kernel::cast;
use crate::kernel::cast_opt;

/// q, k and v `[batch, heads, seq, d_head]` as strided views of a packed
/// `[batch, seq, 3 · heads, d_head]` projection (no copies).
fn packed_views<'a>(
    qkv: &'a burn_ndarray::NdArrayTensor,
    heads: usize,
    bias: Option<&'a burn_ndarray::NdArrayTensor>,
    scale: f32,
    causal_from: Option<usize>,
) -> Option<AttentionViews<'a>> {
    use ndarray::s;
    let packed = view4(qkv)?;
    if heads == 0 || packed.dim().2 != 3 * heads {
        return None;
    }
    let [q, k, v] = [0, 1, 2].map(|i| {
        packed
            .slice_move(s![.., .., i * heads..(i + 1) * heads, ..])
            .permuted_axes([0, 2, 1, 3])
    });
    Some(AttentionViews {
        q,
        k,
        v,
        bias: match bias {
            Some(t) => Some(view4(t)?),
            None => None,
        },
        scale,
        causal_from,
        sticks: None,
    })
}

fn packed_out_dims(qkv: [usize; 4], heads: usize) -> [usize; 4] {
    [qkv[0], qkv[1], heads, qkv[3]]
}

pub(in crate::kernel) fn attention_packed_nd<B: Backend>(
    qkv: Tensor<B, 4>,
    heads: usize,
    bias: Option<Tensor<B, 4>>,
    scale: f32,
    causal_from: Option<usize>,
) -> Option<Tensor<B, 4>> {
    let qkv: Tensor<Nd, 4> = cast(qkv)?;
    let bias: Option<Tensor<Nd, 4>> = cast_opt(bias)?;
    let (dims, device) = (packed_out_dims(qkv.dims(), heads), qkv.device());
    let qkv = qkv.into_primitive().tensor();
    let bias = bias.map(|t| t.into_primitive().tensor());
    let y = packed_views(&qkv, heads, bias.as_ref(), scale, causal_from)?.forward();
    cast(to_nd(y, dims, &device))
}

/// What a packed attention node keeps: its inputs and output (shared, not copied).
#[derive(Clone, Debug)]
struct PackedAttentionState {
    qkv: burn_ndarray::NdArrayTensor,
    heads: usize,
    bias: Option<burn_ndarray::NdArrayTensor>,
    out: burn_ndarray::NdArrayTensor,
    scale: f32,
    causal_from: Option<usize>,
}

/// The backward pass of a packed attention node with `N` parents (the packed q, k, v, and
/// the bias when there is one).
#[derive(Debug)]
struct PackedAttentionBackward<const N: usize>;

fn packed_attention_backward<const N: usize>(
    ops: Ops<PackedAttentionState, N>,
    grads: &mut Gradients,
) {
    let grad = grads.consume::<Nd>(&ops.node);
    let s = &ops.state;
    let views = packed_views(&s.qkv, s.heads, s.bias.as_ref(), s.scale, s.causal_from)
        .expect("a packed attention node keeps an f32 4-d input");
    let bias_grad = N == 2 && ops.parents[N - 1].is_some();
    let o = view4(&s.out).expect("f32 output");
    let g = view4(&grad).expect("the gradient of an f32 output is f32");
    let [dqkv, dbias] = views.backward_packed(o, g, bias_grad);
    let device = Default::default();
    if let Some(parent) = &ops.parents[0] {
        let shape = view4(&s.qkv).expect("f32 input").shape().to_vec();
        let t = Nd::float_from_data(TensorData::new(dqkv, shape), &device);
        grads.register::<Nd>(parent.id, t);
    }
    if let (true, Some(parent), Some(bias)) = (
        bias_grad,
        ops.parents.get(1).and_then(|p| p.as_ref()),
        &views.bias,
    ) {
        let t = Nd::float_from_data(TensorData::new(dbias, bias.shape().to_vec()), &device);
        grads.register::<Nd>(parent.id, t);
    }
}

backward_for_parents!(
    PackedAttentionBackward,
    PackedAttentionState,
    packed_attention_backward,
    [1, 2]
);

pub(in crate::kernel) fn attention_packed_autodiff<B: Backend>(
    qkv: Tensor<B, 4>,
    heads: usize,
    bias: Option<Tensor<B, 4>>,
    scale: f32,
    causal_from: Option<usize>,
) -> Option<Tensor<B, 4>> {
    let qkv: Tensor<Ad, 4> = cast(qkv)?;
    let bias: Option<Tensor<Ad, 4>> = cast_opt(bias)?;
    let (dims, device) = (packed_out_dims(qkv.dims(), heads), qkv.device());
    let qkv = qkv.into_primitive().tensor();
    let bias = bias.map(|t| t.into_primitive().tensor());
    let y = packed_views(
        &qkv.primitive,
        heads,
        bias.as_ref().map(|t| &t.primitive),
        scale,
        causal_from,
    )?
    .forward();
    let out = to_nd(y, dims, &device).into_primitive().tensor();
    let state = PackedAttentionState {
        qkv: qkv.primitive,
        heads,
        bias: bias.as_ref().map(|t| t.primitive.clone()),
        out: out.clone(),
        scale,
        causal_from,
    };
    let out = match bias {
        Some(t) => finish_node(
            PackedAttentionBackward::<2>
                .prepare::<NoCheckpointing>([qkv.node, t.node])
                .compute_bound()
                .stateful(),
            state,
            out,
        ),
        None => finish_node(
            PackedAttentionBackward::<1>
                .prepare::<NoCheckpointing>([qkv.node])
                .compute_bound()
                .stateful(),
            state,
            out,
        ),
    };
    cast(Tensor::<Ad, 4>::from_primitive(TensorPrimitive::Float(out)))
}
