//! The fused causal softmax against the tensor path and its gradient formula.

use super::*;

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
        let x = Tensor::<NdArray<f32>, 4>::random(dims, Distribution::Normal(0.0, 3.0), &device);
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
    let _graphs = crate::util::autodiff_test_lock();
    type A = Autodiff<NdArray<f32>>;
    let device = Default::default();
    for &(dims, causal_from) in SPANS {
        let base = Tensor::<NdArray<f32>, 4>::random(dims, Distribution::Normal(0.0, 3.0), &device);
        let w = Tensor::<NdArray<f32>, 4>::random(dims, Distribution::Default, &device);
        let run = |fused: bool| {
            let x = Tensor::<A, 4>::from_inner(base.clone()).require_grad();
            let p = if fused {
                fused_softmax(x.clone(), causal_from).expect("the kernel applies")
            } else {
                softmax_reference(x.clone(), causal_from)
            };
            // Two uses of the output, so that the node's incoming gradient is a sum.
            let loss = (p.clone() * Tensor::from_inner(w.clone())).sum() + (p.clone() * p).sum();
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
