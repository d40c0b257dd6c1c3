//! Attention on LibTorch: PyTorch's CPU flash attention forward and backward (the bias and the
//! causal mask as one float mask), or, for a bias that needs a gradient, one node of PyTorch's
//! matrix products and softmax kernels; over separate q, k, v or views of the packed
//! projection, whose gradient is written packed in one copy.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::Backward;
use burn::backend::autodiff::ops::Ops;
use burn::backend::libtorch::TchTensor;
use burn::prelude::*;
use burn::tensor::TensorPrimitive;

use super::softmax::{future_mask, softmax_grad};
use super::{applies, applies_autodiff, finish, Ta, Tb};
use crate::kernel::cast;
use crate::kernel::cast_opt;

/// What an attention node with a learned bias keeps: the scaled queries, the keys and values,
/// and the probabilities (as PyTorch's eager attention keeps them), and whether one bias
/// serves the whole batch.
#[derive(Clone, Debug)]
struct BiasedAttentionState {
    q_scaled: TchTensor,
    k: TchTensor,
    v: TchTensor,
    probs: TchTensor,
    scale: f64,
    shared_bias: bool,
}

/// The gradient of a packed projection `qkv` `[batch, seq, 3 · heads, d_head]` from those of
/// its q, k and v views `[batch, heads, seq, d_head]`: one copy into the packed layout.
fn packed_grad(dq: &tch::Tensor, dk: &tch::Tensor, dv: &tch::Tensor) -> tch::Tensor {
    tch::Tensor::cat(
        &[dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)],
        2,
    )
}

/// q, k and v as views `[batch, heads, seq, d_head]` of a packed projection `[batch, seq,
/// 3 · heads, d_head]` (no copy).
fn unpack(qkv: &tch::Tensor, heads: i64) -> [tch::Tensor; 3] {
    [0, 1, 2].map(|i| qkv.narrow(2, i * heads, heads).transpose(1, 2))
}

/// The backward pass of an attention node with a learned bias. Its parents are q, k, v and the
/// bias (`N = 4`), or the packed projection and the bias (`N = 2`).
#[derive(Debug)]
struct BiasedAttentionBackward<const N: usize>;

impl<const N: usize> Backward<Tb, N> for BiasedAttentionBackward<N> {
    type State = BiasedAttentionState;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let g = grads.consume::<Tb>(&ops.node).tensor;
        let s = &ops.state;
        let (qs, k, v, p) = (
            &s.q_scaled.tensor,
            &s.k.tensor,
            &s.v.tensor,
            &s.probs.tensor,
        );
        let ids = ops.parents.each_ref().map(|p| p.as_ref().map(|n| n.id));
        let (pq, pk, pv, pb) = if N == 2 {
            (ids[0], ids[0], ids[0], ids[1])
        } else {
            (ids[0], ids[1], ids[2], ids[3])
        };
        let dv = pv.map(|_| p.transpose(-2, -1).matmul(&g));
        let (dq, dk, db) = if pq.is_none() && pk.is_none() && pb.is_none() {
            (None, None, None)
        } else {
            // dS = softmax'(dO vᵀ): the gradient of the biased, scaled logits.
            let ds = softmax_grad(&g.matmul(&v.transpose(-2, -1)), p);
            let dq = pq.map(|_| ds.matmul(k) * s.scale);
            let dk = pk.map(|_| ds.transpose(-2, -1).matmul(qs));
            let db = pb.map(|_| {
                if s.shared_bias {
                    ds.sum_dim_intlist([0i64].as_slice(), true, None)
                } else {
                    ds
                }
            });
            (dq, dk, db)
        };
        if N == 2 {
            if let (Some(id), Some(dq), Some(dk), Some(dv)) = (pq, &dq, &dk, &dv) {
                grads.register::<Tb>(id, TchTensor::new(packed_grad(dq, dk, dv)));
            }
        } else {
            for (id, grad) in [(pq, dq), (pk, dk), (pv, dv)] {
                if let (Some(id), Some(grad)) = (id, grad) {
                    grads.register::<Tb>(id, TchTensor::new(grad));
                }
            }
        }
        if let (Some(id), Some(db)) = (pb, db) {
            grads.register::<Tb>(id, TchTensor::new(db));
        }
    }
}

