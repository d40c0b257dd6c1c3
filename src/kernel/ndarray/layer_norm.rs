//! Layer normalization over the last dimension, `y = (x − μ)·rstd·γ + β` with
//! `rstd = 1/√(var + ε)`: one pass per row forward, keeping only `[μ, rstd]` per row; one
//! pass per row backward, `dx = rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ ⊙ x̂))` with `ĝ = g ⊙ γ`, and the
//! gradients of `γ` and `β` summed over rayon tasks of rows.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::Backward;
use burn::backend::autodiff::ops::Ops;
use burn::prelude::*;
use burn::tensor::ops::FloatTensorOps;
use burn::tensor::TensorData;
use burn::tensor::TensorPrimitive;
use rayon::prelude::*;

use super::node::{backward_for_parents, finish_node};
use super::simd::{lane_dot, lane_sum, lane_sum_sq_dev, vectorized};
use super::{row_major_values, to_nd, Ad, Nd};
use crate::kernel::cast;
use crate::kernel::cast_opt;

/// Rows of a layer-norm block per rayon task.
const NORM_ROWS: usize = 32;

vectorized! {
    /// The forward pass over whole rows of `d = gamma.len()` values: `y` and each row's
    /// `[mean, 1 / √(var + eps)]`.
    fn layer_norm_rows(
        x: &[f32],
        y: &mut [f32],
        stats: &mut [[f32; 2]],
        gamma: &[f32],
        beta: Option<&[f32]>,
        eps: f32,
    ) {
        let d = gamma.len();
        for ((xr, yr), st) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)).zip(stats) {
            let mean = lane_sum(xr) / d as f32;
            let rstd = 1.0 / (lane_sum_sq_dev(xr, mean) / d as f32 + eps).sqrt();
            *st = [mean, rstd];
            match beta {
                Some(beta) => {
                    for (((y, &x), &g), &b) in yr.iter_mut().zip(xr).zip(gamma).zip(beta) {
                        *y = (x - mean) * rstd * g + b;
                    }
                }
                None => {
                    for ((y, &x), &g) in yr.iter_mut().zip(xr).zip(gamma) {
                        *y = (x - mean) * rstd * g;
                    }
                }
            }
        }
    }
}

vectorized! {
    /// The backward pass over whole rows: `dx = rstd · (ĝ − mean(ĝ) − x̂ · mean(ĝ ⊙ x̂))`
    /// with `ĝ = g ⊙ gamma`, and `Σ g ⊙ x̂`, `Σ g` added into `dgamma`, `dbeta`.
    fn layer_norm_grad_rows(
        x: &[f32],
        g: &[f32],
        stats: &[[f32; 2]],
        gamma: &[f32],
        dx: &mut [f32],
        dgamma: &mut [f32],
        dbeta: &mut [f32],
    ) {
        let d = gamma.len();
        let mut xhat = vec![0.0f32; d];
        let mut gh = vec![0.0f32; d];
        let rows = x.chunks_exact(d).zip(g.chunks_exact(d));
        for (((xr, gr), dxr), &[mean, rstd]) in rows.zip(dx.chunks_exact_mut(d)).zip(stats) {
            for ((((xh, h), &x), &gv), &ga) in
                xhat.iter_mut().zip(gh.iter_mut()).zip(xr).zip(gr).zip(gamma)
            {
                *xh = (x - mean) * rstd;
                *h = gv * ga;
            }
            let a = lane_sum(&gh) / d as f32;
            let b = lane_dot(&gh, &xhat) / d as f32;
            for (((dx, &h), &xh), ((dga, dbe), &gv)) in dxr
                .iter_mut()
                .zip(&gh)
                .zip(&xhat)
                .zip(dgamma.iter_mut().zip(dbeta.iter_mut()).zip(gr))
            {
                *dx = rstd * (h - a - xh * b);
                *dga += gv * xh;
                *dbe += gv;
            }
        }
    }
}

/// The forward pass: the output and each row's `[mean, rstd]`.
fn layer_norm_values(
    x: &burn_ndarray::NdArrayTensor,
    gamma: &burn_ndarray::NdArrayTensor,
    beta: Option<&burn_ndarray::NdArrayTensor>,
    eps: f64,
) -> Option<(Vec<f32>, Vec<[f32; 2]>)> {
    let x = row_major_values(x)?;
    let gamma = row_major_values(gamma)?;
    let beta = match beta {
        Some(b) => Some(row_major_values(b)?),
        None => None,
    };
    let d = gamma.len();
    let rows = x.len() / d;
    let mut y = vec![0.0f32; x.len()];
    let mut stats = vec![[0.0f32; 2]; rows];
    y.par_chunks_mut(NORM_ROWS * d)
        .zip(x.par_chunks(NORM_ROWS * d))
        .zip(stats.par_chunks_mut(NORM_ROWS))
        .for_each(|((y, x), st)| layer_norm_rows(x, y, st, &gamma, beta.as_deref(), eps as f32));
    Some((y, stats))
}

