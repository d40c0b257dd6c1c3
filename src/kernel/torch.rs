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
//!   `[rows, keys]` probabilities are never kept. A bias that needs a gradient (Kerple's, FIRE's,
//!   a forget gate's) is not taken: PyTorch's kernel gives no gradient for the mask, and the
//!   attention layer then takes the tensor path.
//! * **GELU**: Burn's own `gelu`, which is PyTorch's exact (erf) GELU forward and backward on
//!   LibTorch; elsewhere the crate writes it from `erf` (Burn's default `gelu_backward` is the
//!   tanh approximation's derivative).

use std::any::TypeId;

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::NoCheckpointing};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::libtorch::TchTensor;
use burn::backend::{Autodiff, LibTorch};
use burn::prelude::*;
use burn::tensor::TensorPrimitive;

use super::{cast, cast_opt};

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
            let future = tch::Tensor::ones([rows, keys], (tch::Kind::Bool, like.device()))
                .triu(q0 as i64 + 1);
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

#[derive(Debug)]
struct AttentionBackward;

impl Backward<Tb, 3> for AttentionBackward {
    type State = AttentionState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
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
        for (parent, grad) in ops.parents.iter().zip([dq, dk, dv]) {
            if let Some(p) = parent {
                grads.register::<Tb>(p.id, TchTensor::new(grad));
            }
        }
    }
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

/// [`crate::kernel::attention`] on LibTorch: the output `[batch, rows, heads, d_v]`, or `None`
/// where it does not apply (another backend, not the CPU, a bias that needs a gradient). The
/// caller has checked the shapes and element types.
pub(crate) fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    bias: Option<Tensor<B, 4>>,
    scale: f32,
    causal_from: Option<usize>,
) -> Option<Tensor<B, 4>> {
    let [_, _, rows, _] = q.dims();
    let keys = k.dims()[2];
    let scale = f64::from(scale);
    if applies::<B>() {
        let [q, k, v]: [Tensor<Tb, 4>; 3] = [cast(q)?, cast(k)?, cast(v)?];
        let bias: Option<Tensor<Tb, 4>> = cast_opt(bias)?;
        let [q, k, v] = [q, k, v].map(|t| t.into_primitive().tensor());
        let bias = bias.map(|b| b.into_primitive().tensor());
        let (mask, is_causal) = float_mask(
            bias.as_ref().map(|b| &b.tensor),
            rows as i64,
            keys as i64,
            causal_from,
            &q.tensor,
        );
        let (out, _) = flash_forward(
            &q.tensor,
            &k.tensor,
            &v.tensor,
            mask.as_ref(),
            is_causal,
            scale,
        )?;
        let out = Tensor::<Tb, 4>::from_primitive(TensorPrimitive::Float(TchTensor::new(out)));
        return cast(out.swap_dims(1, 2));
    }
    if !applies_autodiff::<B>() {
        return None;
    }
    let [q, k, v]: [Tensor<Ta, 4>; 3] = [cast(q)?, cast(k)?, cast(v)?];
    let bias: Option<Tensor<Ta, 4>> = cast_opt(bias)?;
    let bias = bias.map(|b| b.into_primitive().tensor());
    if bias.as_ref().is_some_and(|b| !b.node.requirement.is_none()) {
        return None;
    }
    let [q, k, v] = [q, k, v].map(|t| t.into_primitive().tensor());
    let (mask, is_causal) = float_mask(
        bias.as_ref().map(|b| &b.primitive.tensor),
        rows as i64,
        keys as i64,
        causal_from,
        &q.primitive.tensor,
    );
    let (out, lse) = flash_forward(
        &q.primitive.tensor,
        &k.primitive.tensor,
        &v.primitive.tensor,
        mask.as_ref(),
        is_causal,
        scale,
    )?;
    let out = TchTensor::new(out);
    let state = AttentionState {
        q: q.primitive.clone(),
        k: k.primitive.clone(),
        v: v.primitive.clone(),
        out: out.clone(),
        lse: TchTensor::new(lse),
        mask: mask.map(TchTensor::new),
        is_causal,
        scale,
    };
    let out = finish(
        AttentionBackward
            .prepare::<NoCheckpointing>([q.node, k.node, v.node])
            .compute_bound()
            .stateful(),
        state,
        out,
    );
    let out = Tensor::<Ta, 4>::from_primitive(TensorPrimitive::Float(out));
    cast(out.swap_dims(1, 2))
}
