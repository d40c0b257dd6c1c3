//! The fused layer norm against the tensor path and its formula.

use super::*;

/// The fused layer norm against `B::layer_norm` (the tensor path) on `Autodiff<NdArray>`:
/// values against the f32 tensor path, and the gradients of the input, gamma and beta
/// against the tensor path run in f64 (Burn's f32 ndarray layer norm is itself off by up to
/// ~2e-4 of the gradient's scale on an AVX2 machine, where the fused path is within 2e-7),
/// for a row-major input, a transposed one (copied to row-major by the kernel), no beta,
/// rows that do not fill a rayon task, a width that is not a multiple of the sixteen
/// running sums, and 2-d and 4-d inputs without autodiff.
#[test]
fn fused_layer_norm_is_the_tensor_path_in_values_and_gradients() {
    let _graphs = crate::util::autodiff_test_lock();
    type A = Autodiff<NdArray<f32>>;
    type A64 = Autodiff<NdArray<f64>>;
    let device = Default::default();
    let normal = Distribution::Normal(0.5, 2.0);
    // Inputs from a generator of the test's own: the backend's random source is shared by
    // the tests running beside this one, so seeding it would not fix the values.
    let mut rng = crate::util::Rng::new(11);
    let mut seeded = |dims: [usize; 3]| {
        let n = dims.iter().product::<usize>();
        (0..n)
            .map(|_| (rng.below(1 << 20) as f32 / (1 << 20) as f32) * 8.0 - 3.5)
            .collect::<Vec<f32>>()
    };
    let seeded_1d = |n: usize, rng: &mut crate::util::Rng| {
        (0..n)
            .map(|_| (rng.below(1 << 20) as f32 / (1 << 20) as f32) * 4.0 - 1.5)
            .collect::<Vec<f32>>()
    };
    // A tracked leaf of `values` in element type `$e` (f32 or f64, named: `from_data`
    // would take the device's default f32 otherwise).
    macro_rules! leaf {
        ($e:ty, $values:expr, $dims:expr) => {
            Tensor::<Autodiff<NdArray<$e>>, _>::from_data(
                TensorData::new($values.to_vec(), $dims).convert::<$e>(),
                (&Default::default(), <$e as burn::tensor::Element>::dtype()),
            )
            .require_grad()
        };
    }
    let to_f32 = |t: Tensor<NdArray<f64>, 3>| {
        Tensor::<NdArray<f32>, 3>::from_data(t.into_data().convert::<f32>(), &device)
    };
    let to_f32_1d = |t: Tensor<NdArray<f64>, 1>| {
        Tensor::<NdArray<f32>, 1>::from_data(t.into_data().convert::<f32>(), &device)
    };
    for (case, transposed, with_beta, d) in [
        ("row-major", false, true, 40),
        ("transposed input", true, true, 19),
        ("no beta", false, false, 33),
        ("narrow rows", false, true, 3),
    ] {
        let x_dims = if transposed { [3, d, 45] } else { [3, 45, d] };
        let x_values = seeded(x_dims);
        let mut local = crate::util::Rng::new(d as u64);
        let gamma_values = seeded_1d(d, &mut local);
        let beta_values = with_beta.then(|| seeded_1d(d, &mut local));
        let weights = seeded([3, 45, d]);
        let x_leaf = leaf!(f32, &x_values, x_dims);
        let x = match transposed {
            true => x_leaf.clone().swap_dims(1, 2),
            false => x_leaf.clone(),
        };
        let gamma = leaf!(f32, &gamma_values, [d]);
        let beta = beta_values.as_ref().map(|b| leaf!(f32, b, [d]));
        let fused = layer_norm(x.clone(), gamma.clone(), beta.clone(), 1e-5);
        let tensor = layer_norm_tensor(x, gamma.clone(), beta.clone(), 1e-5);
        let dv = max_diff(fused.clone().inner(), tensor.inner());
        assert!(dv < 1e-4, "{case}: values differ by {dv}");
        let w = Tensor::<A, 3>::from_data(TensorData::new(weights.clone(), [3, 45, d]), &device);
        let grads = (fused * w).sum().backward();
        // The tensor path in f64.
        let x64_leaf = leaf!(f64, &x_values, x_dims);
        let x64 = match transposed {
            true => x64_leaf.clone().swap_dims(1, 2),
            false => x64_leaf.clone(),
        };
        let gamma64 = leaf!(f64, &gamma_values, [d]);
        let beta64 = beta_values.as_ref().map(|b| leaf!(f64, b, [d]));
        let w64: Tensor<A64, 3> = leaf!(f64, &weights, [3, 45, d]).detach();
        let grads64 = (layer_norm_tensor(x64, gamma64.clone(), beta64.clone(), 1e-5) * w64)
            .sum()
            .backward();
        // Relative to the gradient's scale: a row of three features can have a small
        // variance, and then a large `1 / σ` in its gradient.
        let rel = |a: Tensor<NdArray<f32>, 3>, b: Tensor<NdArray<f32>, 3>| {
            let scale = 1.0 + b.clone().abs().max().into_scalar();
            max_diff(a, b) / scale
        };
        let dx = rel(
            x_leaf.grad(&grads).unwrap(),
            to_f32(x64_leaf.grad(&grads64).unwrap()),
        );
        let dg = max_diff(
            gamma.grad(&grads).unwrap(),
            to_f32_1d(gamma64.grad(&grads64).unwrap()),
        );
        assert!(
            dx < 1e-5 && dg < 1e-4,
            "{case}: gradients differ from the f64 tensor path by {dx} (relative), {dg}"
        );
        if let (Some(b), Some(b64)) = (&beta, &beta64) {
            let db = max_diff(
                b.grad(&grads).unwrap(),
                to_f32_1d(b64.grad(&grads64).unwrap()),
            );
            assert!(db < 1e-4, "{case}: beta gradients differ by {db}");
        }
    }
    let gamma = Tensor::<NdArray<f32>, 1>::random([6], normal, &device);
    let beta = Tensor::<NdArray<f32>, 1>::random([6], normal, &device);
    let x2 = Tensor::<NdArray<f32>, 2>::random([70, 6], normal, &device);
    let d = max_diff(
        layer_norm(x2.clone(), gamma.clone(), Some(beta.clone()), 1e-5),
        layer_norm_tensor(x2, gamma.clone(), Some(beta.clone()), 1e-5),
    );
    assert!(d < 1e-4, "2-d: {d}");
    let x4 = Tensor::<NdArray<f32>, 4>::random([2, 3, 5, 6], normal, &device);
    let d = max_diff(
        layer_norm(x4.clone(), gamma.clone(), Some(beta.clone()), 1e-5),
        layer_norm_tensor(x4, gamma, Some(beta), 1e-5),
    );
    assert!(d < 1e-4, "4-d: {d}");
}