/// Attention with a bias that needs a gradient, on `Autodiff<LibTorch<f32>>`, as one graph
/// node: forward the scaled logits, the bias and mask added in place, PyTorch's softmax and the
/// product with v; backward PyTorch's softmax backward kernel between the four matrix
/// products, and the bias's gradient from the logits' (summed over the batch for a shared
/// bias). PyTorch's flash kernel gives no gradient for its mask; this node costs what eager
/// PyTorch's attention costs, in one node rather than Burn's composite of a dozen. `qkv` are
/// q, k and v `[batch, heads, seq, d]`, views of the node's first parent when it is packed
/// (`N = 2`); the output is `[batch, rows, heads, d_v]`.
fn learned_bias_attention<const N: usize>(
    [qt, kt, vt]: [tch::Tensor; 3],
    bias: &tch::Tensor,
    nodes: [burn::tensor::ops::FloatTensor<Ta>; N],
    scale: f64,
    causal_from: Option<usize>,
) -> Tensor<Ta, 4> {
    let size = qt.size();
    let (rows, keys) = (size[2], kt.size()[2]);
    // The causal mask goes into the bias (`[1 or batch, ..]`) rather than over the logits.
    let (mask, _) = float_mask(Some(bias), rows, keys, causal_from, &qt);
    let q_scaled = &qt * scale;
    let mut logits = q_scaled.matmul(&kt.transpose(-2, -1));
    if let Some(mask) = &mask {
        let _ = logits.g_add_(mask);
    }
    let probs = logits.internal_softmax(-1, false);
    let out = TchTensor::new(probs.matmul(&vt));
    let shared_bias = bias.size()[0] == 1 && size[0] > 1;
    let state = BiasedAttentionState {
        q_scaled: TchTensor::new(q_scaled),
        k: TchTensor::new(kt),
        v: TchTensor::new(vt),
        probs: TchTensor::new(probs),
        scale,
        shared_bias,
    };
    let out = finish(
        BiasedAttentionBackward::<N>
            .prepare::<NoCheckpointing>(nodes.map(|t| t.node))
            .compute_bound()
            .stateful(),
        state,
        out,
    );
    Tensor::<Ta, 4>::from_primitive(TensorPrimitive::Float(out)).swap_dims(1, 2)
}

/// The additive float mask of one attention call: `bias` (if any) with `-inf` at the keys
/// after each row's own position (`causal_from = Some(q0)`: row `r` sees keys `0..=q0 + r`),
/// and whether PyTorch's own top-left causal flag says the same without a mask (no bias, the
/// first row at position 0).
fn float_mask(
    bias: Option<&tch::Tensor>,
    rows: i64,
    keys: i64,
    causal_from: Option<usize>,
    like: &tch::Tensor,
) -> (Option<tch::Tensor>, bool) {
    match (bias, causal_from) {
        (None, None) => (None, false),
        (None, Some(0)) => (None, true),
        (Some(b), None) => (Some(b.shallow_clone()), false),
        (bias, Some(q0)) => {
            let future = future_mask(rows, keys, q0, like.device());
            let base = match bias {
                Some(b) => b.shallow_clone(),
                None => tch::Tensor::zeros([1, 1, rows, keys], (like.kind(), like.device())),
            };
            (Some(base.masked_fill(&future, f64::NEG_INFINITY)), false)
        }
    }
}

/// What an attention node keeps: q, k, v, the output and its row log-sum-exps, the mask.
#[derive(Clone, Debug)]
struct AttentionState {
    q: TchTensor,
    k: TchTensor,
    v: TchTensor,
    out: TchTensor,
    lse: TchTensor,
    mask: Option<TchTensor>,
    is_causal: bool,
    scale: f64,
}

/// The backward pass of a flash-attention node: its parents are q, k and v (`N = 3`) or the
/// packed projection (`N = 1`).
#[derive(Debug)]
struct AttentionBackward<const N: usize>;

