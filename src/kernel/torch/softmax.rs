//! The softmax of adjusted logits on LibTorch: the causal mask and PyTorch's softmax forward,
//! its softmax backward kernel backward, as one graph node.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::Backward;
use burn::backend::autodiff::ops::Ops;
use burn::backend::libtorch::TchTensor;
use burn::prelude::*;
use burn::tensor::TensorPrimitive;

use super::{applies, applies_autodiff, finish, Ta, Tb};
use crate::kernel::cast;

/// The causal mask of `rows` query rows from absolute position `q0` over `keys` keys: `true`
/// at the keys after each row's own position (row `r` sees keys `0..=q0 + r`).
pub(super) fn future_mask(rows: i64, keys: i64, q0: usize, device: tch::Device) -> tch::Tensor {
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
pub(super) fn softmax_grad(g: &tch::Tensor, probs: &tch::Tensor) -> tch::Tensor {
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
