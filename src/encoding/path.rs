//! PaTH (Yang et al., NeurIPS 2025, "PaTH Attention: Position Encoding via Accumulating
//! Householder Transformations"), and PaTH-FoX: a data-dependent, multiplicative position
//! encoding.
//!
//! Each token `t` carries a Householder-like transform `H_t = I − β_t w_t w_tᵀ` of the head
//! space, and the logit of query `i` and key `j ≤ i` is `q_iᵀ H_i H_{i−1} ⋯ H_{j+1} k_j / √d`:
//! the key is carried through the transforms of every later token up to the query. The
//! parameters are fla's (`fla/layers/path_attn.py`), from the attention layer's input `x`:
//!
//! ```text
//! w_t = l2norm_h( silu( conv₃( W_up W_down x )_t ) )   W_down: d_model → 32, W_up: 32 → d_model,
//!                                                      conv₃: depthwise, causal, 3 taps, no bias
//! β_t = 2 σ(W_β x_t + b_β)  ∈ (0, 2)                   per head (β > 1 allows negative eigenvalues)
//! ```
//!
//! with `l2norm_h` per head (`w / sqrt(Σ w² + 1e-6)`, as fla's `l2_norm`). PaTH-FoX adds FoX's
//! forget gate `g_t = ln σ(W_g x_t + b_g)` per head; as in fla, its sums are added before the
//! scale: `(q_iᵀ H⋯ k_j + Σ_{l=j+1..i} g_l) / √d` (plain FoX adds them after).
//!
//! The logits are computed blockwise ([`householder`](super::householder)); a KV cache holds the
//! keys already carried to the last cached token, and the last two inputs of the convolution,
//! so decoding continues exactly (fla's decoding does the same `k ← k − β_t (w_t·k) w_t`).
//!
//! PaTH is causal. A bidirectional layer (the CHE encoder) takes its mirror image, defined in
//! [`householder::bidirectional_logits`](super::householder::bidirectional_logits): key `j > i`
//! reaches query `i` through the transforms of the tokens in `(i, j]`.

use burn::module::Param;
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::{sigmoid, silu};

use super::{default_from_new, uniform_param, Dape, Fox, FoxConfig};
use crate::error::{ensure, Result};
use crate::kernel::linear_layer;

/// Configuration of [`Path`]. Defaults are fla's: rank 32 for `w`'s projection, a convolution
/// of 3 taps, blocks of 64 tokens.
#[derive(Config, Debug, PartialEq)]
pub struct PathConfig {
    /// Rank of the low-rank projection that makes `w` (`d_model → rank → d_model`).
    #[config(default = 32)]
    pub rank: usize,
    /// Taps of the causal depthwise convolution over `w` (1: none).
    #[config(default = 3)]
    pub conv_size: usize,
    /// Tokens per block of the blockwise computation (rounded up to a power of two). The
    /// result does not depend on it; the cost does.
    #[config(default = 64)]
    pub block: usize,
}
default_from_new!(PathConfig);

impl PathConfig {
    /// The transforms' parameters for `n_heads` heads of `head_dim`, with FoX's forget gate
    /// when `forget_gate` (PaTH-FoX).
    pub fn init<B: Backend>(
        &self,
        n_heads: usize,
        head_dim: usize,
        forget_gate: bool,
        device: &B::Device,
    ) -> Result<Path<B>> {
        ensure(self.rank > 0, "rank", self.rank, "must be at least 1")?;
        ensure(
            (1..=16).contains(&self.conv_size),
            "conv_size",
            self.conv_size,
            "must be between 1 (no convolution) and 16",
        )?;
        ensure(self.block > 0, "block", self.block, "must be at least 1")?;
        ensure(
            self.block <= 1024,
            "block",
            self.block,
            "must be at most 1024 (the blocks' C × C products grow with it)",
        )?;
        let d_model = n_heads * head_dim;
        let bound = (self.conv_size as f64).sqrt().recip();
        Ok(Path {
            w_down: LinearConfig::new(d_model, self.rank)
                .with_bias(false)
                .init(device),
            w_up: LinearConfig::new(self.rank, d_model)
                .with_bias(false)
                .init(device),
            conv: uniform_param([self.conv_size, d_model], -bound, bound, device),
            beta: LinearConfig::new(d_model, n_heads).init(device),
            gate: forget_gate
                .then(|| FoxConfig::new().init(n_heads, d_model, device))
                .transpose()?,
            dape: None,
            n_heads,
            block: self.block,
        })
    }
}

