//! Forgetting attention (Lin et al., ICLR 2025, "Forgetting Transformer: Softmax Attention with a
//! Forget Gate"), and DAPE over it.
//!
//! Each head has a forget gate computed from the layer's input `x_t` (the normed hidden state
//! the attention layer reads): `f_t = σ(w_h · x_t + b_h)`. The logit bias is the log of the
//! product of the gates between a key and its query, `D_ij = Σ_{l=j+1..i} ln f_l` (0 on the
//! diagonal), a data-dependent decay. It is computed from the cumulative sums
//! `c_t = Σ_{l≤t} ln f_l` as `D_ij = c_i − c_j`, never from an `[L, L]` product of gates; a
//! KV cache carries the keys' sums, so decoding continues them exactly, and query chunks read
//! the rows' sums, so chunked equals unchunked.
//!
//! The formula is causal. For keys after the query (`j > i`), which only a bidirectional layer
//! (the CHE encoder) attends to, this crate uses the mirror image, `Σ_{l=i+1..j} ln f_l`: both
//! are `D_ij = −|c_i − c_j|`, because the sums never increase. A causal layer masks those
//! entries anyway, and DAPE's MLP, which reads them before the mask, sees bounded values.
//!
//! `dape_fox` is DAPE V1 with `D` as its base bias: `A + D + f([A ‖ D])`. The bias differs per
//! sequence; on ndarray DAPE's fused kernels and training node take it as a `[batch, H, ..]`
//! map (elsewhere the tensor path).
//!
//! The paper's "Pro" extras (output gate, QK-norm, key and value shifts) are architecture
//! changes outside the logits and are not part of this encoding.

use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::log_sigmoid;

use super::{default_from_new, Dape, DapeConfig, Span};
use crate::error::{ensure, Result};

/// Configuration of [`Fox`]. The gate is `Linear(d_model → heads)` with Burn's default
/// initialisation, as the paper's `fgate_proj` has PyTorch's.
#[derive(Config, Debug, PartialEq)]
pub struct FoxConfig {}
default_from_new!(FoxConfig);

impl FoxConfig {
    /// The gate for `n_heads` heads over `d_model` input features.
    pub fn init<B: Backend>(
        &self,
        n_heads: usize,
        d_model: usize,
        device: &B::Device,
    ) -> Result<Fox<B>> {
        ensure(n_heads > 0, "n_heads", n_heads, "must be at least 1")?;
        ensure(d_model > 0, "d_model", d_model, "must be at least 1")?;
        Ok(Fox {
            gate: LinearConfig::new(d_model, n_heads).init(device),
        })
    }
}

/// The forget gate of one attention layer.
#[derive(Module, Debug)]
pub struct Fox<B: Backend> {
    /// `Linear(d_model → heads)`: the gates' logits.
    pub gate: Linear<B>,
}

impl<B: Backend> Fox<B> {
    /// The cumulative log forget gates `c_t` `[batch, heads, seq]` of the layer input
    /// `x: [batch, seq, d_model]`, continuing `carried` (the last key's sum, `[batch, heads, 1]`,
    /// from a KV cache; `None` starts at 0).
    pub fn cumulative(&self, x: Tensor<B, 3>, carried: Option<Tensor<B, 3>>) -> Tensor<B, 3> {
        let log_f = log_sigmoid(crate::kernel::linear_layer(&self.gate, x)).swap_dims(1, 2);
        let c = log_f.cumsum(2);
        match carried {
            Some(last) => c + last,
            None => c,
        }
    }

    /// The bias `D = −|c_i − c_j|` `[batch, heads, rows, keys]` from the rows' sums
    /// `[batch, heads, rows]` and the keys' sums `[batch, heads, keys]`.
    pub fn bias(rows: Tensor<B, 3>, keys: Tensor<B, 3>) -> Tensor<B, 4> {
        (rows.unsqueeze_dim::<4>(3) - keys.unsqueeze_dim::<4>(2))
            .abs()
            .neg()
    }

    /// Number of heads.
    pub fn n_heads(&self) -> usize {
        self.gate.weight.dims()[1]
    }
}

/// DAPE V1 over forgetting attention's bias.
#[derive(Module, Debug)]
pub struct DapeFox<B: Backend> {
    /// The forget gate that makes the base bias.
    pub fox: Fox<B>,
    /// DAPE's MLP, whose input is `[A ‖ D]`.
    pub dape: Dape<B>,
}

impl<B: Backend> DapeFox<B> {
    /// Builds DAPE (settings `dape`) over a fresh forget gate.
    pub fn new(
        fox: &FoxConfig,
        dape: &DapeConfig,
        n_heads: usize,
        d_model: usize,
        device: &B::Device,
    ) -> Result<Self> {
        Ok(Self {
            fox: fox.init(n_heads, d_model, device)?,
            dape: dape.init_over_external(n_heads, device)?,
        })
    }

    /// `logits + D + f([logits ‖ D])` with `D` from [`Fox::bias`], over the rows and keys of
    /// `span` (keys a causal row cannot see get `logits + D`; they are masked afterwards).
    pub fn forward(&self, logits: Tensor<B, 4>, bias: Tensor<B, 4>, span: &Span) -> Tensor<B, 4> {
        self.dape.forward_with_map(logits, bias, span)
    }
}