pub(in crate::kernel) fn layer_norm_nd<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    gamma: Tensor<B, 1>,
    beta: Option<Tensor<B, 1>>,
    eps: f64,
) -> Option<Tensor<B, D>> {
    let x: Tensor<Nd, D> = cast(x)?;
    let gamma: Tensor<Nd, 1> = cast(gamma)?;
    let beta: Option<Tensor<Nd, 1>> = cast_opt(beta)?;
    let (dims, device) = (x.dims(), x.device());
    let beta = beta.map(|b| b.into_primitive().tensor());
    let (y, _) = layer_norm_values(
        &x.into_primitive().tensor(),
        &gamma.into_primitive().tensor(),
        beta.as_ref(),
        eps,
    )?;
    cast(to_nd(y, dims, &device))
}

/// What a layer-norm node keeps: its input and `gamma` (shared, not copied) and each row's
/// `[mean, rstd]`.
#[derive(Clone, Debug)]
struct LayerNormState {
    x: burn_ndarray::NdArrayTensor,
    gamma: burn_ndarray::NdArrayTensor,
    stats: Arc<Vec<[f32; 2]>>,
    dims: Vec<usize>,
}

/// The backward pass of a layer-norm node with `N` parents (input, gamma, and beta when
/// there is one).
#[derive(Debug)]
struct LayerNormBackward<const N: usize>;

fn layer_norm_backward<const N: usize>(ops: Ops<LayerNormState, N>, grads: &mut Gradients) {
    let grad = grads.consume::<Nd>(&ops.node);
    let state = &ops.state;
    let g = row_major_values(&grad).expect("the gradient of an f32 output is f32");
    let x = row_major_values(&state.x).expect("f32 input");
    let gamma = row_major_values(&state.gamma).expect("f32 gamma");
    let d = gamma.len();
    let mut dx = vec![0.0f32; x.len()];
    let (dgamma, dbeta) = dx
        .par_chunks_mut(NORM_ROWS * d)
        .zip(x.par_chunks(NORM_ROWS * d).zip(g.par_chunks(NORM_ROWS * d)))
        .zip(state.stats.par_chunks(NORM_ROWS))
        .map(|((dx, (x, g)), st)| {
            let (mut dga, mut dbe) = (vec![0.0f32; d], vec![0.0f32; d]);
            layer_norm_grad_rows(x, g, st, &gamma, dx, &mut dga, &mut dbe);
            (dga, dbe)
        })
        .reduce(
            || (vec![0.0f32; d], vec![0.0f32; d]),
            |(mut a, mut b), (c, e)| {
                a.iter_mut().zip(&c).for_each(|(a, c)| *a += c);
                b.iter_mut().zip(&e).for_each(|(b, e)| *b += e);
                (a, b)
            },
        );
    let device = Default::default();
    let parents = ops.parents;
    let mut register = |i: usize, values: Vec<f32>, dims: Vec<usize>| {
        if let Some(parent) = &parents[i] {
            let t = Nd::float_from_data(TensorData::new(values, dims), &device);
            grads.register::<Nd>(parent.id, t);
        }
    };
    register(0, dx, state.dims.clone());
    register(1, dgamma, vec![d]);
    if N == 3 {
        register(N - 1, dbeta, vec![d]);
    }
}

backward_for_parents!(
    LayerNormBackward,
    LayerNormState,
    layer_norm_backward,
    [2, 3]
);

pub(in crate::kernel) fn layer_norm_autodiff<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    gamma: Tensor<B, 1>,
    beta: Option<Tensor<B, 1>>,
    eps: f64,
) -> Option<Tensor<B, D>> {
    let x: Tensor<Ad, D> = cast(x)?;
    let gamma: Tensor<Ad, 1> = cast(gamma)?;
    let beta: Option<Tensor<Ad, 1>> = cast_opt(beta)?;
    let (dims, device) = (x.dims(), x.device());
    let (x, gamma) = (x.into_primitive().tensor(), gamma.into_primitive().tensor());
    let beta = beta.map(|b| b.into_primitive().tensor());
    let (y, stats) = layer_norm_values(
        &x.primitive,
        &gamma.primitive,
        beta.as_ref().map(|b| &b.primitive),
        eps,
    )?;
    let out = to_nd(y, dims, &device).into_primitive().tensor();
    let state = LayerNormState {
        x: x.primitive,
        gamma: gamma.primitive,
        stats: Arc::new(stats),
        dims: dims.to_vec(),
    };
    let out = match beta {
        Some(b) => finish_node(
            LayerNormBackward::<3>
                .prepare::<NoCheckpointing>([x.node, gamma.node, b.node])
                .compute_bound()
                .stateful(),
            state,
            out,
        ),
        None => finish_node(
            LayerNormBackward::<2>
                .prepare::<NoCheckpointing>([x.node, gamma.node])
                .compute_bound()
                .stateful(),
            state,
            out,
        ),
    };
    cast(Tensor::<Ad, D>::from_primitive(TensorPrimitive::Float(out)))
}
