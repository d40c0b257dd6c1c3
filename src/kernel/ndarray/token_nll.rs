//! The per-token negative log-likelihood, `−log softmax(x)[target]` for `x` `[batch, seq,
//! vocab]`: one pass per row forward (keeping each row's log-sum-exp), one pass per row
//! backward, `dx = g·(softmax(x) − onehot(target))`.

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

use super::gemm::Mat;
use super::node::{backward_for_parents, finish_node};
use super::simd::{exp, lane_max, lane_sum, vectorized};
use super::{f32_view, to_nd, Ad, Nd};
use crate::kernel::cast;

/// Rows of logits per rayon task of the token NLL kernel.
const NLL_ROWS: usize = 32;

vectorized! {
    /// Each row's log-sum-exp as its max and `ln Σ exp(x − max)` (`lse`, kept apart so
    /// that `x − max` stays exact), and the NLL of its target (`nll`), for row-major
    /// `rows × cols` logits `x`.
    fn nll_rows(
        x: &[f32],
        cols: usize,
        targets: &[usize],
        lse: &mut [[f32; 2]],
        nll: &mut [f32],
    ) {
        let mut e = vec![0.0f32; cols];
        for (((row, &t), l), n) in x
            .chunks_exact(cols)
            .zip(targets)
            .zip(lse.iter_mut())
            .zip(nll.iter_mut())
        {
            let max = lane_max(row);
            for (e, &v) in e.iter_mut().zip(row) {
                *e = exp(v - max);
            }
            let log_sum = lane_sum(&e).ln();
            *l = [max, log_sum];
            *n = log_sum - (row[t] - max);
        }
    }
}

vectorized! {
    /// `dx = g · (exp(x − lse) − onehot(target))` row by row.
    fn nll_grad_rows(
        dx: &mut [f32],
        x: &[f32],
        cols: usize,
        targets: &[usize],
        lse: &[[f32; 2]],
        g: &[f32],
    ) {
        for ((((d, row), &t), &[max, log_sum]), &g) in dx
            .chunks_exact_mut(cols)
            .zip(x.chunks_exact(cols))
            .zip(targets)
            .zip(lse)
            .zip(g)
        {
            for (d, &v) in d.iter_mut().zip(row) {
                *d = g * exp((v - max) - log_sum);
            }
            d[t] -= g;
        }
    }
}

/// The logits as row-major `[rows, vocab]` values, NLL per row and log-sum-exp per row.
fn nll_values(x: &burn_ndarray::NdArrayTensor, targets: &[usize]) -> Option<NllValues> {
    let view = f32_view(x)?;
    let cols = *view.shape().last()?;
    let rows = targets.len();
    if cols == 0 || view.len() != rows * cols {
        return None;
    }
    let m = Mat::of(view);
    if m.rows != rows {
        return None;
    }
    let x = m.row_major_values();
    let mut lse = vec![[0.0f32; 2]; rows];
    let mut nll = vec![0.0f32; rows];
    x.par_chunks(NLL_ROWS * cols)
        .zip(targets.par_chunks(NLL_ROWS))
        .zip(lse.par_chunks_mut(NLL_ROWS))
        .zip(nll.par_chunks_mut(NLL_ROWS))
        .for_each(|(((x, t), l), n)| nll_rows(x, cols, t, l, n));
    Some(NllValues { nll, lse, cols })
}

struct NllValues {
    nll: Vec<f32>,
    lse: Vec<[f32; 2]>,
    cols: usize,
}

pub(in crate::kernel) fn token_nll_nd<B: Backend>(
    logits: Tensor<B, 3>,
    targets: &[usize],
) -> Option<Tensor<B, 2>> {
    let logits: Tensor<Nd, 3> = cast(logits)?;
    let ([b, l, _], device) = (logits.dims(), logits.device());
    let values = nll_values(&logits.into_primitive().tensor(), targets)?;
    cast(to_nd(values.nll, [b, l], &device))
}

/// What a token NLL node keeps: the logits (shared, not copied), the targets and each
/// row's log-sum-exp.
#[derive(Clone, Debug)]
struct NllState {
    logits: burn_ndarray::NdArrayTensor,
    targets: Arc<Vec<usize>>,
    lse: Arc<Vec<[f32; 2]>>,
    cols: usize,
}

#[derive(Debug)]
struct NllBackward<const N: usize>;

fn nll_backward<const N: usize>(ops: Ops<NllState, N>, grads: &mut Gradients) {
    let grad = grads.consume::<Nd>(&ops.node);
    let s = &ops.state;
    let Some(parent) = &ops.parents[0] else {
        return;
    };
    let view = f32_view(&s.logits).expect("f32 logits");
    let shape = view.shape().to_vec();
    let m = Mat::of(view);
    let cols = s.cols;
    let rows = s.targets.len();
    let x = m.row_major_values();
    // The output's gradient in row-major order (it may be a broadcast view of a mean's).
    let g: Vec<f32> = f32_view(&grad)
        .expect("the gradient of an f32 output is f32")
        .iter()
        .copied()
        .collect();
    let mut dx = vec![0.0f32; rows * cols];
    dx.par_chunks_mut(NLL_ROWS * cols)
        .zip(x.par_chunks(NLL_ROWS * cols))
        .zip(s.targets.par_chunks(NLL_ROWS))
        .zip(s.lse.par_chunks(NLL_ROWS))
        .zip(g.par_chunks(NLL_ROWS))
        .for_each(|((((d, x), t), l), g)| nll_grad_rows(d, x, cols, t, l, g));
    let t = Nd::float_from_data(TensorData::new(dx, shape), &Default::default());
    grads.register::<Nd>(parent.id, t);
}

backward_for_parents!(NllBackward, NllState, nll_backward, [1]);

pub(in crate::kernel) fn token_nll_autodiff<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Vec<usize>,
) -> Option<Tensor<B, 2>> {
    let logits: Tensor<Ad, 3> = cast(logits)?;
    let ([b, l, _], device) = (logits.dims(), logits.device());
    let logits = logits.into_primitive().tensor();
    let values = nll_values(&logits.primitive, &targets)?;
    let out = to_nd(values.nll, [b, l], &device).into_primitive().tensor();
    let state = NllState {
        logits: logits.primitive,
        targets: Arc::new(targets),
        lse: Arc::new(values.lse),
        cols: values.cols,
    };
    let out = finish_node(
        NllBackward::<1>
            .prepare::<NoCheckpointing>([logits.node])
            .compute_bound()
            .stateful(),
        state,
        out,
    );
    cast(Tensor::<Ad, 2>::from_primitive(TensorPrimitive::Float(out)))
}
