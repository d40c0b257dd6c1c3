//! DAPE V2 ("DAPE V2: Process Attention Score as Feature Map", Zheng et al., 2024): `f` is two
//! `1 × k` convolutions along the key axis, `Conv(1 × k, C → D) → LeakyReLU → Conv(1 × k, D → H)`,
//! over the map `[A ‖ B]` with future entries (`j > i`) set to zero, so a row never sees keys
//! it may not attend to: `A + B + f(tril([A ‖ B]))`.
//!
//! This file holds the config and the module, and which path a forward takes: the fused ndarray
//! kernels (`fused/v2.rs`, `fused/v2_backward.rs`) or the tensor path (`tensor_path.rs`).

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::PaddingConfig2d;
use burn::prelude::*;

use super::{check_shared, HIDDEN_BLOCK};
use crate::encoding::{default_from_new, AdditiveBias, Span};
use crate::error::{ensure, Result};

/// Configuration of [`DapeV2`].
#[derive(Config, Debug, PartialEq)]
pub struct DapeV2Config {
    /// Hidden channels `D` of `f`.
    #[config(default = 32)]
    pub mlp_width: usize,
    /// Kernel width `k` along the key axis (odd).
    #[config(default = 3)]
    pub kernel_size: usize,
    /// LeakyReLU negative slope.
    #[config(default = 0.01)]
    pub negative_slope: f64,
    /// Also zero the hidden channels at future keys, between the two convolutions (default).
    ///
    /// The reference zeroes only the input map. Its second convolution then reads the hidden
    /// value at column `i + 1`, `LeakyReLU(b + w·[A_i, 0, 0])`, so the diagonal logit of row `i`
    /// depends on whether key `i + 1` exists: the last row of a sequence differs from the same
    /// row inside a longer one, and a KV-cache step (always a last row) cannot equal the full
    /// forward of a multi-layer model. With `true` every row is independent of what follows it
    /// and decoding is exact. `false` reproduces the reference's numbers exactly (the golden
    /// tests use it); chunked attention stays exact in both modes.
    #[config(default = true)]
    pub mask_future_hidden: bool,
}
default_from_new!(DapeV2Config);
impl DapeV2Config {
    /// Builds DAPE V2 over `bias` (or over NoPE when `None`) for `n_heads` heads.
    pub fn init<B: Backend>(
        &self,
        n_heads: usize,
        bias: Option<AdditiveBias<B>>,
        device: &B::Device,
    ) -> Result<DapeV2<B>> {
        let channels = check_shared(n_heads, &bias, self.mlp_width)?;
        ensure(
            self.kernel_size % 2 == 1,
            "kernel_size",
            self.kernel_size,
            "must be odd so that the output keeps the key length",
        )?;
        let k = self.kernel_size;
        let conv = |cin: usize, cout: usize| {
            Conv2dConfig::new([cin, cout], [1, k])
                .with_padding(PaddingConfig2d::Explicit(0, k / 2, 0, k / 2))
                .init(device)
        };
        Ok(DapeV2 {
            bias,
            conv_in: conv(channels, self.mlp_width),
            conv_out: conv(self.mlp_width, n_heads),
            negative_slope: self.negative_slope,
            mask_future_hidden: self.mask_future_hidden,
        })
    }
}

/// DAPE V2.
#[derive(Module, Debug)]
pub struct DapeV2<B: Backend> {
    /// The base bias `B`; `None` for DAPE V2 over NoPE.
    pub bias: Option<AdditiveBias<B>>,
    /// `Conv2d(C → D, kernel (1, k))` over `[batch, C, seq_q, seq_k]`.
    pub conv_in: Conv2d<B>,
    /// `Conv2d(D → H, kernel (1, k))`.
    pub conv_out: Conv2d<B>,
    /// LeakyReLU slope.
    pub negative_slope: f64,
    /// See [`DapeV2Config::mask_future_hidden`].
    pub mask_future_hidden: bool,
}

