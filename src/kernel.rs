//! Fused CPU kernels for the ndarray backend, behind the same generic functions as the tensor
//! path, and the host-copy helpers they share with DAPE's kernels (`encoding/fused.rs`).
//!
//! A kernel runs when the backend is `NdArray<f32>` (evaluation) or `Autodiff<NdArray<f32>>`
//! (training, as one graph node with a hand-written backward pass), checked by type at run
//! time; every other backend, and the `ndarray` feature off, takes the tensor path. Each kernel
//! is tested against the tensor path in values and gradients.

use burn::prelude::*;

/// Exact GELU, `x Φ(x)`, as one pass forward and one pass backward on ndarray (elementwise over
/// rayon chunks, `erf` from libm as ndarray's own `erf`), and [`crate::util::gelu_exact`] on
/// every other backend. Same function: the tests hold the two to 1e-6.
pub fn gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    #[cfg(feature = "ndarray")]
    if x.dtype() == burn::tensor::DType::F32 {
        if applies::<B>() {
            if let Some(y) = gelu_nd(x.clone()) {
                return y;
            }
        } else if applies_autodiff::<B>() {
            if let Some(y) = gelu_autodiff(x.clone()) {
                return y;
            }
        }
    }
    crate::util::gelu_exact(x)
}

/// Softmax over the keys of `logits` `[batch, heads, rows, keys]` as one fused pass forward and
/// one backward on ndarray, with the causal mask folded in: with `causal_from = Some(q0)`, row
/// `r` (absolute position `q0 + r`) sees keys `0..=q0 + r` and gets probability 0 elsewhere,
/// as `mask_fill(-inf)` then `softmax` give. `Err(logits)` hands the input back when no kernel
/// applies (another backend or element type, or the `ndarray` feature off): the caller then
/// takes the tensor path.
pub fn fused_softmax<B: Backend>(
    logits: Tensor<B, 4>,
    causal_from: Option<usize>,
) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    #[cfg(feature = "ndarray")]
    if logits.dtype() == burn::tensor::DType::F32 {
        if applies::<B>() {
            if let Some(p) = softmax_nd(logits.clone(), causal_from) {
                return Ok(p);
            }
        } else if applies_autodiff::<B>() {
            if let Some(p) = softmax_autodiff(logits.clone(), causal_from) {
                return Ok(p);
            }
        }
    }
    #[cfg(not(feature = "ndarray"))]
    let _ = causal_from;
    Err(logits)
}

#[cfg(feature = "ndarray")]
pub(crate) use nd::*;

#[cfg(feature = "ndarray")]
mod nd {
    use std::any::{Any, TypeId};
    use std::sync::Arc;