/// The fused layer norm is the formula, computed in f64, in values and in the input's
/// gradient (`dx = rstd · (ĝ − mean ĝ − x̂ · mean(ĝ x̂))`, `ĝ = g γ`), with a large mean
/// that a one-pass variance would lose.
#[test]
fn fused_layer_norm_is_the_formula() {
    let _graphs = crate::util::autodiff_test_lock();
    type A = Autodiff<NdArray<f32>>;
    let device = Default::default();
    let (rows, d) = (3, 21);
    let xs: Vec<f32> = (0..rows * d)
        .map(|i| 100.0 + (i as f32 * 0.37).sin())
        .collect();
    let gs: Vec<f32> = (0..d).map(|i| 1.0 + (i as f32 * 0.91).cos()).collect();
    let bs: Vec<f32> = (0..d).map(|i| (i as f32 * 0.5).sin()).collect();
    let ws: Vec<f32> = (0..rows * d).map(|i| (i as f32 * 1.3).cos()).collect();
    let eps = 1e-5;
    let x =
        Tensor::<A, 2>::from_data(TensorData::new(xs.clone(), [rows, d]), &device).require_grad();
    let gamma = Tensor::<A, 1>::from_data(TensorData::new(gs.clone(), [d]), &device);
    let beta = Tensor::<A, 1>::from_data(TensorData::new(bs.clone(), [d]), &device);
    let weights = Tensor::<A, 2>::from_data(TensorData::new(ws.clone(), [rows, d]), &device);
    let y = layer_norm(x.clone(), gamma, Some(beta), eps);
    let grads = (y.clone() * weights).sum().backward();
    let y = y.into_data().into_vec::<f32>().unwrap();
    let dx = x
        .grad(&grads)
        .unwrap()
        .into_data()
        .into_vec::<f32>()
        .unwrap();
    for r in 0..rows {
        let row: Vec<f64> = xs[r * d..(r + 1) * d]
            .iter()
            .map(|&v| f64::from(v))
            .collect();
        let mean = row.iter().sum::<f64>() / d as f64;
        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d as f64;
        let rstd = 1.0 / (var + eps).sqrt();
        let xhat: Vec<f64> = row.iter().map(|v| (v - mean) * rstd).collect();
        let gh: Vec<f64> = (0..d)
            .map(|c| f64::from(ws[r * d + c]) * f64::from(gs[c]))
            .collect();
        let a = gh.iter().sum::<f64>() / d as f64;
        let b = gh.iter().zip(&xhat).map(|(g, x)| g * x).sum::<f64>() / d as f64;
        for c in 0..d {
            let want = xhat[c] * f64::from(gs[c]) + f64::from(bs[c]);
            let got = f64::from(y[r * d + c]);
            assert!((got - want).abs() < 1e-3, "y[{r}, {c}]: {got} vs {want}");
            let want = rstd * (gh[c] - a - xhat[c] * b);
            let got = f64::from(dx[r * d + c]);
            assert!((got - want).abs() < 1e-3, "dx[{r}, {c}]: {got} vs {want}");
        }
    }
}
