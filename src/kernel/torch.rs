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
//!   of the tensor path are never kept.
//! * **AdamW** ([`crate::optim::FusedAdamW`]): the parameter and both moments updated in place
//!   by PyTorch's `lerp_`, `mul_` and `addcdiv_`, the clipping factor kept on the device.
//! * **GELU**: Burn's own `gelu`, which is PyTorch's exact (erf) GELU forward and backward on
//!   LibTorch; elsewhere the crate writes it from `erf` (Burn's default `gelu_backward` is the
//!   tanh approximation's derivative).

use std::any::TypeId;

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::NoCheckpointing};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::libtorch::TchTensor;
use burn::backend::{Autodiff, LibTorch};
use burn::prelude::*;
use burn::tensor::TensorPrimitive;

use super::{adamw_fits, cast, cast_opt, AdamWResult, AdamWStep, Moments};

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

/// What a layer-norm node keeps for its backward pass: the input, gamma and the rows' means
/// and reciprocal standard deviations (`[.., 1]`, from `native_layer_norm`).
#[derive(Clone, Debug)]
struct LayerNormState {
    x: TchTensor,
    gamma: TchTensor,
    mean: TchTensor,
    rstd: TchTensor,
}

/// The backward pass of a layer-norm node with `N` parents (input, gamma, and beta when there
/// is one).
#[derive(Debug)]
struct LayerNormBackward<const N: usize>;

impl<const N: usize> Backward<Tb, N> for LayerNormBackward<N> {
    type State = LayerNormState;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let g = grads.consume::<Tb>(&ops.node).tensor;
        let s = &ops.state;
        let (x, gamma, mean, rstd) = (&s.x.tensor, &s.gamma.tensor, &s.mean.tensor, &s.rstd.tensor);
        let last: &[i64] = &[-1];
        let lead: Vec<i64> = (0..x.dim() as i64 - 1).collect();
        let xhat = (x - mean) * rstd;
        // dx = rstd · (g γ − mean(g γ) − x̂ · mean(g γ x̂)), per row.
        let gg = &g * gamma;
        let a = gg.mean_dim(last, true, None);
        let c = (&gg * &xhat).mean_dim(last, true, None);
        let dx = (gg - a - &xhat * c) * rstd;
        let parents = &ops.parents;
        if let Some(p) = &parents[0] {
            grads.register::<Tb>(p.id, TchTensor::new(dx));
        }
        if let Some(p) = &parents[1] {
            let dgamma = (&g * &xhat).sum_dim_intlist(lead.as_slice(), false, None);
            grads.register::<Tb>(p.id, TchTensor::new(dgamma));
        }
        if N == 3 {
            if let Some(p) = &parents[N - 1] {
                let dbeta = g.sum_dim_intlist(lead.as_slice(), false, None);
                grads.register::<Tb>(p.id, TchTensor::new(dbeta));
            }
        }
    }
}

