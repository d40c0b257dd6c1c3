//! Sandwich (Chi, Fan, Rudnicky and Ramadge, ACL 2023, "Dissecting Transformer Length
//! Extrapolation via the Lens of Receptive Field Analysis"): a parameter-free additive bias made
//! of the inner product of sinusoidal position vectors of width `d'`,
//!
//! ```text
//! p_i · p_j = Σ_{k=1}^{d'/2} cos((i - j) / base^(2k/d'))
//! B[h, i, j] = (p_i · p_j - d'/2) / r_h,   r_h = 8h / H,  h = 1..H
//! ```
//!
//! The shift by `d'/2` makes distance 0 give 0 (and every other distance a negative bias, with
//! the logarithmic-looking decay the paper compares to Kerple and T5). The per-head compression
//! `r_h = 8h/H` follows the paper's reuse of ALiBi's head ratios (`h·8/H`, as in its ALiBi
//! figure) and NeMo's `sandwich_pos_bias`, which divides the shifted inner product by
//! `h · 8 / H` for heads `h = 1..H`. The sum runs over `k = 1..d'/2` (NeMo's code stops at
//! `d'/2 - 1`). `cos` is even, so the bias is symmetric and serves bidirectional attention as it
//! is. Data-independent like ALiBi: DAPE can wrap it (`dape_sandwich`, `dapev2_sandwich`).

use burn::prelude::*;

use super::{default_from_new, Span};
use crate::error::{ensure, Result};

/// Configuration of [`Sandwich`].
#[derive(Config, Debug, PartialEq)]
pub struct SandwichConfig {
    /// Width `d'` of the sinusoidal vectors whose inner product is the bias (even).
    #[config(default = 128)]
    pub dim: usize,
    /// Wavelength base of the sinusoids.
    #[config(default = 10000.0)]
    pub base: f64,
}
default_from_new!(SandwichConfig);

impl SandwichConfig {
    /// Builds Sandwich for `n_heads` heads.
    pub fn init<B: Backend>(&self, n_heads: usize, device: &B::Device) -> Result<Sandwich<B>> {
        ensure(n_heads > 0, "n_heads", n_heads, "must be at least 1")?;
        ensure(
            self.dim >= 2 && self.dim.is_multiple_of(2),
            "dim",
            self.dim,
            "must be even and at least 2",
        )?;
        ensure(self.base > 1.0, "base", self.base, "must be greater than 1")?;
        let inv_ratio: Vec<f32> = sandwich_head_ratios(n_heads)
            .into_iter()
            .map(|r| (1.0 / r) as f32)
            .collect();
        Ok(Sandwich {
            inv_ratio: Tensor::from_data(TensorData::new(inv_ratio, [n_heads]), device),
            dim: self.dim,
            base: self.base,
        })
    }
}

/// The per-head compression ratios `r_h = 8h / H`, `h = 1..H`.
pub fn sandwich_head_ratios(n_heads: usize) -> Vec<f64> {
    (1..=n_heads)
        .map(|h| 8.0 * h as f64 / n_heads as f64)
        .collect()
}

/// `Σ_{k=1}^{d'/2} cos(distance / base^(2k/d')) - d'/2`, the head-independent part of the bias.
pub fn sandwich_inner_product(distance: f64, dim: usize, base: f64) -> f64 {
    let half = dim / 2;
    (1..=half)
        .map(|k| (distance / base.powf(2.0 * k as f64 / dim as f64)).cos())
        .sum::<f64>()
        - half as f64
}

/// Sandwich: `B[h, i, j] = (p_i · p_j - d'/2) / r_h`, see the module docs.
#[derive(Module, Debug)]
pub struct Sandwich<B: Backend> {
    /// `1 / r_h` per head, `[heads]` (a fixed buffer).
    pub inv_ratio: Tensor<B, 1>,
    /// Width `d'`.
    pub dim: usize,
    /// Wavelength base.
    pub base: f64,
}

impl<B: Backend> Sandwich<B> {
    /// `[1, heads, seq_q, seq_k]`. The inner products are computed in f64 once per distinct
    /// distance `|i - j|` in the span and gathered, so the work is `O(span · d')` plus one
    /// lookup per logit, and the same distance always gives the same value (KV cache, chunks).
    pub fn forward(&self, span: &Span, device: &B::Device) -> Tensor<B, 4> {
        let (lq, lk) = (span.query_len, span.key_len);
        let (dim, base) = (self.dim, self.base);
        let bias = super::cache::cached::<B, _>(
            device,
            || format!("sandwich d{dim} base{base} {}", span.cache_key()),
            lq * lk,
            || {
                let (low, high) = span.offset_range();
                let max_distance = low.unsigned_abs().max(high.unsigned_abs()) as usize;
                let table: Vec<f32> = (0..=max_distance)
                    .map(|d| sandwich_inner_product(d as f64, dim, base) as f32)
                    .collect();
                let table =
                    Tensor::<B, 1>::from_data(TensorData::new(table, [max_distance + 1]), device);
                let idx = span.offsets::<B>(device).abs().reshape([lq * lk]);
                table.select(0, idx).reshape([1, 1, lq, lk])
            },
        );
        let h = self.inv_ratio.dims()[0];
        bias * self.inv_ratio.clone().reshape([1, h, 1, 1])
    }
}