/// The per-token transforms of PaTH (and PaTH-FoX's forget gate) for one attention layer.
#[derive(Module, Debug)]
pub struct Path<B: Backend> {
    /// `d_model → rank`, no bias: the first half of `w`'s projection.
    pub w_down: Linear<B>,
    /// `rank → d_model`, no bias: the second half.
    pub w_up: Linear<B>,
    /// The causal depthwise convolution's taps `[conv_size, d_model]`, oldest first.
    pub conv: Param<Tensor<B, 2>>,
    /// `d_model → heads`: the strengths' logits.
    pub beta: Linear<B>,
    /// PaTH-FoX's forget gate; `None` for PaTH.
    pub gate: Option<Fox<B>>,
    /// `dape_path`'s MLP over the scaled logits (DAPE over NoPE's form, `A + f(A)`); `None`
    /// for PaTH and PaTH-FoX.
    pub dape: Option<Dape<B>>,
    /// Number of heads.
    pub n_heads: usize,
    /// Tokens per block.
    pub block: usize,
}

/// The transforms of a run of tokens: unit directions `w: [batch, heads, seq, d_head]`,
/// strengths `beta: [batch, heads, seq]`, and the convolution's input of the last
/// `conv_size − 1` tokens `[batch, conv_size − 1, d_model]` (none for one tap), which the next
/// tokens continue.
#[derive(Clone, Debug)]
pub struct Transforms<B: Backend> {
    /// Unit directions `w_t`.
    pub w: Tensor<B, 4>,
    /// Strengths `β_t ∈ (0, 2)`.
    pub beta: Tensor<B, 3>,
    /// The convolution's last inputs.
    pub conv_tail: Option<Tensor<B, 3>>,
}

impl<B: Backend> Path<B> {
    /// The transforms of the layer input `x: [batch, seq, d_model]`, continuing `conv_tail`
    /// (from a KV cache; `None` starts from zeros, as the causal convolution's padding).
    pub fn transforms(&self, x: Tensor<B, 3>, conv_tail: Option<Tensor<B, 3>>) -> Transforms<B> {
        let [b, l, d_model] = x.dims();
        let device = x.device();
        let taps = self.conv.dims()[0];
        let h = self.n_heads;
        let beta = sigmoid(linear_layer(&self.beta, x.clone())).swap_dims(1, 2) * 2.0;
        let pre = linear_layer(&self.w_up, linear_layer(&self.w_down, x));
        let tap = |t: usize| self.conv.val().narrow(0, t, 1).unsqueeze::<3>();
        let (mixed, conv_tail) = if taps == 1 {
            (pre * tap(0), None)
        } else {
            let tail = conv_tail.unwrap_or_else(|| Tensor::zeros([b, taps - 1, d_model], &device));
            let padded = Tensor::cat(vec![tail, pre], 1);
            let mixed = (0..taps)
                .map(|t| padded.clone().narrow(1, t, l) * tap(t))
                .reduce(|a, b| a + b)
                .expect("at least one tap");
            let total = padded.dims()[1];
            (mixed, Some(padded.narrow(1, total - (taps - 1), taps - 1)))
        };
        let w = silu(mixed).reshape([b, l, h, d_model / h]).swap_dims(1, 2);
        let norm = (w.clone().powi_scalar(2).sum_dim(3) + 1e-6).sqrt();
        Transforms {
            w: w / norm,
            beta,
            conv_tail,
        }
    }

    /// PaTH-FoX's forget gate; `None` for PaTH.
    pub fn forget_gate(&self) -> Option<&Fox<B>> {
        self.gate.as_ref()
    }

    /// The same transforms with DAPE's MLP `dape` over the scaled logits (`dape_path`).
    pub fn with_dape(self, dape: Dape<B>) -> Self {
        Self {
            dape: Some(dape),
            ..self
        }
    }
}