/// Layer normalization over the last dimension as one graph node on `Autodiff<LibTorch<f32>>`
/// (see the module's docs); `None` on any other backend.
pub(crate) fn layer_norm_autodiff<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    gamma: Tensor<B, 1>,
    beta: Option<Tensor<B, 1>>,
    eps: f64,
) -> Option<Tensor<B, D>> {
    if !applies_autodiff::<B>() || D == 0 {
        return None;
    }
    let x: Tensor<Ta, D> = cast(x)?;
    let gamma: Tensor<Ta, 1> = cast(gamma)?;
    let beta: Option<Tensor<Ta, 1>> = cast_opt(beta)?;
    let d = x.dims()[D - 1] as i64;
    let (x, gamma) = (x.into_primitive().tensor(), gamma.into_primitive().tensor());
    let beta = beta.map(|b| b.into_primitive().tensor());
    let (out, mean, rstd) = x
        .primitive
        .tensor
        .f_native_layer_norm(
            [d],
            Some(&gamma.primitive.tensor),
            beta.as_ref().map(|b| &b.primitive.tensor),
            eps,
        )
        .ok()?;
    let state = LayerNormState {
        x: x.primitive.clone(),
        gamma: gamma.primitive.clone(),
        mean: TchTensor::new(mean),
        rstd: TchTensor::new(rstd),
    };
    let out = TchTensor::new(out);
    let out = match beta {
        Some(b) => finish(
            LayerNormBackward::<3>
                .prepare::<NoCheckpointing>([x.node, gamma.node, b.node])
                .compute_bound()
                .stateful(),
            state,
            out,
        ),
        None => finish(
            LayerNormBackward::<2>
                .prepare::<NoCheckpointing>([x.node, gamma.node])
                .compute_bound()
                .stateful(),
            state,
            out,
        ),
    };
    cast(Tensor::<Ta, D>::from_primitive(TensorPrimitive::Float(out)))
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

/// The causal mask of `rows` query rows from absolute position `q0` over `keys` keys: `true`
/// at the keys after each row's own position (row `r` sees keys `0..=q0 + r`).
fn future_mask(rows: i64, keys: i64, q0: usize, device: tch::Device) -> tch::Tensor {
    tch::Tensor::ones([rows, keys], (tch::Kind::Bool, device)).triu(q0 as i64 + 1)
}

/// Softmax over the last dimension of `logits` with the causal mask of `causal_from` folded
/// in, by PyTorch's softmax kernel (the input is left as it is).
fn masked_softmax(logits: &tch::Tensor, causal_from: Option<usize>) -> tch::Tensor {
    match causal_from {
        Some(q0) => {
            let size = logits.size();
            let (rows, keys) = (size[size.len() - 2], size[size.len() - 1]);
            logits
                .masked_fill(
                    &future_mask(rows, keys, q0, logits.device()),
                    f64::NEG_INFINITY,
                )
                .internal_softmax(-1, false)
        }
        None => logits.internal_softmax(-1, false),
    }
}

/// The backward pass of a softmax node: its input's gradient from the output's, by PyTorch's
/// kernel (`p ⊙ (g − Σ g p)` per row; 0 where the mask made `p` 0).
fn softmax_grad(g: &tch::Tensor, probs: &tch::Tensor) -> tch::Tensor {
    tch::Tensor::internal_softmax_backward_data(g, probs, -1, tch::Kind::Float)
}

#[derive(Debug)]
struct SoftmaxBackward;

impl Backward<Tb, 1> for SoftmaxBackward {
    type State = TchTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let g = grads.consume::<Tb>(&ops.node).tensor;
        if let Some(p) = &ops.parents[0] {
            grads.register::<Tb>(p.id, TchTensor::new(softmax_grad(&g, &ops.state.tensor)));
        }
    }
}

/// [`crate::kernel::fused_softmax`] on LibTorch (`[.., rows, keys]` logits): the mask and
/// PyTorch's softmax forward, and under autodiff one graph node whose backward pass is
/// PyTorch's softmax backward kernel from the kept probabilities (Burn's softmax is five ops
/// each way). `None` on any other backend.
pub(crate) fn softmax<B: Backend>(
    logits: Tensor<B, 4>,
    causal_from: Option<usize>,
) -> Option<Tensor<B, 4>> {
    if applies::<B>() {
        let logits: Tensor<Tb, 4> = cast(logits)?;
        let x = logits.into_primitive().tensor();
        let p = TchTensor::new(masked_softmax(&x.tensor, causal_from));
        return cast(Tensor::<Tb, 4>::from_primitive(TensorPrimitive::Float(p)));
    }
    if !applies_autodiff::<B>() {
        return None;
    }
    let logits: Tensor<Ta, 4> = cast(logits)?;
    let x = logits.into_primitive().tensor();
    let probs = TchTensor::new(masked_softmax(&x.primitive.tensor, causal_from));
    let out = finish(
        SoftmaxBackward
            .prepare::<NoCheckpointing>([x.node])
            .compute_bound()
            .stateful(),
        probs.clone(),
        probs,
    );
    cast(Tensor::<Ta, 4>::from_primitive(TensorPrimitive::Float(out)))
}

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

