//! CoPE, "Contextual Position Encoding" (Golovneva et al., 2024): positions are counted by
//! gates computed from the logits, `g_it = σ(q_i · k_t / sqrt(d))`, so a position can count
//! words, sentences or any unit the model learns. `p_ij = Σ_{t=j..i} g_it`, clamped to
//! `npos_max - 1`; the logit gains `q_i · e(p_ij)`, linearly interpolated between the learned
//! embeddings at `floor(p)` and `ceil(p)`.

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::activation::sigmoid;

use super::{default_from_new, Span};
use crate::error::{ensure, Result};

/// Configuration of [`Cope`].
#[derive(Config, Debug, PartialEq)]
pub struct CopeConfig {
    /// Number of integer positions with an embedding; larger positions are clamped.
    #[config(default = 64)]
    pub npos_max: usize,
}
default_from_new!(CopeConfig);

impl CopeConfig {
    /// Builds CoPE for heads of size `head_dim` (embeddings shared across heads).
    pub fn init<B: Backend>(&self, head_dim: usize, device: &B::Device) -> Result<Cope<B>> {
        ensure(
            self.npos_max >= 2,
            "npos_max",
            self.npos_max,
            "must be at least 2",
        )?;
        // The reference initialises with zeros; a small normal start lets gradients reach the
        // gates from the first step as well.
        Ok(Cope {
            pos_emb: burn::nn::Initializer::Normal {
                mean: 0.0,
                std: 0.02,
            }
            .init([head_dim, self.npos_max], device),
            npos_max: self.npos_max,
        })
    }
}

/// Contextual positions.
#[derive(Module, Debug)]
pub struct Cope<B: Backend> {
    /// Position embeddings `[d_head, npos_max]` (PyTorch `pos_emb[0]`).
    pub pos_emb: Param<Tensor<B, 2>>,
    /// Number of integer positions.
    pub npos_max: usize,
}

impl<B: Backend> Cope<B> {
    /// `logits + interpolated q · e(p)`; shapes as in
    /// [`super::PositionalEncoding::adjust_logits`]. Future gates are zero under causal
    /// attention; with non-causal attention `p_ij` sums the gates between `j` and `i`.
    pub fn forward(&self, logits: Tensor<B, 4>, q: Tensor<B, 4>, span: &Span) -> Tensor<B, 4> {
        let device = q.device();
        let [b, h, lq, _] = q.dims();
        let lk = span.key_len;
        let shape = [b, h, lq, lk];
        let mut gates = sigmoid(logits.clone());
        if span.has_future() {
            let future = span
                .future_mask::<B>(&device)
                .unsqueeze::<4>()
                .expand(shape);
            gates = gates.mask_fill(future, 0.0);
        }
        // S_j = Σ_{t<=j} g_t along keys; the row's own column i holds S_i.
        let cumsum = gates.clone().cumsum(3);
        let own = span
            .query_positions::<B>(&device)
            .narrow(1, 0, 1)
            .unsqueeze::<4>()
            .expand([b, h, lq, 1]);
        let s_i = cumsum.clone().gather(3, own.clone());
        // j <= i: Σ_{t=j..i} g = S_i - S_j + g_j.
        let backward = s_i.clone() - cumsum.clone() + gates.clone();
        let pos = if span.causal {
            backward
        } else {
            // j > i: Σ_{t=i..j} g = S_j - S_i + g_i.
            let g_i = gates.gather(3, own);
            let forward = cumsum - s_i + g_i;
            let ahead = span
                .future_mask::<B>(&device)
                .unsqueeze::<4>()
                .expand(shape);
            backward.mask_where(ahead, forward)
        };
        let pos = pos.clamp_max((self.npos_max - 1) as f64);
        let floor = pos.clone().floor();
        let ceil = pos.clone().ceil();
        let w = pos - floor.clone();
        let table = q.matmul(self.pos_emb.val().unsqueeze::<4>()); // [b, h, lq, npos_max]
        let at_ceil = table.clone().gather(3, ceil.int());
        let at_floor = table.gather(3, floor.int());
        logits + at_ceil * w.clone() + at_floor * (w.neg() + 1.0)
    }
}
