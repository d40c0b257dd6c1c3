//! DAPE, "Data-Adaptive Positional Encoding" (Zheng et al., NeurIPS 2024, arXiv 2405.14722), and
//! its V2 ("DAPE V2: Process Attention Score as Feature Map", Zheng et al., 2024).
//!
//! DAPE: for every query row `i` and key column `j`, a small MLP reads the vector of all heads'
//! scaled logits and bias values, `[A_1..A_H, B_1..B_H](i, j)`, and returns one correction per
//! head: `A + B + f([A ‖ B])`, `f = Linear(2H → D) → LeakyReLU(0.01) → Linear(D → H)`.
//! Over NoPE the input is `A` alone (`H → D`).
//!
//! DAPE V2: `f` is two `1 × k` convolutions along the key axis over the map with future entries
//! (`j > i`) set to zero, so a row never sees keys it may not attend to.
//!
//! `f` is pointwise in the query row (V1 even in `(i, j)`), so processing query rows in chunks is
//! exact, and every input of `f` is finite: the causal mask is applied afterwards.

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation::leaky_relu;

use super::{default_from_new, AdditiveBias, Span};
use crate::error::{ensure, Result};

/// Configuration of [`Dape`].
#[derive(Config, Debug, PartialEq)]
pub struct DapeConfig {
    /// Hidden width `D` of `f`.
    #[config(default = 32)]
    pub mlp_width: usize,
    /// LeakyReLU negative slope.
    #[config(default = 0.01)]
    pub negative_slope: f64,
}
default_from_new!(DapeConfig);

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

/// Validates what both DAPE versions share; returns the input channels of `f` (2H, or H
/// without a bias).
fn check_shared<B: Backend>(
    n_heads: usize,
    bias: &Option<AdditiveBias<B>>,
    mlp_width: usize,
) -> Result<usize> {
    ensure(n_heads > 0, "n_heads", n_heads, "must be at least 1")?;
    ensure(mlp_width > 0, "mlp_width", mlp_width, "must be at least 1")?;
    if let Some(b) = bias {
        ensure(
            b.n_heads() == n_heads,
            "n_heads",
            n_heads,
            &format!("the base bias has {} heads", b.n_heads()),
        )?;
    }
    Ok(if bias.is_some() { 2 * n_heads } else { n_heads })
}

impl DapeConfig {
    /// Builds DAPE over `bias` (or over NoPE when `None`) for `n_heads` heads.
    pub fn init<B: Backend>(
        &self,
        n_heads: usize,
        bias: Option<AdditiveBias<B>>,
        device: &B::Device,
    ) -> Result<Dape<B>> {
        let channels = check_shared(n_heads, &bias, self.mlp_width)?;
        Ok(Dape {
            bias,
            mlp_in: LinearConfig::new(channels, self.mlp_width).init(device),
            mlp_out: LinearConfig::new(self.mlp_width, n_heads).init(device),
            negative_slope: self.negative_slope,
        })
    }
}

/// DAPE V1.
#[derive(Module, Debug)]
pub struct Dape<B: Backend> {
    /// The base bias `B`; `None` for DAPE over NoPE.
    pub bias: Option<AdditiveBias<B>>,
    /// `Linear(C → D)`, `C = 2H` (or `H` without bias); input rows are `[A heads.., B heads..]`.
    pub mlp_in: Linear<B>,
    /// `Linear(D → H)`.
    pub mlp_out: Linear<B>,
    /// LeakyReLU slope.
    pub negative_slope: f64,
}

impl<B: Backend> Dape<B> {
    /// `logits + B + f([logits ‖ B])` for `logits: [batch, heads, seq_q, seq_k]`.
    ///
    /// Computed channel-first, as two matrix products over the `seq_q · seq_k` pairs
    /// (`[D, H] @ [batch, H, pairs]`), so no `[batch, seq_q, seq_k, ·]` transpose is ever
    /// materialised; the batch-independent bias goes through its half of the first layer once,
    /// not once per batch row. The largest intermediate is `[batch, D, seq_q · seq_k]`.
    pub fn forward(&self, logits: Tensor<B, 4>, span: &Span) -> Tensor<B, 4> {
        let device = logits.device();
        let [b, h, lq, lk] = logits.dims();
        let pairs = lq * lk;
        let weight = self.mlp_in.weight.val(); // [C, D]
        let d = weight.dims()[1];
        let w_logits = weight.clone().narrow(0, 0, h).transpose().unsqueeze::<3>(); // [1, D, H]
        let mut hidden = w_logits.matmul(logits.clone().reshape([b, h, pairs])); // [b, D, pairs]
        let mut base = logits;
        if let Some(bias) = &self.bias {
            let bmap = bias.forward(span, &device); // [1, h, lq, lk]
            let w_bias = weight.narrow(0, h, h).transpose().unsqueeze::<3>();
            hidden = hidden + w_bias.matmul(bmap.clone().reshape([1, h, pairs]));
            base = base + bmap;
        }
        if let Some(b1) = &self.mlp_in.bias {
            hidden = hidden + b1.val().reshape([1, d, 1]);
        }
        let hidden = leaky_relu(hidden, self.negative_slope);
        let w_out = self.mlp_out.weight.val().transpose().unsqueeze::<3>(); // [1, H, D]
        let mut f = w_out.matmul(hidden); // [b, H, pairs]
        if let Some(b2) = &self.mlp_out.bias {
            f = f + b2.val().reshape([1, h, 1]);
        }
        base + f.reshape([b, h, lq, lk])
    }
}

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
    pub fn forward(&self, logits: Tensor<B, 4>, span: &Span) -> Tensor<B, 4> {
        let device = logits.device();
        let [b, h, lq, lk] = logits.dims();
        let (mut map, base) = match &self.bias {
            Some(bias) => {
                let bmap = bias.forward(span, &device);
                let map = Tensor::cat(vec![logits.clone(), bmap.clone().expand([b, h, lq, lk])], 1);
                (map, logits + bmap)
            }
            None => (logits.clone(), logits),
        };
        let future = span
            .has_future()
            .then(|| span.future_mask::<B>(&device).unsqueeze::<4>());
        if let Some(future) = &future {
            let c = map.dims()[1];
            map = map.mask_fill(future.clone().expand([b, c, lq, lk]), 0.0);
        }
        let mut hidden = leaky_relu(self.conv_in.forward(map), self.negative_slope);
        if let (true, Some(future)) = (self.mask_future_hidden, future) {
            let c = hidden.dims()[1];
            hidden = hidden.mask_fill(future.expand([b, c, lq, lk]), 0.0);
        }
        base + self.conv_out.forward(hidden)
    }

    /// Whether a row's result depends on the key column right after it (see
    /// [`DapeV2Config::mask_future_hidden`]); query chunks then keep that one extra column.
    pub fn reads_next_column(&self) -> bool {
        !self.mask_future_hidden
    }
}