/// The tensor of `t` to update in place: its own when no one else holds its memory, else a
/// copy (so that a tensor held elsewhere, a model's clone say, never changes).
fn writable(t: TchTensor) -> tch::Tensor {
    if t.can_mut() {
        t.tensor
    } else {
        t.tensor.copy()
    }
}

/// One AdamW step with clipping by norm ([`crate::optim::FusedAdamW`]) on `LibTorch<f32>`
/// (CPU or CUDA), by PyTorch's in-place kernels: the moments by `lerp_`, the decay and the
/// update by `mul_` and `addcdiv_` on the parameter, with two temporaries (`g²` and the
/// denominator) where Burn's `AdamW` and clipping allocate a tensor for each of about a dozen
/// operations. The clipping factor `min(1, threshold / ‖g‖)` stays a 0-d tensor on the
/// device, so the step never waits for it. The same arithmetic as the ndarray kernel, in the
/// same order up to rounding. The inputs come back unchanged (`Err`) on another backend or
/// element type, or for mismatched shapes.
pub(crate) fn adamw<B: Backend, const D: usize>(
    s: AdamWStep,
    tensor: Tensor<B, D>,
    grad: Tensor<B, D>,
    moments: Moments<B, D>,
) -> AdamWResult<B, D> {
    if !applies::<B>() || !adamw_fits(&tensor, &grad, &moments) {
        return Err((tensor, grad, moments));
    }
    let raw = |t: Tensor<B, D>| cast::<_, Tensor<Tb, D>>(t).map(|t| t.into_primitive().tensor());
    let inputs = (|| {
        let mv = match moments {
            Some((_, m, v)) => Some((raw(m)?, raw(v)?)),
            None => None,
        };
        Some((raw(tensor)?, raw(grad)?, mv))
    })();
    // `B` is `LibTorch<f32>` (checked above), so each cast holds.
    let Some((p, g, mv)) = inputs else {
        unreachable!("LibTorch<f32> tensors")
    };
    let mut p = writable(p);
    let g = g.tensor;
    let (mut m, mut v) = match mv {
        Some((m, v)) => (writable(m), writable(v)),
        None => (g.zeros_like(), g.zeros_like()),
    };
    let g = match s.clip_norm {
        Some(threshold) => {
            let mut coef = g.norm();
            let _ = coef.g_add_scalar_(f64::from(f32::MIN_POSITIVE));
            let _ = coef.reciprocal_();
            let _ = coef.g_mul_scalar_(f64::from(threshold));
            let _ = coef.clamp_max_(1.0);
            &g * &coef
        }
        None => g,
    };
    // m ← β₁ m + (1 − β₁) g and v ← β₂ v + (1 − β₂) g², as interpolations towards g and g².
    let _ = m.lerp_(&g, f64::from(1.0 - s.beta_1));
    let _ = v.lerp_(&g.square(), f64::from(1.0 - s.beta_2));
    let _ = p.g_mul_scalar_(f64::from(s.decay));
    if s.lr != 0.0 {
        // p ← p − lr · (m / c₁) / (√(v / c₂) + ε), as p + m / ((√(v / c₂) + ε) · (−c₁ / lr)).
        let mut denom = &v / f64::from(s.correction_2);
        let _ = denom.sqrt_();
        let _ = denom.g_add_scalar_(f64::from(s.epsilon));
        let _ = denom.g_mul_scalar_(-f64::from(s.correction_1) / f64::from(s.lr));
        let _ = p.addcdiv_(&m, &denom);
    }
    let back = |t: tch::Tensor| {
        let t = Tensor::<Tb, D>::from_primitive(TensorPrimitive::Float(TchTensor::new(t)));
        cast::<_, Tensor<B, D>>(t)
    };
    match (back(p), back(m), back(v)) {
        (Some(p), Some(m), Some(v)) => Ok((p, m, v)),
        _ => unreachable!("B is LibTorch<f32>"),
    }
}

