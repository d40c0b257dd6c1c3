//! A bias from a scalar MLP of a row-scaled distance (FIRE's): which backend gets the kernel.

use burn::prelude::*;

#[cfg(feature = "ndarray")]
use super::ndarray::{applies, applies_autodiff, scalar_mlp_bias_autodiff, scalar_mlp_bias_nd};

/// The MLP `1 → width → heads` of [`scalar_mlp_bias`], with a piecewise-linear activation:
/// `act(z) = z` for `z > 0`, `slope · z` otherwise (ReLU: `slope = 0`; LeakyReLU: 0.01).
pub struct ScalarMlp<B: Backend> {
    /// First layer's weight `[1, width]` (Burn's `Linear` layout, input by output).
    pub w1: Tensor<B, 2>,
    /// First layer's bias `[width]`.
    pub b1: Option<Tensor<B, 1>>,
    /// Second layer's weight `[width, heads]`.
    pub w2: Tensor<B, 2>,
    /// Second layer's bias `[heads]`.
    pub b2: Option<Tensor<B, 1>>,
    /// The activation's slope below zero.
    pub slope: f32,
}

/// `out[0, h, r, c] = Σ_k w2[k, h] · act(w1[k] · x + b1[k]) + b2[h]` with
/// `x = table[|rows[r] − cols[c]|] / normaliser[r]`, `[1, heads, rows, cols]`: FIRE's bias, whose
/// MLP input is `ψ(distance)` over a per-row normaliser.
///
/// The MLP of a scalar through a piecewise-linear activation is a piecewise-linear function of
/// that scalar, with a kink where a hidden unit changes sign (`x = −b1[k] / w1[k]`). The kernel
/// forms each piece's slope and intercept per head once, then each pair costs a search among
/// the kinks and one multiply-add per head, where the tensor path computes `width` hidden values
/// and `width · heads` multiply-adds per pair. Equal to the tensor path up to rounding.
///
/// On `NdArray<f32>`, and on `Autodiff<NdArray<f32>>` as one graph node whose backward pass
/// sums the bias's gradient per piece and head (the MLP's gradients follow piece by piece) and
/// passes each pair's `∂x` to `table` and `normaliser`, whose own gradients (FIRE's `c` and `L`)
/// flow through their `[n]` and `[rows]` ops. `None` elsewhere, under autodiff without both
/// biases, and when a distance reaches past `table` or `normaliser` is not one value per row:
/// the caller takes the tensor path.
pub fn scalar_mlp_bias<B: Backend>(
    mlp: ScalarMlp<B>,
    table: Tensor<B, 1>,
    normaliser: Tensor<B, 1>,
    rows: &[i64],
    cols: &[i64],
) -> Option<Tensor<B, 4>> {
    #[cfg(feature = "ndarray")]
    if table.dtype() == burn::tensor::DType::F32 {
        if applies::<B>() {
            return scalar_mlp_bias_nd(mlp, table, normaliser, rows, cols);
        }
        if applies_autodiff::<B>() {
            return scalar_mlp_bias_autodiff(mlp, table, normaliser, rows, cols);
        }
    }
    #[cfg(not(feature = "ndarray"))]
    let _ = (mlp, table, normaliser, rows, cols);
    None
}

/// Whether [`scalar_mlp_bias`] has a kernel for backend `B` (ndarray, with or without
/// autodiff).
pub fn scalar_mlp_applies<B: Backend>() -> bool {
    #[cfg(feature = "ndarray")]
    return applies::<B>() || applies_autodiff::<B>();
    #[cfg(not(feature = "ndarray"))]
    false
}
