//! AdamW with per-parameter gradient clipping by norm, in one pass over each parameter on the
//! CPU.
//!
//! Burn's `AdamW` (with `GradientClippingConfig::Norm`) is about a dozen tensor operations per
//! parameter, each a pass over its memory with a fresh allocation: the norm, the clipped
//! gradient, both moments, their bias corrections, the square root, the quotient, the decay and
//! the update. On `NdArray<f32>` [`FusedAdamW`] does the norm in one read of the gradient and
//! everything else in one pass that updates the parameter and both moments in place (when no
//! one else holds them). On `LibTorch<f32>` (feature `tch`) it updates them in place with
//! PyTorch's own kernels (`lerp_`, `mul_`, `addcdiv_`: about a dozen kernels, two
//! temporaries). On every other backend it runs Burn's own `AdamW` and clipping, so its
//! results there are Burn's.
//!
//! The state is Burn's [`AdamWState`], so an optimizer record (a checkpoint) written by
//! `AdamWConfig::init` loads into [`FusedAdamWConfig::init`] and back. Clipping is per
//! parameter, as Burn's is (PyTorch's `clip_grad_norm_` clips by the norm over all of them).
//!
//! ```
//! use burn::backend::{Autodiff, NdArray};
//! use dape::optim::FusedAdamWConfig;
//! # fn main() -> dape::Result<()> {
//! type B = Autodiff<NdArray<f32>>;
//! let optimizer = FusedAdamWConfig::new()
//!     .with_beta_2(0.95)
//!     .with_weight_decay(0.1)
//!     .with_grad_clip_norm(Some(1.0))
//!     .init::<B, burn::nn::Linear<B>>()?;
//! # let _ = optimizer;
//! # Ok(())
//! # }
//! ```

use burn::config::Config;
use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::grad_clipping::GradientClipping;
use burn::optim::{
    AdamW, AdamWConfig, AdamWState, AdaptiveMomentumState, LearningRate, SimpleOptimizer,
};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use crate::error::{ensure, Result};
use crate::kernel::AdamWStep;

/// Configuration of [`FusedAdamW`]: the fields and defaults of Burn's `AdamWConfig` (without
/// AMSGrad and cautious decay), with clipping by norm as a plain threshold.
#[derive(Config, Debug)]
pub struct FusedAdamWConfig {
    /// Decay of the first moment, in `[0, 1)`.
    #[config(default = 0.9)]
    pub beta_1: f32,
    /// Decay of the second moment, in `[0, 1)`.
    #[config(default = 0.999)]
    pub beta_2: f32,
    /// Added to the second moment's square root, `> 0`.
    #[config(default = 1e-5)]
    pub epsilon: f32,
    /// Decoupled weight decay (a fraction of the learning rate), `≥ 0`.
    #[config(default = 1e-4)]
    pub weight_decay: f32,
    /// Each parameter's gradient is scaled to this L2 norm when it is larger (`> 0`); `None`:
    /// no clipping.
    #[config(default = "None")]
    pub grad_clip_norm: Option<f32>,
}

impl FusedAdamWConfig {
    /// The optimizer, after checking every field.
    pub fn build(&self) -> Result<FusedAdamW> {
        for (field, beta) in [("beta_1", self.beta_1), ("beta_2", self.beta_2)] {
            ensure(
                (0.0..1.0).contains(&beta),
                field,
                beta,
                "must lie in [0, 1)",
            )?;
        }
        ensure(
            self.epsilon.is_finite() && self.epsilon > 0.0,
            "epsilon",
            self.epsilon,
            "must be positive and finite",
        )?;
        ensure(
            self.weight_decay.is_finite() && self.weight_decay >= 0.0,
            "weight_decay",
            self.weight_decay,
            "must be non-negative and finite",
        )?;
        if let Some(norm) = self.grad_clip_norm {
            ensure(
                norm.is_finite() && norm > 0.0,
                "grad_clip_norm",
                norm,
                "must be positive and finite",
            )?;
        }
        let burn = AdamWConfig::new()
            .with_beta_1(self.beta_1)
            .with_beta_2(self.beta_2)
            .with_epsilon(self.epsilon)
            .with_weight_decay(self.weight_decay)
            .build();
        Ok(FusedAdamW {
            burn,
            beta_1: self.beta_1,
            beta_2: self.beta_2,
            epsilon: self.epsilon,
            weight_decay: self.weight_decay,
            clip_norm: self.grad_clip_norm,
        })
    }

    /// The optimizer for module `M`, as Burn's `OptimizerAdaptor` (what `Learner` and
    /// `Optimizer::step` take).
    pub fn init<B: AutodiffBackend, M: AutodiffModule<B>>(
        &self,
    ) -> Result<OptimizerAdaptor<FusedAdamW, M, B>> {
        Ok(OptimizerAdaptor::from(self.build()?))
    }
}

/// AdamW with per-parameter clipping by norm, fused on `NdArray<f32>` and in place on
/// `LibTorch<f32>` (see the module docs).
#[derive(Clone)]
pub struct FusedAdamW {
    /// Burn's `AdamW` with the same settings: the path on other backends.
    burn: AdamW,
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    weight_decay: f32,
    clip_norm: Option<f32>,
}

impl FusedAdamW {
    fn scalars(&self, lr: LearningRate, time: usize) -> AdamWStep {
        let t = time as i32;
        AdamWStep {
            beta_1: self.beta_1,
            beta_2: self.beta_2,
            epsilon: self.epsilon,
            decay: (1.0 - lr * self.weight_decay as f64) as f32,
            lr: lr as f32,
            correction_1: 1.0 - self.beta_1.powi(t),
            correction_2: 1.0 - self.beta_2.powi(t),
            clip_norm: self.clip_norm,
        }
    }
}

impl<B: Backend> SimpleOptimizer<B> for FusedAdamW {
    type State<const D: usize> = AdamWState<B, D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<B, D>, Option<Self::State<D>>) {
        let moments = state.map(|s| {
            let m = s.momentum;
            (m.time, m.moment_1, m.moment_2)
        });
        let time = moments.as_ref().map_or(0, |m| m.0) + 1;
        let step = self.scalars(lr, time);
        #[cfg(any(feature = "ndarray", feature = "tch"))]
        let done = |(tensor, moment_1, moment_2)| {
            let momentum = AdaptiveMomentumState::new(time, moment_1, moment_2);
            (tensor, Some(AdamWState::new(momentum)))
        };
        #[cfg(feature = "ndarray")]
        let (tensor, grad, moments) = match crate::kernel::adamw_nd(step, tensor, grad, moments) {
            Ok(out) => return done(out),
            Err(inputs) => inputs,
        };
        #[cfg(feature = "tch")]
        let (tensor, grad, moments) = match crate::kernel::adamw_tch(step, tensor, grad, moments) {
            Ok(out) => return done(out),
            Err(inputs) => inputs,
        };
        let grad = match step.clip_norm {
            Some(norm) => GradientClipping::Norm(norm).clip_gradient(grad),
            None => grad,
        };
        let state = moments.map(|(time, moment_1, moment_2)| {
            AdamWState::new(AdaptiveMomentumState::new(time, moment_1, moment_2))
        });
        self.burn.step(lr, tensor, grad, state)
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &B::Device) -> Self::State<D> {
        <AdamW as SimpleOptimizer<B>>::to_device(state, device)
    }
}
