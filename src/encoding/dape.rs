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

impl DapeConfig {
    /// Builds DAPE whose base bias is computed outside it and passed to
    /// [`Dape::forward_with_map`] (forgetting attention's data-dependent bias): `f` reads
    /// `[A ‖ B]`, `2H` channels, and `bias` is `None`.
    pub fn init_over_external<B: Backend>(
        &self,
        n_heads: usize,
        device: &B::Device,
    ) -> Result<Dape<B>> {
        check_shared::<B>(n_heads, &None, self.mlp_width)?;
        Ok(Dape {
            bias: None,
            mlp_in: LinearConfig::new(2 * n_heads, self.mlp_width).init(device),
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
    /// not once per batch row. `f` is pointwise, so it runs over blocks of query rows whose
    /// hidden tensor `[batch, D, rows · seq_k]` stays under [`HIDDEN_BLOCK`] elements: memory
    /// beyond the logits themselves is bounded at any length (exact; one block in training at
    /// the usual sizes).
    ///
    /// On `NdArray<f32>` outside autodiff (evaluation, validation, decoding) it runs a fused CPU
    /// kernel instead, one pass per row with the hidden vector in registers, which skips the keys
    /// a causal row cannot see (their entries are `logits + B`, masked afterwards); on
    /// `Autodiff<NdArray<f32>>` (training) the same kernel is one graph node with a fused backward
    /// pass. On LibTorch (feature `tch`) it is PyTorch's batched matrix products over the same
    /// blocks of rows, and under autodiff one graph node that keeps only its inputs and
    /// recomputes each block's hidden activations in its backward pass.
    pub fn forward(&self, logits: Tensor<B, 4>, span: &Span) -> Tensor<B, 4> {
        self.forward_in_blocks(logits, span, HIDDEN_BLOCK)
    }

    /// [`Self::forward`] with blocks of query rows whose hidden tensor `[batch, D, rows ·
    /// seq_k]` stays under `budget` elements (`forward` uses [`HIDDEN_BLOCK`]), on the tensor
    /// path and on LibTorch; the ndarray kernels hold one row's hidden vector at a time and
    /// ignore it. The result does not depend on the budget (up to rounding).
    pub fn forward_in_blocks(
        &self,
        logits: Tensor<B, 4>,
        span: &Span,
        budget: usize,
    ) -> Tensor<B, 4> {
        #[cfg(any(feature = "ndarray", feature = "tch"))]
        let f32s = logits.dtype() == burn::tensor::DType::F32;
        #[cfg(feature = "ndarray")]
        {
            use super::fused;
            if fused::applies::<B>() {
                if let Some(out) = self.forward_fused(&logits, span) {
                    return out;
                }
            } else if fused::applies_autodiff::<B>() && f32s {
                let bias = self
                    .bias
                    .as_ref()
                    .map(|b| b.forward(span, &logits.device()));
                if let Some(out) = self.autodiff_node(&logits, bias, span) {
                    return out;
                }
            }
        }
        let bmap = self
            .bias
            .as_ref()
            .map(|bias| bias.forward(span, &logits.device())); // [1, h, lq, lk]
        #[cfg(feature = "tch")]
        if f32s && crate::kernel::applies_tch::<B>() {
            if let Some(out) = crate::kernel::dape_v1_tch(
                logits.clone(),
                bmap.clone(),
                self.mlp_in.weight.val(),
                self.mlp_in.bias.as_ref().map(|b| b.val()),
                self.mlp_out.weight.val(),
                self.mlp_out.bias.as_ref().map(|b| b.val()),
                self.negative_slope,
                budget,
            ) {
                return out;
            }
        }
        self.blocked(logits, bmap, budget)
    }

    /// [`Self::forward`] through the fused CPU kernel; `None` when the tensors are not `f32`.
    #[cfg(feature = "ndarray")]
    fn forward_fused(&self, logits: &Tensor<B, 4>, span: &Span) -> Option<Tensor<B, 4>> {
        use super::fused::{dape_v1, run_fused};
        let mlp = self.host_mlp(logits.dims()[1])?;
        run_fused(logits, self.bias.as_ref(), span, |a, m, dims| {
            dape_v1(a, m, dims, span, &mlp)
        })
    }

    /// The fused graph node on `Autodiff<NdArray<f32>>` over the base bias's map `bias`
    /// (`[1 or batch, H, rows, keys]`); `None` when it does not apply.
    #[cfg(feature = "ndarray")]
    fn autodiff_node(
        &self,
        logits: &Tensor<B, 4>,
        bias: Option<Tensor<B, 4>>,
        span: &Span,
    ) -> Option<Tensor<B, 4>> {
        super::fused::dape_v1_autodiff(
            logits.clone(),
            bias,
            self.mlp_in.weight.val(),
            self.mlp_in.bias.as_ref().map(|b| b.val()),
            self.mlp_out.weight.val(),
            self.mlp_out.bias.as_ref().map(|b| b.val()),
            span,
            self.negative_slope as f32,
        )
    }

    /// `f`'s weights on the host for `h` heads; `None` when they are not `f32`.
    #[cfg(feature = "ndarray")]
    fn host_mlp(&self, h: usize) -> Option<super::fused::Mlp> {
        use super::fused::{host, host_bias, Mlp};
        let w1 = self.mlp_in.weight.val(); // [C, D]
        let [c, d] = w1.dims();
        Some(Mlp::new(
            [c, d, h],
            host(w1)?,
            host_bias(&self.mlp_in.bias)?,
            host(self.mlp_out.weight.val())?,
            host_bias(&self.mlp_out.bias)?,
            self.negative_slope as f32,
        ))
    }

    /// [`Self::forward_in_blocks`] on Burn's tensor path on every backend: the reference that
    /// the fused ndarray and LibTorch paths are tested against.
    pub fn forward_tensor_path(
        &self,
        logits: Tensor<B, 4>,
        span: &Span,
        budget: usize,
    ) -> Tensor<B, 4> {
        let bmap = self
            .bias
            .as_ref()
            .map(|bias| bias.forward(span, &logits.device()));
        self.blocked(logits, bmap, budget)
    }

    /// The tensor path over the base bias's map `bmap` (`[1, H, seq_q, seq_k]`).
    fn blocked(
        &self,
        logits: Tensor<B, 4>,
        bmap: Option<Tensor<B, 4>>,
        budget: usize,
    ) -> Tensor<B, 4> {
        let [b, _, lq, lk] = logits.dims();
        let d = self.mlp_in.weight.dims()[1];
        let f = by_row_blocks(budget, b * d * lk, lq, |r0, rows| {
            let a = narrow_rows(&logits, r0, rows, lq);
            let m = bmap.as_ref().map(|m| narrow_rows(m, r0, rows, lq));
            self.correction(a, m)
        });
        match bmap {
            Some(m) => logits + m + f,
            None => logits + f,
        }
    }

    /// `logits + map + f([logits ‖ map])` for a base bias `map` `[batch or 1, H, seq_q, seq_k]`
    /// computed outside (built by [`DapeConfig::init_over_external`]) over the rows and keys of
    /// `span`. On ndarray it runs the fused kernels of [`Self::forward`] (evaluation) or their
    /// graph node (training), which skip the keys a causal row cannot see (their entries are
    /// `logits + map`, masked afterwards); elsewhere the tensor path
    /// ([`Self::forward_with_map_tensor_path`]).
    pub fn forward_with_map(
        &self,
        logits: Tensor<B, 4>,
        map: Tensor<B, 4>,
        span: &Span,
    ) -> Tensor<B, 4> {
        #[cfg(feature = "ndarray")]
        if logits.dtype() == burn::tensor::DType::F32 {
            use super::fused;
            let dims = logits.dims();
            let fits = fused::bias_fits(map.shape().num_elements(), dims)
                && self.mlp_in.weight.dims()[0] == 2 * dims[1];
            if fits && fused::applies::<B>() {
                let out = (|| {
                    let (a, m) = (fused::host(logits.clone())?, fused::host(map.clone())?);
                    let out = fused::dape_v1(a, Some(&m), dims, span, &self.host_mlp(dims[1])?);
                    Some(Tensor::from_data(
                        burn::tensor::TensorData::new(out, dims),
                        &logits.device(),
                    ))
                })();
                if let Some(out) = out {
                    return out;
                }
            } else if fits && fused::applies_autodiff::<B>() {
                if let Some(out) = self.autodiff_node(&logits, Some(map.clone()), span) {
                    return out;
                }
            }
        }
        self.forward_with_map_tensor_path(logits, map)
    }

    /// [`Self::forward_with_map`] on Burn's tensor path, in blocks of rows as
    /// [`Self::forward`], with `f` at every key: the reference of the fused paths.
    pub fn forward_with_map_tensor_path(
        &self,
        logits: Tensor<B, 4>,
        map: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        let [b, _, lq, lk] = logits.dims();
        let d = self.mlp_in.weight.dims()[1];
        let f = by_row_blocks(HIDDEN_BLOCK, b * d * lk, lq, |r0, rows| {
            let a = narrow_rows(&logits, r0, rows, lq);
            let m = narrow_rows(&map, r0, rows, lq);
            self.correction(a, Some(m))
        });
        logits + map + f
    }

    /// `f([logits ‖ bias])` for one block of rows: `[batch, H, rows, seq_k]`.
    fn correction(&self, logits: Tensor<B, 4>, bias: Option<Tensor<B, 4>>) -> Tensor<B, 4> {
        let [b, h, lq, lk] = logits.dims();
        let pairs = lq * lk;
        let weight = self.mlp_in.weight.val(); // [C, D]
        let d = weight.dims()[1];
        let w_logits = weight.clone().narrow(0, 0, h).transpose().unsqueeze::<3>(); // [1, D, H]
        let hidden = w_logits.matmul(logits.reshape([b, h, pairs])); // [b, D, pairs]

        // The part of the first layer that reads the bias, `W_B · bias + b_1`, is `[1, D, pairs]`
        // for a batch-independent bias: it is formed once and added to the batch in a single
        // pass (`[batch, D, pairs]` for a bias per sequence).
        let term = bias.map(|bmap| {
            let w_bias = weight.narrow(0, h, h).transpose().unsqueeze::<3>();
            let batch = bmap.dims()[0];
            w_bias.matmul(bmap.reshape([batch, h, pairs]))
        });
        let b1 = self
            .mlp_in
            .bias
            .as_ref()
            .map(|b1| b1.val().reshape([1, d, 1]));
        let hidden = plus_shared(hidden, term, b1);
        let hidden = leaky_relu(hidden, self.negative_slope);
        let w_out = self.mlp_out.weight.val().transpose().unsqueeze::<3>(); // [1, H, D]
        let mut f = w_out.matmul(hidden); // [b, H, pairs]
        if let Some(b2) = &self.mlp_out.bias {
            f = f + b2.val().reshape([1, h, 1]);
        }
        f.reshape([b, h, lq, lk])
    }
}

/// `x + (term + bias)`: the batch-independent parts (`[1, ...]`, broadcast over the batch) are
/// summed first, so the batch-sized tensor takes a single addition.
fn plus_shared<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    term: Option<Tensor<B, D>>,
    bias: Option<Tensor<B, D>>,
) -> Tensor<B, D> {
    let shared = match (term, bias) {
        (Some(t), Some(b)) => Some(t + b),
        (t, b) => t.or(b),
    };
    match shared {
        Some(s) => x + s,
        None => x,
    }
}

/// Largest hidden tensor of DAPE's `f` (elements) before it runs over blocks of query rows:
/// 2^22 floats, 16 MiB.
pub const HIDDEN_BLOCK: usize = 1 << 22;

/// Runs `block(first_row, rows)` over consecutive blocks of the `seq_q` query rows, each with at
/// most `budget / per_row` rows (at least one), and concatenates the results along the row axis.
fn by_row_blocks<B: Backend>(
    budget: usize,
    per_row: usize,
    seq_q: usize,
    mut block: impl FnMut(usize, usize) -> Tensor<B, 4>,
) -> Tensor<B, 4> {
    let rows = (budget / per_row.max(1)).max(1);
    if rows >= seq_q {
        return block(0, seq_q);
    }
    let mut parts = Vec::with_capacity(seq_q.div_ceil(rows));
    let mut r0 = 0;
    while r0 < seq_q {
        let n = rows.min(seq_q - r0);
        parts.push(block(r0, n));
        r0 += n;
    }
    Tensor::cat(parts, 2)
}

/// Rows `r0..r0 + rows` of `[·, ·, seq_q, ·]` (the tensor itself when that is all of it).
fn narrow_rows<B: Backend, const D: usize, K>(
    x: &Tensor<B, D, K>,
    r0: usize,
    rows: usize,
    seq_q: usize,
) -> Tensor<B, D, K>
where
    K: burn::tensor::TensorKind<B> + burn::tensor::BasicOps<B>,
{
    if r0 == 0 && rows == seq_q {
        x.clone()
    } else {
        x.clone().narrow(D - 2, r0, rows)
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
    pub fn forward(&self, logits: Tensor<B, 4>, span: &Span) -> Tensor<B, 4> {
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
        self.forward_blocked(logits, span, HIDDEN_BLOCK)
    }

    /// [`Self::forward`] on Burn's tensor path on every backend, in blocks of rows whose hidden
    /// tensor stays under `budget` elements: the reference that the fused ndarray kernels are
    /// tested against.
    pub fn forward_tensor_path(
        &self,
        logits: Tensor<B, 4>,
        span: &Span,
        budget: usize,
    ) -> Tensor<B, 4> {
        self.forward_blocked(logits, span, budget)
    }

    /// [`Self::forward`] through the fused CPU kernel; `None` when the tensors are not `f32`.
    #[cfg(feature = "ndarray")]
    fn forward_fused(&self, logits: &Tensor<B, 4>, span: &Span) -> Option<Tensor<B, 4>> {
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

    /// [`Self::forward`] with blocks of rows whose hidden tensor stays under `budget` elements.
    fn forward_blocked(&self, logits: Tensor<B, 4>, span: &Span, budget: usize) -> Tensor<B, 4> {
        let device = logits.device();
        let [b, _, lq, lk] = logits.dims();
        let d = self.conv_in.weight.dims()[0];
        let future = span
            .has_future()
            .then(|| span.future_mask::<B>(&device).unsqueeze::<4>()); // [1, 1, lq, lk]
        let bmap = self.bias.as_ref().map(|bias| bias.forward(span, &device)); // [1, h, lq, lk]

        // Rows are independent (the convolutions run along keys), so blocks of rows are exact.
        let f = by_row_blocks(budget, b * d * lk, lq, |r0, rows| {
            self.correction(
                narrow_rows(&logits, r0, rows, lq),
                bmap.as_ref().map(|m| narrow_rows(m, r0, rows, lq)),
                future.as_ref().map(|m| narrow_rows(m, r0, rows, lq)),
            )
        });
        match bmap {
            Some(m) => logits + m + f,
            None => logits + f,
        }
    }

    /// `f(tril([logits ‖ bias]))` for one block of rows: `[batch, H, rows, seq_k]`; `future` is
    /// the block's `[1, 1, rows, seq_k]` mask of keys after each row.
    fn correction(
        &self,
        logits: Tensor<B, 4>,
        bias: Option<Tensor<B, 4>>,
        future: Option<Tensor<B, 4, Bool>>,
    ) -> Tensor<B, 4> {
        let [_, h, lq, lk] = logits.dims();
        let zero_future = |x: Tensor<B, 4>| match &future {
            Some(mask) => {
                let [xb, c, _, _] = x.dims();
                x.mask_fill(mask.clone().expand([xb, c, lq, lk]), 0.0)
            }
            None => x,
        };
        let w_in = self.conv_in.weight.val(); // [D, C, 1, k]
        let hidden = key_conv(w_in.clone().narrow(1, 0, h), zero_future(logits));
        let term = bias.map(|bmap| key_conv(w_in.narrow(1, h, h), zero_future(bmap)));
        let b1 = self
            .conv_in
            .bias
            .as_ref()
            .map(|b1| b1.val().reshape([1, -1, 1, 1]));
        let mut hidden = leaky_relu(plus_shared(hidden, term, b1), self.negative_slope);
        if self.mask_future_hidden {
            hidden = zero_future(hidden);
        }
        let mut f = key_conv(self.conv_out.weight.val(), hidden);
        if let Some(b2) = &self.conv_out.bias {
            f = f + b2.val().reshape([1, h as i64, 1, 1]);
        }
        f
    }

    /// Whether a row's result depends on the key column right after it (see
    /// [`DapeV2Config::mask_future_hidden`]); query chunks then keep that one extra column.
    pub fn reads_next_column(&self) -> bool {
        !self.mask_future_hidden
    }
}

/// The `1 × k` cross-correlation along the key axis with zero padding `k / 2` on each side,
/// without bias: `weight: [D, C, 1, k]`, `x: [b, C, seq_q, seq_k]` → `[b, D, seq_q, seq_k]`.
///
/// Written as `Σ_t W_t @ x[.., j + t - k/2]`, each term a `[D, C] @ [C, seq_q · seq_k]` product.
fn key_conv<B: Backend>(weight: Tensor<B, 4>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [d, c, _, k] = weight.dims();
    let [b, _, lq, lk] = x.dims();
    let half = k / 2;
    let padded = if half > 0 {
        let zeros = Tensor::<B, 4>::zeros([b, c, lq, half], &x.device());
        Tensor::cat(vec![zeros.clone(), x, zeros], 3)
    } else {
        x
    };
    let mut out: Option<Tensor<B, 3>> = None;
    for t in 0..k {
        let w_t = weight.clone().narrow(3, t, 1).reshape([1, d, c]);
        let x_t = padded.clone().narrow(3, t, lk).reshape([b, c, lq * lk]);
        let term = w_t.matmul(x_t);
        out = Some(match out {
            Some(acc) => acc + term,
            None => term,
        });
    }
    out.expect("kernel_size is at least 1")
        .reshape([b, d, lq, lk])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoding::AlibiConfig;
    use burn::backend::NdArray;

    type B = NdArray<f32>;

    fn logits(lq: usize, lk: usize) -> Tensor<B, 4> {
        Tensor::random(
            [1, 4, lq, lk],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &Default::default(),
        )
    }

    fn max_diff(a: Tensor<B, 4>, b: Tensor<B, 4>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    /// Row blocks are exact: with a budget that splits the rows into several blocks (uneven,
    /// and one row each), V1 and V2 (both masking modes) give the same result as `f` over all
    /// rows at once.
    #[test]
    fn row_blocks_equal_one_pass() {
        let device = Default::default();
        let (lq, lk) = (13, 20);
        let span = Span {
            query_start: lk - lq,
            query_len: lq,
            key_len: lk,
            causal: true,
            positions: None,
        };
        let bias = || {
            Some(AdditiveBias::Alibi(
                AlibiConfig::new().init::<B>(4, &device).unwrap(),
            ))
        };
        let a = logits(lq, lk);
        let per_row = 32 * lk; // batch 1, default width 32
        let bmap = bias().unwrap().forward(&span, &device);
        let future = span.future_mask::<B>(&device).unsqueeze::<4>();
        let v1 = DapeConfig::new().init::<B>(4, bias(), &device).unwrap();
        let whole = a.clone() + bmap.clone() + v1.correction(a.clone(), Some(bmap.clone()));
        for budget in [3 * per_row, 1] {
            let blocked = v1.forward_tensor_path(a.clone(), &span, budget);
            assert!(
                max_diff(blocked, whole.clone()) < 1e-5,
                "V1, budget {budget}"
            );
        }
        for mask_hidden in [true, false] {
            let v2 = DapeV2Config::new()
                .with_mask_future_hidden(mask_hidden)
                .init::<B>(4, bias(), &device)
                .unwrap();
            let whole = a.clone()
                + bmap.clone()
                + v2.correction(a.clone(), Some(bmap.clone()), Some(future.clone()));
            for budget in [3 * per_row, 1] {
                let blocked = v2.forward_blocked(a.clone(), &span, budget);
                assert!(
                    max_diff(blocked, whole.clone()) < 1e-5,
                    "V2 (mask_future_hidden {mask_hidden}), budget {budget}"
                );
            }
        }
    }

    /// `key_conv` is `Conv2d` with `(0, k/2)` zero padding, without bias.
    #[test]
    fn key_conv_matches_conv2d() {
        let device = Default::default();
        for k in [1, 3, 5] {
            let conv = Conv2dConfig::new([3, 5], [1, k])
                .with_padding(PaddingConfig2d::Explicit(0, k / 2, 0, k / 2))
                .with_bias(false)
                .init::<B>(&device);
            let x = Tensor::<B, 4>::random(
                [2, 3, 4, 7],
                burn::tensor::Distribution::Normal(0.0, 1.0),
                &device,
            );
            let diff = max_diff(key_conv(conv.weight.val(), x.clone()), conv.forward(x));
            assert!(diff < 1e-5, "k = {k}: {diff}");
        }
    }

    /// A full causal forward, a causal chunk, a one-row decode step and a non-causal block; rows
    /// longer than one 16-key block, with ragged ends.
    const FUSED_SPANS: [Span; 4] = [
        Span {
            query_start: 0,
            query_len: 37,
            key_len: 37,
            causal: true,
            positions: None,
        },
        Span {
            query_start: 20,
            query_len: 9,
            key_len: 29,
            causal: true,
            positions: None,
        },
        Span {
            query_start: 40,
            query_len: 1,
            key_len: 41,
            causal: true,
            positions: None,
        },
        Span {
            query_start: 0,
            query_len: 5,
            key_len: 19,
            causal: false,
            positions: None,
        },
    ];

    /// For random logits `[2, 4, rows, keys]` over each of [`FUSED_SPANS`], checks
    /// `run(logits, span) = [fused kernel, forward, tensor path]`: `forward` takes the fused path
    /// on NdArray, and the fused result equals the tensor path at every key a row can see and
    /// `logits + bias` at future keys.
    fn check_fused(
        label: &str,
        bias: &Option<AdditiveBias<B>>,
        run: impl Fn(&Tensor<B, 4>, &Span) -> [Tensor<B, 4>; 3],
    ) {
        for span in &FUSED_SPANS {
            let (lq, lk) = (span.query_len, span.key_len);
            let a = Tensor::<B, 4>::random(
                [2, 4, lq, lk],
                burn::tensor::Distribution::Normal(0.0, 2.0),
                &Default::default(),
            );
            let base = match bias {
                Some(bias) => a.clone() + bias.forward(span, &a.device()),
                None => a.clone(),
            };
            let [fused, via_forward, reference] = run(&a, span);
            let [f, g, r, base]: [Vec<f32>; 4] =
                [fused, via_forward, reference, base].map(|t| t.into_data().to_vec().unwrap());
            assert_eq!(f, g, "{label}: forward takes the fused path on NdArray");
            for (idx, ((&f, &r), &b)) in f.iter().zip(&r).zip(&base).enumerate() {
                let (i, j) = ((idx / lk) % lq, idx % lk);
                let want = if span.causal && j > span.query_start + i {
                    b
                } else {
                    r
                };
                assert!(
                    (f - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "{label}, {span:?}, index {idx}: fused {f}, want {want}"
                );
            }
        }
    }

    /// The fused CPU kernel (NdArray outside autodiff) equals the tensor path at every key a row
    /// can see, with and without a base bias, with batch 2, for a full causal forward, a causal
    /// chunk, a one-row decode step, a non-causal block, and rows longer than one 16-key block
    /// with a ragged end; future keys hold `logits + bias`.
    #[test]
    fn fused_kernel_matches_tensor_path() {
        let device = Default::default();
        for with_bias in [true, false] {
            let bias = with_bias
                .then(|| AdditiveBias::Alibi(AlibiConfig::new().init::<B>(4, &device).unwrap()));
            let mut dape = DapeConfig::new()
                .with_negative_slope(0.2)
                .init::<B>(4, bias, &device)
                .unwrap();
            // Non-zero biases, so that both are exercised.
            let rand = |n| {
                Tensor::<B, 1>::random([n], burn::tensor::Distribution::Normal(0.0, 1.0), &device)
            };
            dape.mlp_in.bias = Some(burn::module::Param::from_tensor(rand(32)));
            dape.mlp_out.bias = Some(burn::module::Param::from_tensor(rand(4)));
            check_fused(&format!("bias {with_bias}"), &dape.bias, |a, span| {
                [
                    dape.forward_fused(a, span).expect("f32 tensors"),
                    dape.forward(a.clone(), span),
                    dape.forward_tensor_path(a.clone(), span, HIDDEN_BLOCK),
                ]
            });
        }
    }

    type Ad = burn::backend::Autodiff<NdArray<f32>>;
    type AdGrads = <Ad as burn::tensor::backend::AutodiffBackend>::Gradients;

    /// The spans of the autodiff tests: a full causal forward, a causal chunk and a non-causal
    /// block.
    const AUTODIFF_SPANS: [Span; 3] = [
        Span {
            query_start: 0,
            query_len: 35,
            key_len: 35,
            causal: true,
            positions: None,
        },
        Span {
            query_start: 20,
            query_len: 9,
            key_len: 29,
            causal: true,
            positions: None,
        },
        Span {
            query_start: 0,
            query_len: 7,
            key_len: 12,
            causal: false,
            positions: None,
        },
    ];

    fn normal() -> burn::tensor::Distribution {
        burn::tensor::Distribution::Normal(0.0, 1.0)
    }

    /// Kerple-log over 4 heads with random `p` (so that its learned parameters get gradients
    /// that mean something).
    fn random_kerple() -> AdditiveBias<Ad> {
        use crate::encoding::{KerpleConfig, KerpleKind};
        let device = Default::default();
        let mut k = KerpleConfig::new()
            .init::<Ad>(4, KerpleKind::Log, &device)
            .unwrap();
        k.p = burn::module::Param::from_tensor(Tensor::<Ad, 1>::random(
            [4],
            burn::tensor::Distribution::Uniform(0.5, 2.0),
            &device,
        ));
        AdditiveBias::Kerple(k)
    }

    /// Hidden biases of ±8 (alternating, plus noise): the two paths round the pre-activations
    /// differently (by ~1e-7), so a pre-activation that close to LeakyReLU's kink takes the other
    /// slope on one path (a gradient difference of 0.9 of its weight). With ±8 none comes near
    /// the kink, and half the units still take each slope.
    fn kink_free_bias(n: usize) -> burn::module::Param<Tensor<Ad, 1>> {
        let device = Default::default();
        let signs: Vec<f32> = (0..n)
            .map(|i| if i % 2 == 0 { 8.0 } else { -8.0 })
            .collect();
        burn::module::Param::from_tensor(
            Tensor::<Ad, 1>::from_floats(signs.as_slice(), &device)
                + Tensor::random([n], normal(), &device) * 0.1,
        )
    }

    /// Random loss weights `[batch, 4, rows, keys]`, zero at the keys a causal row cannot see (as
    /// the causal mask that follows DAPE in attention).
    fn visible_weights(batch: usize, span: &Span) -> Tensor<Ad, 4> {
        let device = Default::default();
        let (lq, lk) = (span.query_len, span.key_len);
        let visible = span
            .future_mask::<Ad>(&device)
            .bool_not()
            .float()
            .reshape([1, 1, lq, lk]);
        Tensor::<Ad, 4>::random([batch, 4, lq, lk], normal(), &device) * visible
    }

    /// The weighted output and the named gradients (`None`: missing, a failure) of one run.
    fn outputs_and_grads(
        out: Tensor<Ad, 4>,
        weights: &Tensor<Ad, 4>,
        grads: Vec<(&str, Option<Tensor<NdArray<f32>, 1>>)>,
    ) -> Vec<(String, Vec<f32>)> {
        let mut got = vec![(
            "output".to_string(),
            (out * weights.clone())
                .inner()
                .into_data()
                .to_vec()
                .unwrap(),
        )];
        for (name, g) in grads {
            got.push((name.into(), g.expect(name).into_data().to_vec().unwrap()));
        }
        got
    }

    /// Kerple's `p` and `a` gradients when `bias` is Kerple.
    fn kerple_grads(
        bias: &Option<AdditiveBias<Ad>>,
        grads: &AdGrads,
    ) -> Vec<(&'static str, Option<Tensor<NdArray<f32>, 1>>)> {
        match bias {
            Some(AdditiveBias::Kerple(k)) => vec![
                ("d kerple p", k.p.grad(grads)),
                ("d kerple a", k.a.grad(grads)),
            ],
            _ => Vec::new(),
        }
    }

    /// On `Autodiff<NdArray>` DAPE runs as one fused operation with its own backward pass: its
    /// output and the gradients of the logits, of the base bias's parameters (Kerple's `p`, `a`)
    /// and of both layers equal the tensor path's, with and without a base bias, for a full
    /// causal forward, a causal chunk and a non-causal block with batch 2, and a second run gives
    /// the same output and gradients bit for bit. The loss weights future keys by zero, as the
    /// causal mask does.
    #[test]
    fn fused_autodiff_matches_tensor_path() {
        let _graphs = crate::util::autodiff_test_lock();
        let device = Default::default();
        for with_bias in [true, false] {
            let mut dape = DapeConfig::new()
                .with_negative_slope(0.1)
                .init::<Ad>(4, with_bias.then(random_kerple), &device)
                .unwrap();
            dape.mlp_in.bias = Some(kink_free_bias(32));
            dape.mlp_out.bias = Some(burn::module::Param::from_tensor(Tensor::random(
                [4],
                normal(),
                &device,
            )));
            check_autodiff(
                &format!("bias {with_bias}"),
                |fused, a, span| {
                    if fused {
                        dape.forward(a, span)
                    } else {
                        dape.forward_tensor_path(a, span, HIDDEN_BLOCK)
                    }
                },
                |grads| {
                    let mut named = vec![
                        (
                            "d w1",
                            dape.mlp_in.weight.grad(grads).map(|g| g.flatten(0, 1)),
                        ),
                        ("d b1", dape.mlp_in.bias.as_ref().unwrap().grad(grads)),
                        (
                            "d w2",
                            dape.mlp_out.weight.grad(grads).map(|g| g.flatten(0, 1)),
                        ),
                        ("d b2", dape.mlp_out.bias.as_ref().unwrap().grad(grads)),
                    ];
                    named.extend(kerple_grads(&dape.bias, grads));
                    named
                },
            );
        }
    }

    /// Over each of [`AUTODIFF_SPANS`], with random logits `[2, 4, rows, keys]` and a loss that
    /// weights future keys by zero: `forward(true, ..)` (the fused node) and `forward(false, ..)`
    /// (the tensor path) give the same weighted output and the same gradients of the logits and
    /// of `params(grads)`, and the fused node's are the same in a second run
    /// ([`assert_fused_node_matches`]).
    fn check_autodiff(
        label: &str,
        forward: impl Fn(bool, Tensor<Ad, 4>, &Span) -> Tensor<Ad, 4>,
        params: impl Fn(&AdGrads) -> Vec<(&'static str, Option<Tensor<NdArray<f32>, 1>>)>,
    ) {
        let device = Default::default();
        for span in &AUTODIFF_SPANS {
            let (lq, lk) = (span.query_len, span.key_len);
            let a0 = Tensor::<Ad, 4>::random([2, 4, lq, lk], normal(), &device);
            let weights = visible_weights(2, span);
            let run = |fused: bool| {
                let a = a0.clone().detach().require_grad();
                let out = forward(fused, a.clone(), span);
                let grads = (out.clone() * weights.clone()).sum().backward();
                let mut named = vec![("d logits", a.grad(&grads).map(|g| g.flatten(0, 3)))];
                named.extend(params(&grads));
                outputs_and_grads(out, &weights, named)
            };
            let label = format!("{label}, {span:?}");
            assert_fused_node_matches(&label, run(true), run(true), run(false));
        }
    }

    /// DAPE V2 on `Autodiff<NdArray>` runs as one fused operation with its own backward pass:
    /// its output and the gradients of the logits, of Kerple's `p` and `a` and of both
    /// convolutions' weights and biases equal the tensor path's, for both masking modes, kernel
    /// widths 1, 3 and 5, with and without a base bias, over a full causal forward, a causal chunk
    /// and a non-causal block with batch 2; a second run is bit-identical.
    #[test]
    fn fused_v2_autodiff_matches_tensor_path() {
        let _graphs = crate::util::autodiff_test_lock();
        let device = Default::default();
        for (with_bias, mask_hidden, k) in [
            (true, true, 3),
            (true, false, 3),
            (false, true, 5),
            (false, false, 5),
            (true, true, 1),
        ] {
            let mut dape = DapeV2Config::new()
                .with_kernel_size(k)
                .with_negative_slope(0.1)
                .with_mask_future_hidden(mask_hidden)
                .init::<Ad>(4, with_bias.then(random_kerple), &device)
                .unwrap();
            dape.conv_in.bias = Some(kink_free_bias(32));
            dape.conv_out.bias = Some(burn::module::Param::from_tensor(Tensor::random(
                [4],
                normal(),
                &device,
            )));
            check_autodiff(
                &format!("bias {with_bias}, mask {mask_hidden}, k {k}"),
                |fused, a, span| {
                    if fused {
                        dape.forward(a, span)
                    } else {
                        dape.forward_tensor_path(a, span, HIDDEN_BLOCK)
                    }
                },
                |grads| {
                    let mut named = vec![
                        (
                            "d w1",
                            dape.conv_in.weight.grad(grads).map(|g| g.flatten(0, 3)),
                        ),
                        ("d b1", dape.conv_in.bias.as_ref().unwrap().grad(grads)),
                        (
                            "d w2",
                            dape.conv_out.weight.grad(grads).map(|g| g.flatten(0, 3)),
                        ),
                        ("d b2", dape.conv_out.bias.as_ref().unwrap().grad(grads)),
                    ];
                    named.extend(kerple_grads(&dape.bias, grads));
                    named
                },
            );
        }
    }

    /// DAPE over a map computed outside (forgetting attention's, one per sequence, or one
    /// shared by the batch): outside autodiff the fused kernel equals the tensor path at every
    /// key a row can see and gives `logits + map` at future keys; under autodiff the fused node's
    /// output and the gradients of the logits, of the map itself and of both layers equal the
    /// tensor path's, over a full causal forward, a causal chunk and a non-causal block with
    /// batch 2.
    #[test]
    fn fused_dape_over_a_map_matches_tensor_path() {
        let _graphs = crate::util::autodiff_test_lock();
        let device = Default::default();
        let mut dape = DapeConfig::new()
            .with_negative_slope(0.1)
            .init_over_external::<Ad>(4, &device)
            .unwrap();
        dape.mlp_in.bias = Some(kink_free_bias(32));
        dape.mlp_out.bias = Some(burn::module::Param::from_tensor(Tensor::random(
            [4],
            normal(),
            &device,
        )));
        for maps in [2, 1] {
            for span in &AUTODIFF_SPANS {
                let (lq, lk) = (span.query_len, span.key_len);
                let label = format!("{maps} map(s), {span:?}");
                let a0 = Tensor::<Ad, 4>::random([2, 4, lq, lk], normal(), &device);
                // Forgetting attention's bias is never positive.
                let m0 = Tensor::<Ad, 4>::random([maps, 4, lq, lk], normal(), &device)
                    .abs()
                    .neg();

                // Evaluation: the fused kernel on NdArray.
                let inner = burn::module::AutodiffModule::valid(&dape);
                let (a, m) = (a0.clone().inner(), m0.clone().inner());
                let fused = inner.forward_with_map(a.clone(), m.clone(), span);
                let reference = inner.forward_with_map_tensor_path(a.clone(), m.clone());
                let base = a + m;
                let [f, r, base]: [Vec<f32>; 3] =
                    [fused, reference, base].map(|t| t.into_data().to_vec().unwrap());
                for (idx, ((&f, &r), &b)) in f.iter().zip(&r).zip(&base).enumerate() {
                    let (i, j) = ((idx / lk) % lq, idx % lk);
                    let want = if span.causal && j > span.query_start + i {
                        b
                    } else {
                        r
                    };
                    assert!(
                        (f - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "{label}, index {idx}: fused {f}, want {want}"
                    );
                }

                // Training: the fused node under autodiff.
                let weights = visible_weights(2, span);
                let run = |fused: bool| {
                    let a = a0.clone().detach().require_grad();
                    let m = m0.clone().detach().require_grad();
                    let out = if fused {
                        dape.forward_with_map(a.clone(), m.clone(), span)
                    } else {
                        dape.forward_with_map_tensor_path(a.clone(), m.clone())
                    };
                    let grads = (out.clone() * weights.clone()).sum().backward();
                    let named = vec![
                        ("d logits", a.grad(&grads).map(|g| g.flatten(0, 3))),
                        ("d map", m.grad(&grads).map(|g| g.flatten(0, 3))),
                        (
                            "d w1",
                            dape.mlp_in.weight.grad(&grads).map(|g| g.flatten(0, 1)),
                        ),
                        ("d b1", dape.mlp_in.bias.as_ref().unwrap().grad(&grads)),
                        (
                            "d w2",
                            dape.mlp_out.weight.grad(&grads).map(|g| g.flatten(0, 1)),
                        ),
                        ("d b2", dape.mlp_out.bias.as_ref().unwrap().grad(&grads)),
                    ];
                    outputs_and_grads(out, &weights, named)
                };
                assert_fused_node_matches(&label, run(true), run(true), run(false));
            }
        }
    }

    /// Named values (the weighted output and gradients) of a fused node's run, a second run and
    /// the tensor path's: the two fused runs are bit-identical (but for Kerple's parameters,
    /// whose own backward in Burn's ndarray ops sums in parallel) and the fused values are the
    /// tensor path's to float32 rounding, relative to each value's largest entry.
    fn assert_fused_node_matches(
        label: &str,
        fused: Vec<(String, Vec<f32>)>,
        again: Vec<(String, Vec<f32>)>,
        reference: Vec<(String, Vec<f32>)>,
    ) {
        assert_eq!(fused.len(), reference.len(), "{label}: the same values");
        for ((name, x), (_, y)) in fused.iter().zip(again) {
            assert!(
                name.starts_with("d kerple") || x == &y,
                "{label}: {name} differs between runs"
            );
        }
        for ((name, f), (_, t)) in fused.into_iter().zip(reference) {
            assert_eq!(f.len(), t.len(), "{label}: {name} has the reference's size");
            let scale = t.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
            let diff = f
                .iter()
                .zip(&t)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            // Kerple's p and a gradients are sums over every (query, key) pair whose terms
            // cancel: in 400 seeded draws one came to 1.2e-4 of the result (the same before and
            // after the GEMM backward), so they get a wider tolerance.
            let tol = if name.starts_with("d kerple") {
                1e-3
            } else {
                1e-4
            };
            assert!(
                diff <= tol * scale,
                "{label}: {name} differs by {diff} (scale {scale})"
            );
        }
    }

    /// DAPE V2's fused CPU kernel equals the tensor path at every key a row can see, for both
    /// masking modes, kernel widths 1, 3 and 5, with and without a base bias, batch 2, over a
    /// full causal forward, a causal chunk, a decode step and a non-causal block; future keys
    /// hold `logits + bias`.
    #[test]
    fn fused_v2_kernel_matches_tensor_path() {
        let device = Default::default();
        for (with_bias, mask_hidden, k) in [
            (true, true, 3),
            (true, false, 3),
            (false, true, 5),
            (false, false, 5),
            (true, true, 1),
        ] {
            let bias = with_bias
                .then(|| AdditiveBias::Alibi(AlibiConfig::new().init::<B>(4, &device).unwrap()));
            let dape = DapeV2Config::new()
                .with_kernel_size(k)
                .with_negative_slope(0.2)
                .with_mask_future_hidden(mask_hidden)
                .init::<B>(4, bias, &device)
                .unwrap();
            let label = format!("bias {with_bias}, mask {mask_hidden}, k {k}");
            check_fused(&label, &dape.bias, |a, span| {
                [
                    dape.forward_fused(a, span).expect("f32 tensors"),
                    dape.forward(a.clone(), span),
                    dape.forward_blocked(a.clone(), span, HIDDEN_BLOCK),
                ]
            });
        }
    }
}
