//! Softmax over the keys of `[batch, heads, rows, keys]` logits with the causal mask folded in
//! (row `r` at absolute position `q0 + r` sees keys `0..=q0 + r`); backward
//! `dx = y ⊙ (g − Σ_j g_j·y_j)` per row.

use burn::prelude::*;
use rayon::prelude::*;

use super::node::{record_unary, UnaryGrad};
use super::simd::{exp, lane_dot, lane_max, lane_sum, vectorized};
use super::{row_major_values, to_nd, Ad, Nd};
use crate::kernel::cast;

/// Softmax of `row[..n]` in place, and 0 at `row[n..]` (the masked keys).
#[inline(always)]
pub(super) fn softmax_row(row: &mut [f32], n: usize) {
    let max = lane_max(&row[..n]);
    for x in &mut row[..n] {
        *x = exp(*x - max);
    }
    let inv = lane_sum(&row[..n]).recip();
    for x in &mut row[..n] {
        *x *= inv;
    }
    row[n..].fill(0.0);
}

vectorized! {
    fn softmax_row_wide(row: &mut [f32], n: usize) {
        softmax_row(row, n)
    }
}

/// [`softmax_row`] compiled for this CPU's widest vectors: the softmax of `row[..n]` in place,
/// 0 at `row[n..]` (the masked keys).
pub(crate) fn softmax_row_simd(row: &mut [f32], n: usize) {
    softmax_row_wide(row, n)
}

/// How many keys row `row` of a `[.., rows, keys]` block sees.
pub(super) fn visible(row: usize, rows: usize, keys: usize, causal_from: Option<usize>) -> usize {
    match causal_from {
        Some(q0) => (q0 + row % rows + 1).min(keys),
        None => keys,
    }
}

fn softmax_forward(
    x: &[f32],
    [_, _, rows, keys]: [usize; 4],
    causal_from: Option<usize>,
) -> Vec<f32> {
    let mut y = vec![0.0f32; x.len()];
    y.par_chunks_mut(keys)
        .zip(x.par_chunks(keys))
        .enumerate()
        .for_each(|(row, (y, x))| {
            let n = visible(row, rows, keys, causal_from);
            y[..n].copy_from_slice(&x[..n]);
            softmax_row_wide(y, n);
        });
    y
}

vectorized! {
    /// `dx = y ⊙ (g − Σ_j g_j y_j)` over one row.
    fn softmax_grad_row(dx: &mut [f32], y: &[f32], g: &[f32]) {
        let dot = lane_dot(y, g);
        for ((dx, &y), &g) in dx.iter_mut().zip(y).zip(g) {
            *dx = y * (g - dot);
        }
    }
}

/// `dx = y ⊙ (g − Σ_j g_j y_j)` per row (0 at masked keys, where `y` is 0).
fn softmax_backward(
    y: &[f32],
    g: &[f32],
    [_, _, rows, keys]: [usize; 4],
    causal_from: Option<usize>,
) -> Vec<f32> {
    let mut dx = vec![0.0f32; y.len()];
    dx.par_chunks_mut(keys)
        .zip(y.par_chunks(keys).zip(g.par_chunks(keys)))
        .enumerate()
        .for_each(|(row, (dx, (y, g)))| {
            let n = visible(row, rows, keys, causal_from);
            softmax_grad_row(&mut dx[..n], &y[..n], &g[..n]);
        });
    dx
}

pub(in crate::kernel) fn softmax_nd<B: Backend>(
    x: Tensor<B, 4>,
    causal_from: Option<usize>,
) -> Option<Tensor<B, 4>> {
    let x: Tensor<Nd, 4> = cast(x)?;
    let (dims, device) = (x.dims(), x.device());
    let y = softmax_forward(
        &row_major_values(&x.into_primitive().tensor())?,
        dims,
        causal_from,
    );
    cast(to_nd(y, dims, &device))
}

/// The softmax's backward pass: from its saved output (the output tensor itself, shared,
/// not a copy), `y ⊙ (g − Σ g y)` per row.
#[derive(Debug)]
struct SoftmaxGrad {
    y: burn_ndarray::NdArrayTensor,
    dims: [usize; 4],
    causal_from: Option<usize>,
}

impl UnaryGrad for SoftmaxGrad {
    fn input_grad(&self, grad: &[f32]) -> Vec<f32> {
        let y = row_major_values(&self.y).expect("the softmax's output is f32");
        softmax_backward(&y, grad, self.dims, self.causal_from)
    }
}

pub(in crate::kernel) fn softmax_autodiff<B: Backend>(
    x: Tensor<B, 4>,
    causal_from: Option<usize>,
) -> Option<Tensor<B, 4>> {
    let x: Tensor<Ad, 4> = cast(x)?;
    let dims = x.dims();
    let input = x.clone().inner().into_primitive().tensor();
    let y = softmax_forward(&row_major_values(&input)?, dims, causal_from);
    cast(record_unary(x, y, |y| {
        Box::new(SoftmaxGrad {
            y,
            dims,
            causal_from,
        })
    }))
}
