//! The token-flattened linear layer, `y = x·W + b` with `x` `[rows, d_in]` and `W`
//! `[d_in, d_out]`: one GEMM onto the bias forward; backward `dx = g·Wᵀ`, `dW = xᵀ·g` (the
//! transposes read through strides) and `db` the column sums of `g`.

use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::Backward;
use burn::backend::autodiff::ops::Ops;
use burn::prelude::*;
use burn::tensor::ops::FloatTensorOps;
use burn::tensor::TensorData;
use burn::tensor::TensorPrimitive;
use rayon::prelude::*;

use super::gemm::{gemm, gemm_new, Mat};
use super::node::{backward_for_parents, finish_node};
use super::{f32_view, to_nd, Ad, Nd};
use crate::kernel::cast;
use crate::kernel::cast_opt;

/// `x · w + b`, row-major `[x.rows, w.cols]`: the bias is written first, and the GEMM adds
/// onto it.
fn linear_forward(x: &Mat, w: &Mat, b: Option<&[f32]>) -> Vec<f32> {
    let (rows, n) = (x.rows, w.cols);
    let mut y = match b {
        Some(b) => {
            assert_eq!(b.len(), n, "bias of a linear layer");
            let mut y = Vec::with_capacity(rows * n);
            for _ in 0..rows {
                y.extend_from_slice(b);
            }
            y
        }
        None => return gemm_new(1.0, x, w),
    };
    gemm(x, w, 1.0, &mut y);
    y
}

/// Column sums of a row-major `rows × cols` matrix, over rayon tasks of rows.
fn column_sums(g: &[f32], cols: usize) -> Vec<f32> {
    const ROWS: usize = 64;
    if cols == 0 {
        return Vec::new();
    }
    g.par_chunks(ROWS * cols)
        .map(|block| {
            let mut sums = vec![0.0f32; cols];
            for row in block.chunks_exact(cols) {
                for (s, &v) in sums.iter_mut().zip(row) {
                    *s += v;
                }
            }
            sums
        })
        .reduce(
            || vec![0.0f32; cols],
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(&b) {
                    *x += y;
                }
                a
            },
        )
}

/// The output shape of a linear layer on `x_dims`.
fn linear_out<const D: usize>(x_dims: [usize; D], d_out: usize) -> [usize; D] {
    let mut out = x_dims;
    out[D - 1] = d_out;
    out
}

pub(in crate::kernel) fn linear_nd<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    w: Tensor<B, 2>,
    b: Option<Tensor<B, 1>>,
) -> Option<Tensor<B, D>> {
    let x: Tensor<Nd, D> = cast(x)?;
    let w: Tensor<Nd, 2> = cast(w)?;
    let b: Option<Tensor<Nd, 1>> = cast_opt(b)?;
    let (dims, device) = (x.dims(), x.device());
    let d_out = w.dims()[1];
    let (x, w) = (x.into_primitive().tensor(), w.into_primitive().tensor());
    let b = b.map(|b| b.into_primitive().tensor());
    let y = linear_values(&x, &w, b.as_ref())?;
    cast(to_nd(y, linear_out(dims, d_out), &device))
}

/// The forward values from the primitives.
fn linear_values(
    x: &burn_ndarray::NdArrayTensor,
    w: &burn_ndarray::NdArrayTensor,
    b: Option<&burn_ndarray::NdArrayTensor>,
) -> Option<Vec<f32>> {
    let xm = Mat::of(f32_view(x)?);
    let wm = Mat::of(f32_view(w)?);
    let bias = match b {
        Some(b) => Some(Mat::of(f32_view(b)?)),
        None => None,
    };
    Some(linear_forward(&xm, &wm, bias.as_ref().map(|b| &b.data[..])))
}

/// What a linear node keeps: its input and weight (shared, not copied).
#[derive(Clone, Debug)]
struct LinearState {
    x: burn_ndarray::NdArrayTensor,
    w: burn_ndarray::NdArrayTensor,
    x_dims: Vec<usize>,
}

/// The backward pass of a linear node with `N` parents (input, weight, and bias when
/// there is one).
#[derive(Debug)]
struct LinearBackward<const N: usize>;

fn linear_backward<const N: usize>(ops: Ops<LinearState, N>, grads: &mut Gradients) {
    let grad = grads.consume::<Nd>(&ops.node);
    let state = &ops.state;
    let g_view = f32_view(&grad).expect("the gradient of an f32 output is f32");
    let g = Mat::of(g_view.clone());
    let g = if g.cs == 1 && g.rs == g.cols {
        g
    } else {
        // Row-major for the column sums.
        let values = g_view.iter().copied().collect();
        Mat::row_major(std::borrow::Cow::Owned(values), g.rows, g.cols)
    };
    let x = Mat::of(f32_view(&state.x).expect("f32 input"));
    let w = Mat::of(f32_view(&state.w).expect("f32 weight"));
    let device = Default::default();
    let parents = ops.parents;
    if let Some(parent) = &parents[0] {
        let dx = gemm_new(1.0, &g, &w.t());
        let t = Nd::float_from_data(TensorData::new(dx, state.x_dims.clone()), &device);
        grads.register::<Nd>(parent.id, t);
    }
    if let Some(parent) = &parents[1] {
        let dw = gemm_new(1.0, &x.t(), &g);
        let t = Nd::float_from_data(TensorData::new(dw, [w.rows, w.cols]), &device);
        grads.register::<Nd>(parent.id, t);
    }
    if N == 3 {
        if let Some(parent) = &parents[N - 1] {
            let db = column_sums(&g.data, g.cols);
            let t = Nd::float_from_data(TensorData::new(db, [g.cols]), &device);
            grads.register::<Nd>(parent.id, t);
        }
    }
}

backward_for_parents!(LinearBackward, LinearState, linear_backward, [2, 3]);

pub(in crate::kernel) fn linear_autodiff<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    w: Tensor<B, 2>,
    b: Option<Tensor<B, 1>>,
) -> Option<Tensor<B, D>> {
    let x: Tensor<Ad, D> = cast(x)?;
    let w: Tensor<Ad, 2> = cast(w)?;
    let b: Option<Tensor<Ad, 1>> = cast_opt(b)?;
    let (dims, device) = (x.dims(), x.device());
    let d_out = w.dims()[1];
    let (x, w) = (x.into_primitive().tensor(), w.into_primitive().tensor());
    let b = b.map(|b| b.into_primitive().tensor());
    let y = linear_values(&x.primitive, &w.primitive, b.as_ref().map(|b| &b.primitive))?;
    let out = to_nd(y, linear_out(dims, d_out), &device)
        .into_primitive()
        .tensor();
    let state = LinearState {
        x: x.primitive,
        w: w.primitive,
        x_dims: dims.to_vec(),
    };
    let out = match b {
        Some(b) => finish_node(
            LinearBackward::<3>
                .prepare::<NoCheckpointing>([x.node, w.node, b.node])
                .compute_bound()
                .stateful(),
            state,
            out,
        ),
        None => finish_node(
            LinearBackward::<2>
                .prepare::<NoCheckpointing>([x.node, w.node])
                .compute_bound()
                .stateful(),
            state,
            out,
        ),
    };
    cast(Tensor::<Ad, D>::from_primitive(TensorPrimitive::Float(out)))
}