impl<const N: usize> Backward<Tb, N> for AttentionBackward<N> {
    type State = AttentionState;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let g = grads.consume::<Tb>(&ops.node).tensor.contiguous();
        let s = &ops.state;
        let (dq, dk, dv) =
            tch::Tensor::internal_scaled_dot_product_flash_attention_for_cpu_backward(
                &g,
                &s.q.tensor,
                &s.k.tensor,
                &s.v.tensor,
                &s.out.tensor,
                &s.lse.tensor,
                0.0,
                s.is_causal,
                s.mask.as_ref().map(|m| &m.tensor),
                s.scale,
            );
        if N == 1 {
            if let Some(p) = &ops.parents[0] {
                grads.register::<Tb>(p.id, TchTensor::new(packed_grad(&dq, &dk, &dv)));
            }
            return;
        }
        for (parent, grad) in ops.parents.iter().zip([dq, dk, dv]) {
            if let Some(p) = parent {
                grads.register::<Tb>(p.id, TchTensor::new(grad));
            }
        }
    }
}

/// The bias of an attention call when it needs a gradient (the flash kernel gives none).
fn learned(bias: &Option<burn::tensor::ops::FloatTensor<Ta>>) -> Option<&tch::Tensor> {
    bias.as_ref()
        .filter(|b| !b.node.requirement.is_none())
        .map(|b| &b.primitive.tensor)
}

/// Flash attention forward on the CPU: the output `[batch, heads, rows, d_v]` and its row
/// log-sum-exps; `None` off the CPU or when PyTorch refuses the call.
fn flash_forward(
    q: &tch::Tensor,
    k: &tch::Tensor,
    v: &tch::Tensor,
    mask: Option<&tch::Tensor>,
    is_causal: bool,
    scale: f64,
) -> Option<(tch::Tensor, tch::Tensor)> {
    if q.device() != tch::Device::Cpu {
        return None;
    }
    tch::Tensor::f_internal_scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, is_causal, mask, scale,
    )
    .ok()
}

/// Flash attention over q, k and v `[batch, heads, seq, d]` on LibTorch, with or without
/// autodiff (`bias_plain` without, `bias` with; neither needs a gradient): the output
/// `[batch, rows, heads, d_v]`. Under autodiff `nodes` are the node's parents: q, k and v
/// (`N = 3`), or the packed projection they are views of (`N = 1`). `None` off the CPU, or
/// when PyTorch refuses the call.
fn attention_from<B: Backend, const N: usize>(
    qkv: [tch::Tensor; 3],
    nodes: Option<[burn::tensor::ops::FloatTensor<Ta>; N]>,
    bias: Option<burn::tensor::ops::FloatTensor<Ta>>,
    bias_plain: Option<tch::Tensor>,
    scale: f64,
    causal_from: Option<usize>,
) -> Option<Tensor<B, 4>> {
    let [q, k, v] = qkv;
    let (rows, keys) = (q.size()[2], k.size()[2]);
    let Some(nodes) = nodes else {
        // No autodiff: the flash kernel forward.
        let (mask, is_causal) = float_mask(bias_plain.as_ref(), rows, keys, causal_from, &q);
        let (out, _) = flash_forward(&q, &k, &v, mask.as_ref(), is_causal, scale)?;
        let out = Tensor::<Tb, 4>::from_primitive(TensorPrimitive::Float(TchTensor::new(out)));
        return cast(out.swap_dims(1, 2));
    };
    let (mask, is_causal) = float_mask(
        bias.as_ref().map(|b| &b.primitive.tensor),
        rows,
        keys,
        causal_from,
        &q,
    );
    let (out, lse) = flash_forward(&q, &k, &v, mask.as_ref(), is_causal, scale)?;
    let out = TchTensor::new(out);
    let state = AttentionState {
        q: TchTensor::new(q),
        k: TchTensor::new(k),
        v: TchTensor::new(v),
        out: out.clone(),
        lse: TchTensor::new(lse),
        mask: mask.map(TchTensor::new),
        is_causal,
        scale,
    };
    let out = finish(
        AttentionBackward::<N>
            .prepare::<NoCheckpointing>(nodes.map(|t| t.node))
            .compute_bound()
            .stateful(),
        state,
        out,
    );
    let out = Tensor::<Ta, 4>::from_primitive(TensorPrimitive::Float(out));
    cast(out.swap_dims(1, 2))
}