    use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::NoCheckpointing};
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::backend::Autodiff;
    use burn::prelude::*;
    use burn::tensor::ops::FloatTensorOps;
    use burn::tensor::{DType, TensorData, TensorPrimitive};
    use rayon::prelude::*;

    /// The backend the kernels run on outside autodiff.
    pub(crate) type Nd = burn_ndarray::NdArray<f32>;
    /// The backend the kernels run on under autodiff.
    pub(crate) type Ad = Autodiff<Nd>;

    /// Whether `B` is `NdArray<f32>` (no autodiff).
    pub(crate) fn applies<B: Backend>() -> bool {
        TypeId::of::<B>() == TypeId::of::<Nd>()
    }

    /// Whether `B` is `Autodiff<NdArray<f32>>` (training on ndarray).
    pub(crate) fn applies_autodiff<B: Backend>() -> bool {
        TypeId::of::<B>() == TypeId::of::<Ad>()
    }

    /// Moves a value to the type it is known to have (`None` if it has another).
    pub(crate) fn cast<T: 'static, U: 'static>(x: T) -> Option<U> {
        (Box::new(x) as Box<dyn Any>)
            .downcast::<U>()
            .ok()
            .map(|u| *u)
    }

    /// Reads an `f32` tensor's values in row-major order (`None` for another element type). On
    /// ndarray this is one copy of the array's memory; `into_data` would walk the elements one
    /// by one whenever the array is shared (as a graph's tensors are).
    pub(crate) fn host<B: Backend, const D: usize>(x: Tensor<B, D>) -> Option<Vec<f32>> {
        if x.dtype() != DType::F32 {
            return None;
        }
        if applies::<B>() {
            let x: Tensor<Nd, D> = cast(x)?;
            return host_primitive(x.into_primitive().tensor());
        }
        x.into_data().into_vec::<f32>().ok()
    }

    /// Elements per rayon task of the elementwise kernels.
    const CHUNK: usize = 1 << 14;

    const FRAC_1_SQRT_2: f64 = std::f64::consts::FRAC_1_SQRT_2;

    /// `Φ(x) = (1 + erf(x / √2)) / 2`, in f64 as ndarray's `erf` computes it.
    fn phi(x: f32) -> f64 {
        0.5 * (1.0 + libm::erf(f64::from(x) * FRAC_1_SQRT_2))
    }

    fn gelu_forward(x: &[f32]) -> Vec<f32> {
        let mut y = vec![0.0f32; x.len()];
        y.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(y, x)| {
                for (y, &x) in y.iter_mut().zip(x) {
                    *y = (f64::from(x) * phi(x)) as f32;
                }
            });
        y
    }

    /// `g · (Φ(x) + x φ(x))`, with `φ(x) = exp(-x²/2) / √(2π)`.
    fn gelu_backward(x: &[f32], g: &[f32]) -> Vec<f32> {
        const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;
        let mut dx = vec![0.0f32; x.len()];
        dx.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
            .for_each(|(dx, (x, g))| {
                for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
                    let xf = f64::from(x);
                    let density = (-0.5 * xf * xf).exp() * INV_SQRT_2PI;
                    *dx = (f64::from(g) * (phi(x) + xf * density)) as f32;
                }
            });
        dx
    }

    fn to_nd<const D: usize>(
        values: Vec<f32>,
        dims: [usize; D],
        device: &burn_ndarray::NdArrayDevice,
    ) -> Tensor<Nd, D> {
        Tensor::from_data(TensorData::new(values, dims), device)
    }

    /// The forward kernel on `NdArray<f32>`.
    pub(super) fn gelu_nd<B: Backend, const D: usize>(x: Tensor<B, D>) -> Option<Tensor<B, D>> {
        let x: Tensor<Nd, D> = cast(x)?;
        let (dims, device) = (x.dims(), x.device());
        let y = gelu_forward(&host(x)?);
        cast(to_nd(y, dims, &device))
    }

    /// How many keys row `row` of a `[.., rows, keys]` block sees.
    fn visible(row: usize, rows: usize, keys: usize, causal_from: Option<usize>) -> usize {
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
                let max = x[..n].iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0f32;
                for (y, &x) in y[..n].iter_mut().zip(&x[..n]) {
                    *y = (x - max).exp();
                    sum += *y;
                }
                let inv = sum.recip();
                for y in &mut y[..n] {
                    *y *= inv;
                }
            });
        y
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
                let dot: f32 = y[..n].iter().zip(&g[..n]).map(|(y, g)| y * g).sum();
                for ((dx, &y), &g) in dx[..n].iter_mut().zip(&y[..n]).zip(&g[..n]) {
                    *dx = y * (g - dot);
                }
            });
        dx
    }

    pub(super) fn softmax_nd<B: Backend>(
        x: Tensor<B, 4>,
        causal_from: Option<usize>,
    ) -> Option<Tensor<B, 4>> {
        let x: Tensor<Nd, 4> = cast(x)?;
        let (dims, device) = (x.dims(), x.device());
        let y = softmax_forward(&host(x)?, dims, causal_from);
        cast(to_nd(y, dims, &device))
    }

    /// The softmax's backward pass: from its saved output, `y ⊙ (g − Σ g y)` per row.
    #[derive(Debug)]
    struct SoftmaxGrad {
        y: Vec<f32>,
        dims: [usize; 4],
        causal_from: Option<usize>,
    }

    impl UnaryGrad for SoftmaxGrad {
        fn input_grad(&self, grad: &[f32]) -> Vec<f32> {
            softmax_backward(&self.y, grad, self.dims, self.causal_from)
        }
    }

    pub(super) fn softmax_autodiff<B: Backend>(
        x: Tensor<B, 4>,
        causal_from: Option<usize>,
    ) -> Option<Tensor<B, 4>> {
        let x: Tensor<Ad, 4> = cast(x)?;
        let dims = x.dims();
        let y = softmax_forward(&host(x.clone().inner())?, dims, causal_from);
        cast(record_unary(x, y, |y| {
            Box::new(SoftmaxGrad {
                y: y.to_vec(),
                dims,
                causal_from,
            })
        }))
    }

    /// The backward pass of a one-input kernel: the input's gradient (same shape) from the
    /// output's, given what the forward pass saved.
    trait UnaryGrad: std::fmt::Debug + Send + Sync + 'static {
        fn input_grad(&self, grad: &[f32]) -> Vec<f32>;
    }

    /// What a one-input node keeps for its backward pass.
    #[derive(Debug)]
    struct Saved {
        dims: Vec<usize>,
        grad: Box<dyn UnaryGrad>,
    }

    #[derive(Debug)]
    struct UnaryBackward;

    impl Backward<Nd, 1> for UnaryBackward {
        type State = Arc<Saved>;

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let grad = grads.consume::<Nd>(&ops.node);
            let [Some(parent)] = ops.parents else {
                return;
            };
            let dx = ops.state.grad.input_grad(&host_grad(grad));
            let t = Nd::float_from_data(
                TensorData::new(dx, ops.state.dims.clone()),
                &Default::default(),
            );
            grads.register::<Nd>(parent.id, t);
        }
    }

    /// Records a one-input kernel as one node of `x`'s graph, with output values `y` (`x`'s
    /// shape). `saved` runs only when `x` is tracked, and is given `y`.
    fn record_unary<const D: usize>(
        x: Tensor<Ad, D>,
        y: Vec<f32>,
        saved: impl FnOnce(&[f32]) -> Box<dyn UnaryGrad>,
    ) -> Tensor<Ad, D> {
        let (dims, device) = (x.dims(), x.device());
        let node = x.into_primitive().tensor().node;
        let out = match UnaryBackward
            .prepare::<NoCheckpointing>([node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let state = Arc::new(Saved {
                    dims: dims.to_vec(),
                    grad: saved(&y),
                });
                prep.finish(state, to_nd(y, dims, &device).into_primitive().tensor())
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(to_nd(y, dims, &device).into_primitive().tensor())
            }
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }

    /// The values of an `f32` ndarray primitive, row-major: one copy of the array's memory when
    /// it is contiguous.
    fn host_primitive(x: burn_ndarray::NdArrayTensor) -> Option<Vec<f32>> {
        match x {
            burn_ndarray::NdArrayTensor::F32(storage) => {
                let view = storage.view();
                Some(match view.as_slice() {
                    Some(values) => values.to_vec(),
                    None => view.iter().copied().collect(),
                })
            }
            _ => None,
        }
    }

    /// A gradient's values (the gradient of an `f32` output is `f32`).
    fn host_grad(grad: burn_ndarray::NdArrayTensor) -> Vec<f32> {
        host_primitive(grad).expect("the gradient of an f32 output is f32")
    }

    /// GELU's backward pass: from the saved input, `g · (Φ(x) + x φ(x))`.
    #[derive(Debug)]
    struct GeluGrad {
        x: Vec<f32>,
    }

    impl UnaryGrad for GeluGrad {
        fn input_grad(&self, grad: &[f32]) -> Vec<f32> {
            gelu_backward(&self.x, grad)
        }
    }

    /// The kernel on `Autodiff<NdArray<f32>>`: one node, whose backward recomputes `Φ` and `φ`
    /// from the saved input.
    pub(super) fn gelu_autodiff<B: Backend, const D: usize>(
        x: Tensor<B, D>,
    ) -> Option<Tensor<B, D>> {
        let x: Tensor<Ad, D> = cast(x)?;
        let x_host = host(x.clone().inner())?;
        let y = gelu_forward(&x_host);
        cast(record_unary(x, y, move |_| {
            Box::new(GeluGrad { x: x_host })
        }))
    }
}

