//! LayerNorm on `Autodiff<LibTorch<f32>>` as one graph node: `native_layer_norm` forward (with
//! each row's mean and reciprocal standard deviation), and the closed-form backward pass from
//! those statistics in a few whole-tensor ops.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::Backward;
use burn::backend::autodiff::ops::Ops;
use burn::backend::libtorch::TchTensor;
use burn::prelude::*;
use burn::tensor::TensorPrimitive;

use super::{applies_autodiff, finish, Ta, Tb};
use crate::kernel::cast;
use crate::kernel::cast_opt;

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