/// DAPE V1's MLP on LibTorch, with the weights as Burn's `Linear` layers hold them: `w1`
/// `[C, D]` (`C = 2H` over a bias, `H` without), `b1` `[D]`, `w2` `[D, H]`, `b2` `[H]`. Each
/// function works on one block of query rows flattened to `pairs = rows · keys` columns: the
/// logits `a` `[batch, H, pairs]` and the shared bias map `m` `[1, H, pairs]`.
#[derive(Clone, Debug)]
struct DapeMlp {
    w1: TchTensor,
    b1: Option<TchTensor>,
    w2: TchTensor,
    b2: Option<TchTensor>,
    slope: f64,
}

/// `w` `[r, s]` times each batch element of `x` `[batch, s, n]`: `[batch, r, n]`, by one
/// batched product (the weight broadcast, not copied).
fn weight_times(w: &tch::Tensor, x: &tch::Tensor) -> tch::Tensor {
    let [r, s] = [w.size()[0], w.size()[1]];
    w.unsqueeze(0).expand([x.size()[0], r, s], false).bmm(x)
}

impl DapeMlp {
    fn heads(&self) -> i64 {
        self.w2.tensor.size()[1]
    }

    /// The logits' half of the first layer, `[D, H]`, and the bias's (when there is one).
    fn first_layer(&self) -> (tch::Tensor, tch::Tensor) {
        let (w1, h) = (&self.w1.tensor, self.heads());
        let wb = if w1.size()[0] > h {
            w1.narrow(0, h, h).transpose(0, 1)
        } else {
            w1.narrow(0, 0, 0)
        };
        (w1.narrow(0, 0, h).transpose(0, 1), wb)
    }

    /// The pre-activations `z = W1ᵀ [a ‖ m] + b1`, `[batch, D, pairs]`: the batch-independent
    /// part (`W_B m + b1`) is formed once and added to the batch in one pass.
    fn pre_activation(&self, a: &tch::Tensor, m: Option<&tch::Tensor>) -> tch::Tensor {
        let (wa, wb) = self.first_layer();
        let mut z = weight_times(&wa, a);
        let mut shared = m.map(|m| wb.mm(&m.squeeze_dim(0)).unsqueeze(0));
        if let Some(b1) = &self.b1 {
            let b1 = b1.tensor.view([1, -1, 1]);
            shared = Some(match shared {
                Some(mut s) => {
                    let _ = s.g_add_(&b1);
                    s
                }
                None => b1,
            });
        }
        if let Some(s) = shared {
            let _ = z.g_add_(&s);
        }
        z
    }

    /// LeakyReLU of `z` with this slope: PyTorch's LeakyReLU backward kernel given `z` as its
    /// own upstream gradient (`z` where `z > 0`, `slope · z` elsewhere), which takes any slope
    /// where tch's forward binding fixes it at 0.01.
    fn activate(&self, z: &tch::Tensor) -> tch::Tensor {
        z.leaky_relu_backward(z, self.slope, false)
    }

    /// `a + m + f([a ‖ m])` for one block.
    fn forward(&self, a: &tch::Tensor, m: Option<&tch::Tensor>) -> tch::Tensor {
        let act = self.activate(&self.pre_activation(a, m));
        let mut out = weight_times(&self.w2.tensor.transpose(0, 1), &act);
        if let Some(b2) = &self.b2 {
            let _ = out.g_add_(&b2.tensor.view([1, -1, 1]));
        }
        let _ = out.g_add_(a);
        if let Some(m) = m {
            let _ = out.g_add_(m);
        }
        out
    }
}

/// Which gradients a DAPE node's backward pass is asked for, in the order of its parents.
#[derive(Clone, Copy, Debug)]
struct DapeWants {
    logits: bool,
    bias: bool,
    w1: bool,
    b1: bool,
    w2: bool,
    b2: bool,
}

/// The gradients of one block (or their sums over the blocks, for the weights).
#[derive(Default)]
struct DapeGrads {
    logits: Vec<tch::Tensor>,
    bias: Vec<tch::Tensor>,
    w1: Option<tch::Tensor>,
    b1: Option<tch::Tensor>,
    w2: Option<tch::Tensor>,
    b2: Option<tch::Tensor>,
}

