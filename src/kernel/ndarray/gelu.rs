//! Exact GELU, `y = x·Φ(x)`, elementwise over rayon chunks; under autodiff the node keeps the
//! slope `Φ(x) + x·φ(x)` computed in the same pass, and the backward pass is `g ⊙ slope`.

use burn::prelude::*;
use rayon::prelude::*;

use super::node::{record_unary_lazy, UnaryGrad};
use super::simd::{exp, phi, vectorized};
use super::{row_major_values, to_nd, Ad, Nd, CHUNK};
use crate::kernel::cast;

vectorized! {
    fn gelu_chunk(y: &mut [f32], x: &[f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = x * phi(x);
        }
    }
}

fn gelu_forward(x: &[f32]) -> Vec<f32> {
    let mut y = vec![0.0f32; x.len()];
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(y, x)| gelu_chunk(y, x));
    y
}

vectorized! {
    /// GELU and its derivative in one pass: `y = x Φ(x)`, `d = Φ(x) + x φ(x)`.
    fn gelu_and_slope_chunk(y: &mut [f32], d: &mut [f32], x: &[f32]) {
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        for ((y, d), &x) in y.iter_mut().zip(d.iter_mut()).zip(x) {
            let p = phi(x);
            *y = x * p;
            *d = p + x * exp(-0.5 * x * x) * INV_SQRT_2PI;
        }
    }
}

/// GELU's values and its slope at `x` (what the backward pass multiplies by).
fn gelu_forward_with_slope(x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut y = vec![0.0f32; x.len()];
    let mut d = vec![0.0f32; x.len()];
    y.par_chunks_mut(CHUNK)
        .zip(d.par_chunks_mut(CHUNK))
        .zip(x.par_chunks(CHUNK))
        .for_each(|((y, d), x)| gelu_and_slope_chunk(y, d, x));
    (y, d)
}

vectorized! {
    fn mul_chunk(out: &mut [f32], a: &[f32], b: &[f32]) {
        for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
            *o = a * b;
        }
    }
}

/// `a ⊙ b`, elementwise over rayon chunks.
fn mul_values(a: &[f32], b: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0f32; a.len()];
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(o, (a, b))| mul_chunk(o, a, b));
    out
}

/// The forward kernel on `NdArray<f32>`.
pub(in crate::kernel) fn gelu_nd<B: Backend, const D: usize>(
    x: Tensor<B, D>,
) -> Option<Tensor<B, D>> {
    let x: Tensor<Nd, D> = cast(x)?;
    let (dims, device) = (x.dims(), x.device());
    let y = gelu_forward(&row_major_values(&x.into_primitive().tensor())?);
    cast(to_nd(y, dims, &device))
}

/// GELU's backward pass: the slope `Φ(x) + x φ(x)` at the input, computed in the forward
/// pass beside the values (it shares `Φ`), so that the backward pass is one product
/// `g · slope` and the input itself need not be kept.
#[derive(Debug)]
struct GeluGrad {
    slope: Vec<f32>,
}

impl UnaryGrad for GeluGrad {
    fn input_grad(&self, grad: &[f32]) -> Vec<f32> {
        mul_values(grad, &self.slope)
    }
}

/// The kernel on `Autodiff<NdArray<f32>>`: one node, whose backward multiplies the
/// incoming gradient by the slope saved in the forward pass (only when `x` is tracked).
pub(in crate::kernel) fn gelu_autodiff<B: Backend, const D: usize>(
    x: Tensor<B, D>,
) -> Option<Tensor<B, D>> {
    let x: Tensor<Ad, D> = cast(x)?;
    let input = x.clone().inner().into_primitive().tensor();
    let values = row_major_values(&input)?;
    cast(record_unary_lazy(x, |tracked| {
        if tracked {
            let (y, slope) = gelu_forward_with_slope(&values);
            let saved = move |_| Box::new(GeluGrad { slope }) as Box<dyn UnaryGrad>;
            (y, Some(saved))
        } else {
            (gelu_forward(&values), None)
        }
    }))
}
