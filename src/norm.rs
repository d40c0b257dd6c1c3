//! Layer normalization through the fused kernel.
//!
//! [`LayerNorm`] holds what `burn::nn::LayerNorm` holds (`gamma`, an optional `beta`, the
//! epsilon), under the same field names, so its record is the same and checkpoints of either
//! load into the other. What differs is the forward pass: [`crate::kernel::layer_norm`], one
//! graph node on ndarray, and `B::layer_norm` (Burn's own op) on every other backend. The
//! epsilon is a public field here; Burn keeps it private, which is why a fused norm cannot be
//! run on Burn's module from outside.

use burn::module::Param;
use burn::prelude::*;

use crate::error::{ensure, Result};

/// Layer normalization over the last dimension: `(x − mean) / √(var + epsilon) · gamma + beta`.
#[derive(Module, Debug)]
pub struct LayerNorm<B: Backend> {
    /// The learnable scale `[d_model]` (ones at initialisation).
    pub gamma: Param<Tensor<B, 1>>,
    /// The learnable shift `[d_model]` (zeros at initialisation), if any.
    pub beta: Option<Param<Tensor<B, 1>>>,
    /// Added to the variance before the square root.
    pub epsilon: f64,
}

impl<B: Backend> LayerNorm<B> {
    /// A norm over `d_model` features with a shift (as `LayerNormConfig::new(d_model)` builds),
    /// `gamma` at ones and `beta` at zeros. `epsilon` must be positive and finite.
    pub fn new(d_model: usize, epsilon: f64, device: &B::Device) -> Result<Self> {
        ensure(d_model > 0, "d_model", d_model, "must be at least 1")?;
        ensure(
            epsilon.is_finite() && epsilon > 0.0,
            "layer_norm_eps",
            epsilon,
            "must be a positive finite number",
        )?;
        Ok(Self {
            gamma: Param::from_tensor(Tensor::ones([d_model], device)),
            beta: Some(Param::from_tensor(Tensor::zeros([d_model], device))),
            epsilon,
        })
    }

    /// Normalizes `x` `[.., d_model]` over its last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        crate::kernel::layer_norm(
            x,
            self.gamma.val(),
            self.beta.as_ref().map(|b| b.val()),
            self.epsilon,
        )
    }
}