/// `acc += x` for a gradient summed over blocks.
fn accumulate(acc: &mut Option<tch::Tensor>, x: tch::Tensor) {
    match acc {
        Some(a) => {
            let _ = a.g_add_(&x);
        }
        None => *acc = Some(x),
    }
}

impl DapeMlp {
    /// The backward pass of one block from its output gradient `g` `[batch, H, pairs]`: the
    /// hidden activations are recomputed from the block's inputs (the node keeps none).
    fn backward(
        &self,
        a: &tch::Tensor,
        m: Option<&tch::Tensor>,
        g: &tch::Tensor,
        wants: DapeWants,
        out: &mut DapeGrads,
    ) {
        let z = self.pre_activation(a, m);
        let sum_02 = |t: &tch::Tensor| t.sum_dim_intlist([0i64, 2].as_slice(), false, None);
        if wants.w2 {
            // dW2 = Σ_batch act · gᵀ, `[D, H]`.
            let act = self.activate(&z);
            let dw2 = act
                .bmm(&g.transpose(1, 2))
                .sum_dim_intlist([0i64].as_slice(), false, None);
            accumulate(&mut out.w2, dw2);
        }
        if wants.b2 {
            accumulate(&mut out.b2, sum_02(g));
        }
        let first = wants.logits || wants.bias || wants.w1 || wants.b1;
        if !first {
            return;
        }
        // δ = (W2 g) ⊙ LeakyReLU'(z), `[batch, D, pairs]`.
        let delta = z.leaky_relu_backward(&weight_times(&self.w2.tensor, g), self.slope, false);
        drop(z);
        let (wa, wb) = self.first_layer();
        if wants.b1 {
            accumulate(&mut out.b1, sum_02(&delta));
        }
        let delta_sum = m.map(|_| delta.sum_dim_intlist([0i64].as_slice(), false, None)); // [D, pairs]
        if wants.w1 {
            // dW1 = Σ_batch [a ‖ m] · δᵀ, `[C, D]`; the bias's rows from the batch's sum of δ.
            let da = a
                .bmm(&delta.transpose(1, 2))
                .sum_dim_intlist([0i64].as_slice(), false, None);
            let dw1 = match (m, &delta_sum) {
                (Some(m), Some(ds)) => {
                    tch::Tensor::cat(&[da, m.squeeze_dim(0).mm(&ds.transpose(0, 1))], 0)
                }
                _ => da,
            };
            accumulate(&mut out.w1, dw1);
        }
        if wants.logits {
            let mut da = weight_times(&wa.transpose(0, 1), &delta);
            let _ = da.g_add_(g);
            out.logits.push(da);
        }
        if wants.bias {
            if let Some(ds) = &delta_sum {
                let mut db = wb.transpose(0, 1).mm(ds).unsqueeze(0);
                let _ = db.g_add_(&g.sum_dim_intlist([0i64].as_slice(), true, None));
                out.bias.push(db);
            }
        }
    }
}

/// What a DAPE node keeps: its inputs (the logits and the bias map themselves, shared), the
/// MLP's weights, and the rows per block.
#[derive(Clone, Debug)]
struct DapeState {
    logits: TchTensor,
    bias: Option<TchTensor>,
    mlp: DapeMlp,
    rows: i64,
}

/// Runs `each(r0, n)` over blocks of at most `rows` of `lq` query rows.
fn row_blocks(lq: i64, rows: i64, mut each: impl FnMut(i64, i64)) {
    let mut r0 = 0;
    while r0 < lq {
        let n = rows.min(lq - r0);
        each(r0, n);
        r0 += n;
    }
}

/// Rows `r0..r0 + n` of `t` `[·, H, lq, lk]`, flattened to `[·, H, n · lk]`.
fn block_of(t: &tch::Tensor, r0: i64, n: i64) -> tch::Tensor {
    let s = t.size();
    t.narrow(2, r0, n).reshape([s[0], s[1], n * s[3]])
}