/// [`crate::kernel::attention`] on LibTorch: the output `[batch, rows, heads, d_v]`, or `None`
/// where it does not apply (another backend, not the CPU). The caller has checked the shapes
/// and element types.
pub(crate) fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    bias: Option<Tensor<B, 4>>,
    scale: f32,
    causal_from: Option<usize>,
) -> Option<Tensor<B, 4>> {
    let scale = f64::from(scale);
    if applies::<B>() {
        let [q, k, v]: [Tensor<Tb, 4>; 3] = [cast(q)?, cast(k)?, cast(v)?];
        let bias: Option<Tensor<Tb, 4>> = cast_opt(bias)?;
        let qkv = [q, k, v].map(|t| t.into_primitive().tensor().tensor);
        let bias = bias.map(|b| b.into_primitive().tensor().tensor);
        return attention_from::<B, 3>(qkv, None, None, bias, scale, causal_from);
    }
    if !applies_autodiff::<B>() {
        return None;
    }
    let [q, k, v]: [Tensor<Ta, 4>; 3] = [cast(q)?, cast(k)?, cast(v)?];
    let bias: Option<Tensor<Ta, 4>> = cast_opt(bias)?;
    let bias = bias.map(|b| b.into_primitive().tensor());
    let [q, k, v] = [q, k, v].map(|t| t.into_primitive().tensor());
    let tensors = [&q, &k, &v].map(|t| t.primitive.tensor.shallow_clone());
    if let Some(b) = learned(&bias) {
        let parents = [q, k, v, bias.clone()?];
        return cast(learned_bias_attention(
            tensors,
            &b.shallow_clone(),
            parents,
            scale,
            causal_from,
        ));
    }
    attention_from::<B, 3>(tensors, Some([q, k, v]), bias, None, scale, causal_from)
}

/// [`crate::kernel::attention_packed`] on LibTorch: q, k and v read as views of the packed
/// projection `qkv` `[batch, seq, 3 · heads, d_head]` (no copies), and under autodiff one node
/// whose parent is `qkv` itself, its gradient written in the packed layout at once (the
/// split's three narrows would each fill a zero tensor of `qkv`'s size and add it). The
/// output is `[batch, seq, heads, d_head]`. The caller has checked the shapes.
pub(crate) fn attention_packed<B: Backend>(
    qkv: Tensor<B, 4>,
    heads: usize,
    bias: Option<Tensor<B, 4>>,
    scale: f32,
    causal_from: Option<usize>,
) -> Option<Tensor<B, 4>> {
    let (scale, heads) = (f64::from(scale), heads as i64);
    if applies::<B>() {
        let qkv: Tensor<Tb, 4> = cast(qkv)?;
        let bias: Option<Tensor<Tb, 4>> = cast_opt(bias)?;
        let views = unpack(&qkv.into_primitive().tensor().tensor, heads);
        let bias = bias.map(|b| b.into_primitive().tensor().tensor);
        return attention_from::<B, 1>(views, None, None, bias, scale, causal_from);
    }
    if !applies_autodiff::<B>() {
        return None;
    }
    let qkv: Tensor<Ta, 4> = cast(qkv)?;
    let bias: Option<Tensor<Ta, 4>> = cast_opt(bias)?;
    let bias = bias.map(|b| b.into_primitive().tensor());
    let qkv = qkv.into_primitive().tensor();
    let views = unpack(&qkv.primitive.tensor, heads);
    if let Some(b) = learned(&bias) {
        let parents = [qkv, bias.clone()?];
        return cast(learned_bias_attention(
            views,
            &b.shallow_clone(),
            parents,
            scale,
            causal_from,
        ));
    }
    attention_from::<B, 1>(views, Some([qkv]), bias, None, scale, causal_from)
}
