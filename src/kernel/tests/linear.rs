//! The fused linear layer against the tensor path and its formula.

use super::*;

/// The fused linear layer against Burn's own op (the tensor path) on `Autodiff<NdArray>`:
/// values, and the gradients of the input, the weight and the bias, for a row-major input
/// and weight, a transposed input (read through its strides), a transposed weight, 2-d and
/// 4-d inputs, and no bias.
#[test]
fn fused_linear_is_the_tensor_path_in_values_and_gradients() {
    let _graphs = crate::util::autodiff_test_lock();
    type A = Autodiff<NdArray<f32>>;
    let device = Default::default();
    let normal = Distribution::Normal(0.0, 1.0);
    for (case, transposed_x, transposed_w, with_bias) in [
        ("row-major", false, false, true),
        ("transposed input", true, false, true),
        ("transposed weight", false, true, true),
        ("no bias", false, false, false),
    ] {
        let (d_in, d_out) = (7, 5);
        // The leaves whose gradients are compared; each path builds its own operands from
        // them (a backward pass frees the graph it ran through), and a transposed view
        // reads the same values through other strides.
        let x_leaf = if transposed_x {
            Tensor::<A, 3>::random([3, d_in, 9], normal, &device).require_grad()
        } else {
            Tensor::<A, 3>::random([3, 9, d_in], normal, &device).require_grad()
        };
        let w_leaf = if transposed_w {
            Tensor::<A, 2>::random([d_out, d_in], normal, &device).require_grad()
        } else {
            Tensor::<A, 2>::random([d_in, d_out], normal, &device).require_grad()
        };
        let x = || match transposed_x {
            true => x_leaf.clone().swap_dims(1, 2),
            false => x_leaf.clone(),
        };
        let w = || match transposed_w {
            true => w_leaf.clone().transpose(),
            false => w_leaf.clone(),
        };
        let b = with_bias.then(|| Tensor::<A, 1>::random([d_out], normal, &device).require_grad());
        let fused = linear(x(), w(), b.clone());
        let tensor = linear_tensor(x(), w(), b.clone());
        let d = max_diff(fused.clone().inner(), tensor.clone().inner());
        assert!(d < 1e-5, "{case}: values differ by {d}");
        // A weighted sum, so that every output element has its own gradient.
        let weights = Tensor::<A, 3>::random([3, 9, d_out], normal, &device);
        let g1 = (fused * weights.clone()).sum().backward();
        let g2 = (tensor * weights).sum().backward();
        let dx = max_diff(x_leaf.grad(&g1).unwrap(), x_leaf.grad(&g2).unwrap());
        let dw = max_diff(w_leaf.grad(&g1).unwrap(), w_leaf.grad(&g2).unwrap());
        assert!(
            dx < 1e-5 && dw < 1e-5,
            "{case}: gradients differ by {dx}, {dw}"
        );
        if let Some(b) = &b {
            let db = max_diff(b.grad(&g1).unwrap(), b.grad(&g2).unwrap());
            assert!(db < 1e-5, "{case}: bias gradients differ by {db}");
        }
    }
    // Two and four dimensions, without autodiff too.
    let w = Tensor::<NdArray<f32>, 2>::random([4, 6], normal, &device);
    let b = Tensor::<NdArray<f32>, 1>::random([6], normal, &device);
    let x2 = Tensor::<NdArray<f32>, 2>::random([130, 4], normal, &device);
    let d = max_diff(
        linear(x2.clone(), w.clone(), Some(b.clone())),
        linear_tensor(x2, w.clone(), Some(b.clone())),
    );
    assert!(d < 1e-5, "2-d: {d}");
    let x4 = Tensor::<NdArray<f32>, 4>::random([2, 3, 5, 4], normal, &device);
    let d = max_diff(
        linear(x4.clone(), w.clone(), Some(b.clone())),
        linear_tensor(x4, w, Some(b)),
    );
    assert!(d < 1e-5, "4-d: {d}");
}

/// The fused linear layer's values are the formula, computed in f64.
#[test]
fn fused_linear_is_the_formula() {
    let device = Default::default();
    let xs: Vec<f32> = (0..12).map(|i| (i as f32 * 0.37).sin()).collect();
    let ws: Vec<f32> = (0..8).map(|i| (i as f32 * 0.91).cos()).collect();
    let bs = [0.5f32, -0.25];
    let x = Tensor::<NdArray<f32>, 2>::from_data(TensorData::new(xs.clone(), [3, 4]), &device);
    let w = Tensor::<NdArray<f32>, 2>::from_data(TensorData::new(ws.clone(), [4, 2]), &device);
    let b = Tensor::<NdArray<f32>, 1>::from_data(TensorData::new(bs.to_vec(), [2]), &device);
    let y = linear(x, w, Some(b)).into_data().into_vec::<f32>().unwrap();
    for r in 0..3 {
        for c in 0..2 {
            let want = f64::from(bs[c])
                + (0..4)
                    .map(|i| f64::from(xs[r * 4 + i]) * f64::from(ws[i * 2 + c]))
                    .sum::<f64>();
            let got = f64::from(y[r * 2 + c]);
            assert!(
                (got - want).abs() < 1e-6,
                "row {r} col {c}: {got} vs {want}"
            );
        }
    }
}