/// The forward pass of a DAPE node over blocks of `rows` query rows.
fn dape_forward(mlp: &DapeMlp, a: &tch::Tensor, m: Option<&tch::Tensor>, rows: i64) -> tch::Tensor {
    let s = a.size();
    let mut parts = Vec::new();
    row_blocks(s[2], rows, |r0, n| {
        let out = mlp.forward(&block_of(a, r0, n), m.map(|m| block_of(m, r0, n)).as_ref());
        parts.push(out.reshape([s[0], s[1], n, s[3]]));
    });
    match parts.len() {
        1 => parts.pop().expect("one block"),
        _ => tch::Tensor::cat(&parts, 2),
    }
}

#[derive(Debug)]
struct DapeBackward;

impl Backward<Tb, 6> for DapeBackward {
    type State = DapeState;

    fn backward(self, ops: Ops<Self::State, 6>, grads: &mut Gradients, _: &mut Checkpointer) {
        let g = grads.consume::<Tb>(&ops.node).tensor;
        let s = &ops.state;
        let [p_logits, p_bias, p_w1, p_b1, p_w2, p_b2] =
            ops.parents.each_ref().map(|p| p.as_ref().map(|n| n.id));
        let wants = DapeWants {
            logits: p_logits.is_some(),
            bias: p_bias.is_some() && s.bias.is_some(),
            w1: p_w1.is_some(),
            b1: p_b1.is_some() && s.mlp.b1.is_some(),
            w2: p_w2.is_some(),
            b2: p_b2.is_some() && s.mlp.b2.is_some(),
        };
        let (a, m) = (&s.logits.tensor, s.bias.as_ref().map(|m| &m.tensor));
        let size = a.size();
        let mut out = DapeGrads::default();
        row_blocks(size[2], s.rows, |r0, n| {
            s.mlp.backward(
                &block_of(a, r0, n),
                m.map(|m| block_of(m, r0, n)).as_ref(),
                &block_of(&g, r0, n),
                wants,
                &mut out,
            );
        });
        let rows_of = |parts: Vec<tch::Tensor>, batch: i64| {
            let parts: Vec<_> = parts
                .into_iter()
                .map(|p| {
                    let n = p.size()[2] / size[3];
                    p.reshape([batch, size[1], n, size[3]])
                })
                .collect();
            match parts.len() {
                1 => parts.into_iter().next().expect("one block"),
                _ => tch::Tensor::cat(&parts, 2),
            }
        };
        let mut put = |parent: Option<NodeId>, t: Option<tch::Tensor>| {
            if let (Some(id), Some(t)) = (parent, t) {
                grads.register::<Tb>(id, TchTensor::new(t));
            }
        };
        put(p_logits, wants.logits.then(|| rows_of(out.logits, size[0])));
        put(p_bias, wants.bias.then(|| rows_of(out.bias, 1)));
        put(p_w1, out.w1);
        put(p_b1, out.b1);
        put(p_w2, out.w2);
        put(p_b2, out.b2);
    }
}

