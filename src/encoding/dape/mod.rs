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
//!
//! | file | holds |
//! | --- | --- |
//! | `mod.rs` | [`DapeConfig`], [`Dape`] (V1): which path a forward takes on which backend |
//! | `v2.rs` | [`DapeV2Config`], [`DapeV2`]: the same for V2 |
//! | `tile.rs` | [`Dape::attention`], [`DapeV2::attention`]: DAPE and the attention around it in one kernel |
//! | `tensor_path.rs` | the plain reference: both versions as Burn tensor ops, on any backend |
//! | `fused/` | the fused ndarray kernels that must equal it: rows, backward, graph nodes |
//! | `tests.rs` | the fused paths against the tensor path: values, gradients, row blocks |
//! | `attention_tests.rs` | DAPE inside the attention tile against the tensor path |
//!
//! On LibTorch DAPE V1 runs PyTorch's kernels (`crate::kernel`); every other backend takes the
//! tensor path.

#[cfg(all(test, feature = "ndarray"))]
mod attention_tests;
#[cfg(all(test, feature = "ndarray"))]
mod distance_tests;
#[cfg(feature = "ndarray")]
mod fused;
mod tensor_path;
#[cfg(test)]
mod tests;
mod tile;
mod v2;

use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;

use super::{default_from_new, AdditiveBias, Span};
use crate::error::{ensure, Result};
pub(crate) use tile::{tile_attention, whole_sequence, Qkv as TileQkv, TiledCorrection};
pub use v2::{DapeV2, DapeV2Config};

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
        use fused::{dape_v1, run_fused};
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
        fused::dape_v1_autodiff(
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
    fn host_mlp(&self, h: usize) -> Option<fused::Mlp> {
        use fused::{host, host_bias, Mlp};
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

    /// `logits + map + f([logits ‖ map])` for a base bias `map` `[batch or 1, H, seq_q, seq_k]`
    /// computed outside (built by [`DapeConfig::init_over_external`]) over the rows and keys of
    /// `span`. On ndarray it runs the fused kernels of [`Self::forward`] (evaluation) or their
    /// graph node (training), which skip the keys a causal row cannot see (their entries are
    /// `logits + map`, masked afterwards); on LibTorch DAPE V1's node (as [`Self::forward`]);
    /// elsewhere the tensor path ([`Self::forward_with_map_tensor_path`]).
    pub fn forward_with_map(
        &self,
        logits: Tensor<B, 4>,
        map: Tensor<B, 4>,
        span: &Span,
    ) -> Tensor<B, 4> {
        #[cfg(feature = "ndarray")]
        if logits.dtype() == burn::tensor::DType::F32 {
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
        // On LibTorch, DAPE V1's node (per-sequence maps included: DAPE-FoX's).
        #[cfg(feature = "tch")]
        if logits.dtype() == burn::tensor::DType::F32 && crate::kernel::applies_tch::<B>() {
            if let Some(out) = crate::kernel::dape_v1_tch(
                logits.clone(),
                Some(map.clone()),
                self.mlp_in.weight.val(),
                self.mlp_in.bias.as_ref().map(|b| b.val()),
                self.mlp_out.weight.val(),
                self.mlp_out.bias.as_ref().map(|b| b.val()),
                self.negative_slope,
                HIDDEN_BLOCK,
            ) {
                return out;
            }
        }
        // Only the fused kernels read the span (to skip the keys a causal row cannot see).
        #[cfg(not(feature = "ndarray"))]
        let _ = span;
        self.forward_with_map_tensor_path(logits, map)
    }
}

/// Largest block of query rows `[batch, H, rows, keys]` (floats) that [`Dape::attention`] holds
/// at a time: 2^21, 8 MiB.
pub const ATTENTION_TILE: usize = 1 << 21;

/// Largest hidden tensor of DAPE's `f` (elements) before it runs over blocks of query rows:
/// 2^22 floats, 16 MiB.
pub const HIDDEN_BLOCK: usize = 1 << 22;