impl<B: Backend> DapeV2<B> {
    /// `logits + B + f(tril([logits ‖ B]))` for `logits: [batch, heads, seq_q, seq_k]`.
    ///
    /// Each `1 × k` convolution is computed as `k` channel-first matrix products over the
    /// `seq_q · seq_k` pairs of the key-shifted map (`Σ_t W_t @ shift_t(x)`), which is exactly
    /// the zero-padded cross-correlation of `Conv2d` but avoids a generic convolution kernel.
    /// The batch-independent bias half goes through the first layer once, not once per row.
    ///
    /// On `NdArray<f32>` outside autodiff (evaluation, validation, decoding) it runs a fused CPU
    /// kernel instead: both convolutions along each row in one pass, skipping the keys a causal
    /// row cannot see (their entries are `logits + B`, masked afterwards). On
    /// `Autodiff<NdArray<f32>>` (training) the same kernel is one graph node whose backward pass
    /// recomputes the hidden channels row by row, as matrix products over the row's keys.
    /// On LibTorch (feature `tch`) it is PyTorch's `conv2d` per block of rows, and under
    /// autodiff one graph node whose backward pass recomputes each block's hidden channels.
    pub fn forward(&self, logits: Tensor<B, 4>, span: &Span) -> Tensor<B, 4> {
        self.forward_in_blocks(logits, span, HIDDEN_BLOCK)
    }

    /// [`Self::forward`] with blocks of query rows whose hidden tensor `[batch, D, rows,
    /// seq_k]` stays under `budget` elements (`forward` uses [`HIDDEN_BLOCK`]), on the tensor
    /// path and on LibTorch; the ndarray kernels hold one row at a time and ignore it. The
    /// result does not depend on the budget (up to rounding).
    pub fn forward_in_blocks(
        &self,
        logits: Tensor<B, 4>,
        span: &Span,
        budget: usize,
    ) -> Tensor<B, 4> {
        #[cfg(feature = "ndarray")]
        {
            use super::fused;
            if fused::applies::<B>() {
                if let Some(out) = self.forward_fused(&logits, span) {
                    return out;
                }
            } else if fused::applies_autodiff::<B>() && logits.dtype() == burn::tensor::DType::F32 {
                let bias = self
                    .bias
                    .as_ref()
                    .map(|b| b.forward(span, &logits.device()));
                if let Some(out) = fused::dape_v2_autodiff(
                    logits.clone(),
                    bias,
                    self.conv_in.weight.val(),
                    self.conv_in.bias.as_ref().map(|b| b.val()),
                    self.conv_out.weight.val(),
                    self.conv_out.bias.as_ref().map(|b| b.val()),
                    span,
                    self.negative_slope as f32,
                    self.mask_future_hidden,
                ) {
                    return out;
                }
            }
        }
        #[cfg(feature = "tch")]
        if logits.dtype() == burn::tensor::DType::F32 && crate::kernel::applies_tch::<B>() {
            let bias = self
                .bias
                .as_ref()
                .map(|b| b.forward(span, &logits.device()));
            if let Some(out) = crate::kernel::dape_v2_tch(
                logits.clone(),
                bias,
                [self.conv_in.weight.val(), self.conv_out.weight.val()],
                [
                    self.conv_in.bias.as_ref().map(|b| b.val()),
                    self.conv_out.bias.as_ref().map(|b| b.val()),
                ],
                self.negative_slope,
                self.mask_future_hidden,
                (span.query_start, span.causal),
                budget,
            ) {
                return out;
            }
        }
        self.forward_blocked(logits, span, budget)
    }

    /// [`Self::forward`] through the fused CPU kernel; `None` when the tensors are not `f32`.
    #[cfg(feature = "ndarray")]
    pub(super) fn forward_fused(&self, logits: &Tensor<B, 4>, span: &Span) -> Option<Tensor<B, 4>> {
        use super::fused::{dape_v2, host, host_bias, run_fused, KeyConvs};
        let [d, c, _, k] = self.conv_in.weight.dims();
        let h = logits.dims()[1];
        let convs = KeyConvs {
            dims: [c, d, h, k],
            w1: host(self.conv_in.weight.val())?,
            b1: host_bias(&self.conv_in.bias)?.unwrap_or_else(|| vec![0.0; d]),
            w2: host(self.conv_out.weight.val())?,
            b2: host_bias(&self.conv_out.bias)?.unwrap_or_else(|| vec![0.0; h]),
            slope: self.negative_slope as f32,
            mask_future_hidden: self.mask_future_hidden,
        };
        run_fused(logits, self.bias.as_ref(), span, |a, m, dims| {
            dape_v2(a, m, dims, span, &convs)
        })
    }

    /// Whether a row's result depends on the key column right after it (see
    /// [`DapeV2Config::mask_future_hidden`]); query chunks then keep that one extra column.
    pub fn reads_next_column(&self) -> bool {
        !self.mask_future_hidden
    }
}