#[cfg(all(test, feature = "ndarray"))]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::Distribution;

    fn max_diff<const D: usize>(a: Tensor<NdArray<f32>, D>, b: Tensor<NdArray<f32>, D>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    #[test]
    fn fused_gelu_is_the_tensor_path_in_values() {
        let device = Default::default();
        // Large enough for several rayon chunks, and a ragged last one; values far into both
        // tails.
        let x = Tensor::<NdArray<f32>, 3>::random(
            [3, 70, 333],
            Distribution::Normal(0.0, 4.0),
            &device,
        );
        assert!(applies::<NdArray<f32>>());
        let d = max_diff(gelu(x.clone()), crate::util::gelu_exact(x.clone()));
        assert!(d <= 1e-6, "fused GELU differs by {d}");
        // A transposed (non-contiguous) input reads in logical order.
        let t = x.swap_dims(1, 2);
        let d = max_diff(gelu(t.clone()), crate::util::gelu_exact(t));
        assert!(d <= 1e-6, "fused GELU on a transposed input differs by {d}");
    }

    #[test]
    fn fused_gelu_is_the_tensor_path_in_gradients() {
        type A = Autodiff<NdArray<f32>>;
        assert!(applies_autodiff::<A>() && !applies::<A>());
        let device = Default::default();
        let base =
            Tensor::<NdArray<f32>, 2>::random([129, 257], Distribution::Normal(0.0, 3.0), &device);
        let w = Tensor::<A, 2>::random([129, 257], Distribution::Default, &device);
        let run = |fused: bool| {
            let x = Tensor::<A, 2>::from_inner(base.clone()).require_grad();
            // Two uses of the output, so that the node's gradient is a sum.
            let y = if fused {
                gelu(x.clone())
            } else {
                crate::util::gelu_exact(x.clone())
            };
            let loss = (y.clone() * w.clone()).sum() + (y.clone() * y.clone()).sum();
            let grads = loss.backward();
            (y.inner(), x.grad(&grads).unwrap())
        };
        let (y1, g1) = run(true);
        let (y2, g2) = run(false);
        assert!(max_diff(y1, y2) <= 1e-6);
        let scale = g2.clone().abs().max().into_scalar().max(1.0);
        let d = max_diff(g1, g2);
        assert!(
            d <= 2e-6 * scale,
            "fused GELU gradient differs by {d} (scale {scale})"
        );
    }

    /// The tensor path of [`fused_softmax`]: `mask_fill(-inf)` at future keys, then softmax.
    fn softmax_reference<B: Backend>(x: Tensor<B, 4>, causal_from: Option<usize>) -> Tensor<B, 4> {
        let [b, h, rows, keys] = x.dims();
        let x = match causal_from {
            Some(q0) => {
                let i = Tensor::<B, 1, Int>::arange(q0 as i64..(q0 + rows) as i64, &x.device())
                    .reshape([rows, 1])
                    .expand([rows, keys]);
                let j = Tensor::<B, 1, Int>::arange(0..keys as i64, &x.device())
                    .reshape([1, keys])
                    .expand([rows, keys]);
                let future = j.greater(i).unsqueeze::<4>().expand([b, h, rows, keys]);
                x.mask_fill(future, f32::NEG_INFINITY)
            }
            None => x,
        };
        burn::tensor::activation::softmax(x, 3)
    }

    /// Full causal, a chunk (rows 5.. of 13 keys), a decode step (one row), an extra key past
    /// the last row (DAPE V2's lookahead column) and non-causal.
    const SPANS: &[([usize; 4], Option<usize>)] = &[
        ([2, 3, 13, 13], Some(0)),
        ([2, 3, 4, 9], Some(5)),
        ([1, 2, 1, 17], Some(16)),
        ([2, 2, 6, 7], Some(0)),
        ([2, 3, 5, 11], None),
    ];

    #[test]
    fn fused_softmax_is_the_tensor_path_in_values() {
        let device = Default::default();
        for &(dims, causal_from) in SPANS {
            let x =
                Tensor::<NdArray<f32>, 4>::random(dims, Distribution::Normal(0.0, 3.0), &device);
            let fused = fused_softmax(x.clone(), causal_from).expect("the kernel applies");
            let d = max_diff(fused, softmax_reference(x, causal_from));
            assert!(
                d <= 1e-6,
                "{dims:?} {causal_from:?}: fused softmax differs by {d}"
            );
        }
    }

    /// The gradient of `Σ p·w + Σ p²` with respect to the logits, `p = softmax` over each row's
    /// visible keys, computed in f64 on the host from the formula `y ⊙ (G − Σ G y)`.
    fn softmax_grad_f64(
        x: &[f32],
        w: &[f32],
        [_, _, rows, keys]: [usize; 4],
        causal_from: Option<usize>,
    ) -> Vec<f64> {
        let mut grad = vec![0.0; x.len()];
        for row in 0..x.len() / keys {
            let n = match causal_from {
                Some(q0) => (q0 + row % rows + 1).min(keys),
                None => keys,
            };
            let (x, w) = (
                &x[row * keys..row * keys + n],
                &w[row * keys..row * keys + n],
            );
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let e: Vec<f64> = x.iter().map(|&v| (f64::from(v) - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            let y: Vec<f64> = e.iter().map(|v| v / sum).collect();
            let g: Vec<f64> = (0..n).map(|j| f64::from(w[j]) + 2.0 * y[j]).collect();
            let dot: f64 = (0..n).map(|j| g[j] * y[j]).sum();
            for j in 0..n {
                grad[row * keys + j] = y[j] * (g[j] - dot);
            }
        }
        grad
    }

    #[test]
    fn fused_softmax_gradient_is_the_formula_and_the_tensor_path() {
        type A = Autodiff<NdArray<f32>>;
        let device = Default::default();
        for &(dims, causal_from) in SPANS {
            let base =
                Tensor::<NdArray<f32>, 4>::random(dims, Distribution::Normal(0.0, 3.0), &device);
            let w = Tensor::<NdArray<f32>, 4>::random(dims, Distribution::Default, &device);
            let run = |fused: bool| {
                let x = Tensor::<A, 4>::from_inner(base.clone()).require_grad();
                let p = if fused {
                    fused_softmax(x.clone(), causal_from).expect("the kernel applies")
                } else {
                    softmax_reference(x.clone(), causal_from)
                };
                // Two uses of the output, so that the node's incoming gradient is a sum.
                let loss =
                    (p.clone() * Tensor::from_inner(w.clone())).sum() + (p.clone() * p).sum();
                let grads = loss.backward();
                x.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap()
            };
            let exact = softmax_grad_f64(
                &base.clone().into_data().to_vec::<f32>().unwrap(),
                &w.clone().into_data().to_vec::<f32>().unwrap(),
                dims,
                causal_from,
            );
            let err = |g: &[f32]| {
                g.iter()
                    .zip(&exact)
                    .map(|(a, b)| (f64::from(*a) - b).abs())
                    .fold(0.0, f64::max)
            };
            let (fused, tensor) = (err(&run(true)), err(&run(false)));
            // Burn's composite backward (max, exp, sum, div) rounds more: up to ~1e-4 here.
            assert!(
                fused <= 2e-6,
                "{dims:?} {causal_from:?}: fused softmax gradient off by {fused:e}"
            );
            assert!(
                tensor <= 1e-3,
                "{dims:?} {causal_from:?}: tensor path off by {tensor:e}"
            );
        }
    }

    #[test]
    fn fused_softmax_hands_other_backends_back() {
        // Another backend type gets its input back, for the caller's tensor path.
        let device = Default::default();
        let x = Tensor::<NdArray<f64>, 4>::zeros([1, 1, 2, 2], &device);
        assert!(fused_softmax(x, Some(0)).is_err());
    }

    #[test]
    fn fused_gelu_leaves_untracked_inputs_untracked() {
        type A = Autodiff<NdArray<f32>>;
        let device = Default::default();
        let x = Tensor::<A, 1>::from_floats([-1.0, 0.0, 2.0], &device);
        let y = gelu(x);
        assert!(!y.is_require_grad());
        let expected = [-0.158_655_26f32, 0.0, 1.954_499_7];
        for (got, want) in y.into_data().to_vec::<f32>().unwrap().iter().zip(expected) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
    }
}
