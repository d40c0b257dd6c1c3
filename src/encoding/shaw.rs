//! Shaw et al. (2018), "Self-Attention with Relative Position Representations": learned vectors
//! `a_k` for clipped relative distances `k = clip(j - i, -K, K)`, shared across heads, added to
//! the logits as `q_i · a_clip(j-i) / sqrt(d_head)`.

use burn::module::Param;
use burn::prelude::*;

use super::{default_from_new, Span};
use crate::error::{ensure, Result};

/// Configuration of [`Shaw`].
#[derive(Config, Debug, PartialEq)]
pub struct ShawConfig {
    /// Clip distance `K`: distances beyond it share the edge vector.
    #[config(default = 64)]
    pub max_distance: usize,
    /// Standard deviation of the normal initialisation.
    #[config(default = 0.02)]
    pub init_std: f64,
}
default_from_new!(ShawConfig);

impl ShawConfig {
    /// Builds the relative key table for heads of size `head_dim`.
    pub fn init<B: Backend>(&self, head_dim: usize, device: &B::Device) -> Result<Shaw<B>> {
        ensure(
            self.max_distance > 0,
            "max_distance",
            self.max_distance,
            "must be at least 1",
        )?;
        Ok(Shaw {
            rel_keys: burn::nn::Initializer::Normal {
                mean: 0.0,
                std: self.init_std,
            }
            .init([2 * self.max_distance + 1, head_dim], device),
            max_distance: self.max_distance,
        })
    }
}

/// Clipped relative keys.
#[derive(Module, Debug)]
pub struct Shaw<B: Backend> {
    /// `[2K + 1, d_head]`, row `k + K` for distance `j - i = k`.
    pub rel_keys: Param<Tensor<B, 2>>,
    /// Clip distance `K`.
    pub max_distance: usize,
}

impl<B: Backend> Shaw<B> {
    /// `logits + q · a_clip(j-i) / sqrt(d_head)`; shapes as in
    /// [`super::PositionalEncoding::adjust_logits`].
    pub fn forward(&self, logits: Tensor<B, 4>, q: Tensor<B, 4>, span: &Span) -> Tensor<B, 4> {
        let device = q.device();
        let [b, h, lq, dh] = q.dims();
        let k = self.max_distance as i64;
        // Scores against every relative vector: [b, h, lq, 2K + 1].
        let rel = q.matmul(self.rel_keys.val().transpose().unsqueeze::<4>()) / (dh as f64).sqrt();
        let idx = (-span.offsets::<B>(&device)).clamp(-k, k) + k;
        let idx = idx.unsqueeze::<4>().expand([b, h, lq, span.key_len]);
        logits + rel.gather(3, idx)
    }
}
