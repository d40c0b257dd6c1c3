//! Transformer-XL relative positions (Dai et al., ACL 2019, "Transformer-XL: Attentive Language
//! Models beyond a Fixed-Length Context", Section 3.3):
//!
//! ```text
//! A[h, i, j] = ( (q_i + u_h) · k_j  +  (q_i + v_h) · (W_R R_{i-j})_h ) / sqrt(d_head)
//! ```
//!
//! `R_δ` is the sinusoidal vector of the signed relative distance `δ = i - j` (width `d_R`,
//! Transformer-XL's layout `[sin(δ ω_0..), cos(δ ω_0..)]`, `ω_k = base^(-2k/d_R)`), `W_R` a
//! learned projection `d_R → d_model` (no bias) whose output is split into heads of `d_head`
//! (the paper's `W_{k,R}`), and `u`, `v` are learned per-head vectors `[heads, d_head]`.
//! The four terms of the paper are (a) content `q·k`, (b) `q·W_R R`, (c) `u·k` and
//! (d) `v·W_R R`; the hook receives (a) already scaled and adds the rest, scaled the same way.
//!
//! Everything depends on `q_i`, `k_j` and `i - j` only, so KV-cache decoding and query chunks are
//! exact; with bidirectional attention `δ` is negative for keys ahead, which the sinusoid (odd in
//! `sin`, even in `cos`) tells apart from keys behind.

use burn::module::Param;
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;

use super::{default_from_new, Span};
use crate::error::{ensure, Result};

/// Configuration of [`TransformerXl`].
#[derive(Config, Debug, PartialEq)]
pub struct TransformerXlConfig {
    /// Width `d_R` of the sinusoidal relative vectors (even); `None` uses `d_model`, as in the
    /// paper.
    #[config(default = "None")]
    pub rel_dim: Option<usize>,
    /// Wavelength base of the sinusoids.
    #[config(default = 10000.0)]
    pub base: f64,
    /// Standard deviation of the normal initialisation of `u` and `v`.
    #[config(default = 0.02)]
    pub init_std: f64,
}
default_from_new!(TransformerXlConfig);

impl TransformerXlConfig {
    /// Builds the relative terms for `n_heads` heads of size `head_dim`.
    pub fn init<B: Backend>(
        &self,
        n_heads: usize,
        head_dim: usize,
        device: &B::Device,
    ) -> Result<TransformerXl<B>> {
        let d_model = n_heads * head_dim;
        let rel_dim = self.rel_dim.unwrap_or(d_model);
        ensure(
            rel_dim >= 2 && rel_dim.is_multiple_of(2),
            "rel_dim",
            rel_dim,
            "the sinusoidal relative vectors need an even width of at least 2",
        )?;
        ensure(self.base > 1.0, "base", self.base, "must be greater than 1")?;
        ensure(
            self.init_std >= 0.0,
            "init_std",
            self.init_std,
            "must not be negative",
        )?;
        let normal = || {
            burn::nn::Initializer::Normal {
                mean: 0.0,
                std: self.init_std,
            }
            .init([n_heads, head_dim], device)
        };
        Ok(TransformerXl {
            u: normal(),
            v: normal(),
            w_r: LinearConfig::new(rel_dim, d_model)
                .with_bias(false)
                .init(device),
            n_heads,
            rel_dim,
            base: self.base,
        })
    }
}

/// Transformer-XL's relative terms, see the module docs.
#[derive(Module, Debug)]
pub struct TransformerXl<B: Backend> {
    /// Content bias `u`, `[heads, d_head]` (the reference's `r_w_bias`).
    pub u: Param<Tensor<B, 2>>,
    /// Position bias `v`, `[heads, d_head]` (the reference's `r_r_bias`).
    pub v: Param<Tensor<B, 2>>,
    /// `W_R: d_R → d_model`, no bias.
    pub w_r: Linear<B>,
    /// Number of heads.
    pub n_heads: usize,
    /// Width `d_R`.
    pub rel_dim: usize,
    /// Wavelength base.
    pub base: f64,
}

/// The sinusoidal relative vectors `R_δ` for `δ = first .. first + len`: `[len, d_R]`, laid out
/// `[sin(δ ω_0), .., sin(δ ω_{d/2-1}), cos(δ ω_0), .., cos(δ ω_{d/2-1})]`, `ω_k = base^(-2k/d)`.
pub fn relative_sinusoids(first: i64, len: usize, dim: usize, base: f64) -> Vec<f32> {
    let half = dim / 2;
    let freqs: Vec<f64> = (0..half)
        .map(|k| base.powf(-(2.0 * k as f64) / dim as f64))
        .collect();
    let mut data = Vec::with_capacity(len * dim);
    for delta in first..first + len as i64 {
        data.extend(freqs.iter().map(|f| (delta as f64 * f).sin() as f32));
        data.extend(freqs.iter().map(|f| (delta as f64 * f).cos() as f32));
    }
    data
}

impl<B: Backend> TransformerXl<B> {
    /// `logits + ((u·k_j) + (q_i + v)·(W_R R_{i-j})) / sqrt(d_head)` for scaled
    /// `logits: [batch, heads, seq_q, seq_k]`, queries `q: [batch, heads, seq_q, d_head]` and keys
    /// `k: [batch, heads, seq_k, d_head]` of this span.
    ///
    /// The projected relative vectors are computed once per distinct distance in the span
    /// (`seq_q + seq_k - 1` of them; every offset between the smallest and the largest with
    /// randomized positions) and gathered, as Transformer-XL's relative shift does.
    pub fn forward(
        &self,
        logits: Tensor<B, 4>,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        span: &Span,
    ) -> Tensor<B, 4> {
        let device = q.device();
        let [b, h, lq, dh] = q.dims();
        let lk = span.key_len;
        let scale = (dh as f64).sqrt().recip();
        // Distances i - j from the last key before the first row to the last row's own.
        let (first, last) = span.offset_range();
        let count = (last - first + 1) as usize;
        let table = Tensor::<B, 2>::from_data(
            TensorData::new(
                relative_sinusoids(first, count, self.rel_dim, self.base),
                [count, self.rel_dim],
            ),
            &device,
        );
        // [count, d_model] -> [1, heads, d_head, count]
        let r = self
            .w_r
            .forward(table)
            .reshape([count, h, dh])
            .permute([1, 2, 0])
            .unsqueeze::<4>();
        let v = self.v.val().reshape([1, h, 1, dh]);
        let position = (q + v).matmul(r) * scale; // [b, h, lq, count]
        let idx = span.offsets::<B>(&device) - first; // δ - first ∈ [0, count)
        let idx = idx.unsqueeze::<4>().expand([b, h, lq, lk]);
        let position = position.gather(3, idx);
        // u · k_j: [1, h, 1, dh] x [b, h, dh, lk] -> [b, h, 1, lk]
        let u = self.u.val().reshape([1, h, 1, dh]);
        let content = u.matmul(k.transpose()) * scale;
        logits + position + content
    }
}
