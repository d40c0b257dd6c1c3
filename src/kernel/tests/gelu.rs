//! The fused GELU against the tensor path.

use super::*;

#[test]
fn fused_gelu_is_the_tensor_path_in_values() {
    let device = Default::default();
    // Large enough for several rayon chunks, and a ragged last one; values far into both
    // tails.
    let x =
        Tensor::<NdArray<f32>, 3>::random([3, 70, 333], Distribution::Normal(0.0, 4.0), &device);
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
    let _graphs = crate::util::autodiff_test_lock();
    type A = Autodiff<NdArray<f32>>;
    assert!(applies_autodiff::<A>() && !applies::<A>());
    let device = Default::default();
    let base =
        Tensor::<NdArray<f32>, 2>::random([129, 257], Distribution::Normal(0.0, 3.0), &device);
    let w = Tensor::<A, 2>::random([129, 257], Distribution::Default, &device);
    // On a leaf, and on an intermediate tensor (tracked, though `is_require_grad` says no:
    // the model's case, GELU after a linear layer).
    for intermediate in [false, true] {
        let run = |fused: bool| {
            let x = Tensor::<A, 2>::from_inner(base.clone()).require_grad();
            let input = if intermediate {
                x.clone() * 1.5 - 0.25
            } else {
                x.clone()
            };
            // Two uses of the output, so that the node's gradient is a sum.
            let y = if fused {
                gelu(input)
            } else {
                crate::util::gelu_exact(input)
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
            "fused GELU gradient (intermediate input: {intermediate}) differs by {d} (scale {scale})"
        );
    }
}

#[test]
fn fused_gelu_leaves_untracked_inputs_untracked() {
    let _graphs = crate::util::autodiff_test_lock();
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