/// DAPE V1 (`logits + bias + f([logits ‖ bias])`) on LibTorch, for logits `[batch, H, lq, lk]`
/// and a shared bias map `[1, H, lq, lk]` (or none, DAPE over NoPE), over blocks of query rows
/// whose hidden tensor `[batch, D, rows · lk]` stays under `budget` elements.
///
/// Each block is three batched matrix products and PyTorch's LeakyReLU kernel, the
/// batch-independent half of the first layer formed once. Under autodiff the whole correction
/// is one graph node that keeps only its inputs: its backward pass recomputes each block's
/// pre-activations and runs the five products of the gradients (Burn's tensor path keeps the
/// `[batch, D, pairs]` hidden tensors of every block, and runs a dozen nodes each way).
/// `None` on any other backend, or for shapes this node does not take (the tensor path then
/// runs).
#[allow(clippy::too_many_arguments)]
pub(crate) fn dape_v1<B: Backend>(
    logits: Tensor<B, 4>,
    bias: Option<Tensor<B, 4>>,
    w1: Tensor<B, 2>,
    b1: Option<Tensor<B, 1>>,
    w2: Tensor<B, 2>,
    b2: Option<Tensor<B, 1>>,
    slope: f64,
    budget: usize,
) -> Option<Tensor<B, 4>> {
    let [batch, h, lq, lk] = logits.dims();
    let [c, d] = w1.dims();
    let fits = bias.as_ref().is_none_or(|m| m.dims() == [1, h, lq, lk])
        && c == h * (1 + usize::from(bias.is_some()))
        && w2.dims() == [d, h]
        && b1.as_ref().is_none_or(|b| b.dims() == [d])
        && b2.as_ref().is_none_or(|b| b.dims() == [h]);
    if !applies_any::<B>() || !fits || batch * h * lq * lk == 0 {
        return None;
    }
    let rows = (budget / (batch * d * lk).max(1)).max(1) as i64;
    if applies::<B>() {
        let raw =
            |t: Tensor<B, 4>| cast::<_, Tensor<Tb, 4>>(t).map(|t| t.into_primitive().tensor());
        let mlp = DapeMlp {
            w1: cast::<_, Tensor<Tb, 2>>(w1)?.into_primitive().tensor(),
            b1: cast_opt::<_, Tensor<Tb, 1>>(b1)?.map(|b| b.into_primitive().tensor()),
            w2: cast::<_, Tensor<Tb, 2>>(w2)?.into_primitive().tensor(),
            b2: cast_opt::<_, Tensor<Tb, 1>>(b2)?.map(|b| b.into_primitive().tensor()),
            slope,
        };
        let a = raw(logits)?;
        let m = match bias {
            Some(m) => Some(raw(m)?),
            None => None,
        };
        let out = dape_forward(&mlp, &a.tensor, m.as_ref().map(|m| &m.tensor), rows);
        let out = Tensor::<Tb, 4>::from_primitive(TensorPrimitive::Float(TchTensor::new(out)));
        return cast(out);
    }
    let logits: Tensor<Ta, 4> = cast(logits)?;
    let device = logits.device();
    let bias: Option<Tensor<Ta, 4>> = cast_opt(bias)?;
    let (w1, w2): (Tensor<Ta, 2>, Tensor<Ta, 2>) = (cast(w1)?, cast(w2)?);
    let b1: Option<Tensor<Ta, 1>> = cast_opt(b1)?;
    let b2: Option<Tensor<Ta, 1>> = cast_opt(b2)?;
    let (a, m) = (
        logits.into_primitive().tensor(),
        bias.map(|m| m.into_primitive().tensor()),
    );
    let (w1, w2) = (w1.into_primitive().tensor(), w2.into_primitive().tensor());
    let (b1, b2) = (
        b1.map(|b| b.into_primitive().tensor()),
        b2.map(|b| b.into_primitive().tensor()),
    );
    let mlp = DapeMlp {
        w1: w1.primitive.clone(),
        b1: b1.as_ref().map(|b| b.primitive.clone()),
        w2: w2.primitive.clone(),
        b2: b2.as_ref().map(|b| b.primitive.clone()),
        slope,
    };
    let out = dape_forward(
        &mlp,
        &a.primitive.tensor,
        m.as_ref().map(|m| &m.primitive.tensor),
        rows,
    );
    // A constant stands in for an absent input: it never requires a gradient.
    let absent = || {
        Tensor::<Ta, 1>::zeros([1], &device)
            .into_primitive()
            .tensor()
            .node
    };
    let state = DapeState {
        logits: a.primitive.clone(),
        bias: m.as_ref().map(|m| m.primitive.clone()),
        mlp,
        rows,
    };
    let nodes = [
        a.node,
        m.map_or_else(absent, |m| m.node),
        w1.node,
        b1.map_or_else(absent, |b| b.node),
        w2.node,
        b2.map_or_else(absent, |b| b.node),
    ];
    let out = finish(
        DapeBackward
            .prepare::<NoCheckpointing>(nodes)
            .compute_bound()
            .stateful(),
        state,
        TchTensor::new(out),
    );
    cast(Tensor::<Ta, 4>::from_primitive(TensorPrimitive::Float(out)))
}
