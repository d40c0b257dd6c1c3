//! Autodiff plumbing shared by the kernels' graph nodes: recording a stateful node, the
//! `Backward` impls for a node with and without its optional last parent, and the one-input
//! elementwise node (GELU, softmax) whose backward pass is a function of the saved values.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::Backward;
use burn::backend::autodiff::ops::Ops;
use burn::backend::autodiff::ops::OpsKind;
use burn::prelude::*;
use burn::tensor::ops::FloatTensorOps;
use burn::tensor::TensorData;
use burn::tensor::TensorPrimitive;

use super::{host_grad, row_major_values, to_nd, Ad, Nd};

/// Implements `Backward<Nd, N>` for `$node<N>` for each parent count `N` listed (a node
/// with and without its optional last parent), each running `$backward(ops, grads)`.
macro_rules! backward_for_parents {
    ($node:ident, $state:ty, $backward:ident, [$($n:literal),*]) => {
        $(impl ::burn::backend::autodiff::ops::Backward<$crate::kernel::Nd, $n> for $node<$n> {
            type State = $state;

            fn backward(
                self,
                ops: ::burn::backend::autodiff::ops::Ops<Self::State, $n>,
                grads: &mut ::burn::backend::autodiff::grads::Gradients,
                _: &mut ::burn::backend::autodiff::checkpoint::base::Checkpointer,
            ) {
                $backward(ops, grads);
            }
        })*
    };
}
pub(super) use backward_for_parents;

/// Records a stateful node of `N` parents: `out` with its backward pass and `state` when a
/// parent is tracked, `out` alone otherwise.
pub(crate) fn finish_node<BW: Backward<Nd, N>, const N: usize>(
    kind: OpsKind<BW, Nd, BW::State, NoCheckpointing, N>,
    state: BW::State,
    out: burn::tensor::ops::FloatTensor<Nd>,
) -> burn::tensor::ops::FloatTensor<Ad> {
    match kind {
        OpsKind::Tracked(prep) => prep.finish(state, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

/// The backward pass of a one-input kernel: the input's gradient (same shape) from the
/// output's, given what the forward pass saved.
pub(super) trait UnaryGrad: std::fmt::Debug + Send + Sync + 'static {
    fn input_grad(&self, grad: &[f32]) -> Vec<f32>;
}

/// What a one-input node keeps for its backward pass.
#[derive(Debug)]
struct Saved {
    dims: Vec<usize>,
    grad: Box<dyn UnaryGrad>,
}

#[derive(Debug)]
struct UnaryBackward;

impl Backward<Nd, 1> for UnaryBackward {
    type State = Arc<Saved>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Nd>(&ops.node);
        let [Some(parent)] = ops.parents else {
            return;
        };
        let dx = match row_major_values(&grad) {
            Some(g) => ops.state.grad.input_grad(&g),
            None => ops.state.grad.input_grad(&host_grad(grad)),
        };
        let t = Nd::float_from_data(
            TensorData::new(dx, ops.state.dims.clone()),
            &Default::default(),
        );
        grads.register::<Nd>(parent.id, t);
    }
}

/// Records a one-input kernel as one node of `x`'s graph, with output values `y` (`x`'s
/// shape). `saved` runs only when `x` is tracked, and is given the output tensor (shared
/// with the graph, not a copy).
pub(super) fn record_unary<const D: usize>(
    x: Tensor<Ad, D>,
    y: Vec<f32>,
    saved: impl FnOnce(burn_ndarray::NdArrayTensor) -> Box<dyn UnaryGrad>,
) -> Tensor<Ad, D> {
    record_unary_lazy(x, |_| (y, Some(saved)))
}

/// [`record_unary`] for a kernel whose forward pass does more when `x` is tracked:
/// `forward(tracked)` gives the output values and, when tracked, what makes the saved state.
pub(super) fn record_unary_lazy<const D: usize, S>(
    x: Tensor<Ad, D>,
    forward: impl FnOnce(bool) -> (Vec<f32>, Option<S>),
) -> Tensor<Ad, D>
where
    S: FnOnce(burn_ndarray::NdArrayTensor) -> Box<dyn UnaryGrad>,
{
    let (dims, device) = (x.dims(), x.device());
    let node = x.into_primitive().tensor().node;
    let out = match UnaryBackward
        .prepare::<NoCheckpointing>([node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (y, saved) = forward(true);
            let saved = saved.expect("a tracked unary kernel saves its state");
            let out = to_nd(y, dims, &device).into_primitive().tensor();
            let state = Arc::new(Saved {
                dims: dims.to_vec(),
                grad: saved(out.clone()),
            });
            prep.finish(state, out)
        }
        OpsKind::UnTracked(prep) => {
            let (y, _) = forward(false);
            prep.finish(to_nd(y, dims, &device).into_primitive().tensor())
        }
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}
