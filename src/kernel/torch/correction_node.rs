//! What DAPE's LibTorch graph nodes (V1's MLP, `dape.rs`; V2's convolutions, `dape_v2.rs`)
//! share under autodiff: their six parents (the logits, the bias map, `f`'s two weights and two
//! biases; a constant stands in for an absent one) and the recording of the node.

use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::ops::Backward;
use burn::backend::libtorch::TchTensor;
use burn::prelude::*;
use burn::tensor::ops::FloatTensor;
use burn::tensor::TensorPrimitive;

use super::{finish, Ta, Tb};
use crate::kernel::{cast, cast_opt};

/// A correction node's inputs on `Autodiff<LibTorch<f32>>`: the logits `[batch, H, rows,
/// keys]`, the bias map (or none), `f`'s weights (`W` dims: 2 for V1's `Linear`s, 4 for V2's
/// `Conv2d`s) and biases (or none).
pub(super) struct Parents {
    logits: FloatTensor<Ta>,
    map: Option<FloatTensor<Ta>>,
    weights: [FloatTensor<Ta>; 2],
    biases: [Option<FloatTensor<Ta>>; 2],
    device: burn::backend::libtorch::LibTorchDevice,
}

impl Parents {
    /// The inputs as `Autodiff<LibTorch<f32>>` primitives; `None` on any other backend.
    pub(super) fn new<B: Backend, const W: usize>(
        logits: Tensor<B, 4>,
        map: Option<Tensor<B, 4>>,
        weights: [Tensor<B, W>; 2],
        biases: [Option<Tensor<B, 1>>; 2],
    ) -> Option<Self> {
        let logits: Tensor<Ta, 4> = cast(logits)?;
        let device = logits.device();
        let map: Option<Tensor<Ta, 4>> = cast_opt(map)?;
        let [w1, w2] = weights;
        let [b1, b2] = biases;
        let weight =
            |w: Tensor<B, W>| cast::<_, Tensor<Ta, W>>(w).map(|w| w.into_primitive().tensor());
        let bias = |b: Option<Tensor<B, 1>>| {
            cast_opt::<_, Tensor<Ta, 1>>(b).map(|b| b.map(|b| b.into_primitive().tensor()))
        };
        Some(Self {
            logits: logits.into_primitive().tensor(),
            map: map.map(|m| m.into_primitive().tensor()),
            weights: [weight(w1)?, weight(w2)?],
            biases: [bias(b1)?, bias(b2)?],
            device,
        })
    }

    /// The logits' and the bias map's LibTorch tensors (shared, not copied).
    pub(super) fn inputs(&self) -> (TchTensor, Option<TchTensor>) {
        (
            self.logits.primitive.clone(),
            self.map.as_ref().map(|m| m.primitive.clone()),
        )
    }

    /// `f`'s weights and biases as LibTorch tensors (shared, not copied).
    pub(super) fn weights(&self) -> ([TchTensor; 2], [Option<TchTensor>; 2]) {
        (
            self.weights.each_ref().map(|w| w.primitive.clone()),
            self.biases
                .each_ref()
                .map(|b| b.as_ref().map(|b| b.primitive.clone())),
        )
    }

    /// Records `out` as the output of one graph node over the six parents, whose backward pass
    /// is `backward` with `state`.
    pub(super) fn record<B: Backend, BW: Backward<Tb, 6>>(
        self,
        backward: BW,
        state: BW::State,
        out: tch::Tensor,
    ) -> Option<Tensor<B, 4>> {
        let device = self.device;
        // A constant stands in for an absent input: it never requires a gradient.
        let absent = || {
            Tensor::<Ta, 1>::zeros([1], &device)
                .into_primitive()
                .tensor()
                .node
        };
        let [w1, w2] = self.weights;
        let [b1, b2] = self.biases;
        let nodes = [
            self.logits.node,
            self.map.map_or_else(absent, |m| m.node),
            w1.node,
            b1.map_or_else(absent, |b| b.node),
            w2.node,
            b2.map_or_else(absent, |b| b.node),
        ];
        let out = finish(
            backward
                .prepare::<NoCheckpointing>(nodes)
                .compute_bound()
                .stateful(),
            state,
            TchTensor::new(out),
        );
        cast(Tensor::<Ta, 4>::from_primitive(TensorPrimitive::Float(out)))
    }
}
