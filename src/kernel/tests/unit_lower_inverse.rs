//! [`unit_lower_inverse`] against the tensor path's block doubling.

use super::*;

/// The forward-substitution node equals block doubling in Burn's ops, in values (with and
/// without autodiff) and in the gradient of `L`, which is 0 on and above the diagonal; and
/// `(I + L)·T = I`.
#[test]
fn unit_lower_inverse_is_block_doubling_in_values_and_gradients() {
    let _graphs = crate::util::autodiff_test_lock();
    type A = Autodiff<NdArray<f32>>;
    let device = Default::default();
    for c in [1, 2, 8, 32] {
        // Entries of the size PaTH's β·(w_i·w_j) takes, in (−2, 2), on every entry (the
        // kernel must read the strictly lower ones only).
        let full = Tensor::<A, 4>::random([2, 3, c, c], Distribution::Uniform(-0.9, 0.9), &device);
        let leaf = full.require_grad();
        let fused = unit_lower_inverse(leaf.clone());
        let strict = Tensor::<A, 2>::ones([c, c], &device)
            .tril(-1)
            .unsqueeze::<4>();
        let tensor = unit_lower_inverse_tensor(leaf.clone() * strict.clone());
        let d = max_diff(fused.clone().inner(), tensor.clone().inner());
        assert!(d < 1e-4, "C = {c}: values differ by {d}");
        let eye = Tensor::<NdArray<f32>, 2>::eye(c, &device).unsqueeze::<4>();
        let lower = leaf.clone().inner() * strict.clone().inner();
        let product = (eye.clone() + lower).matmul(fused.clone().inner());
        let d = max_diff(product, eye.expand([2, 3, c, c]));
        assert!(d < 1e-4, "C = {c}: (I + L)·T differs from I by {d}");
        let weights = Tensor::<A, 4>::random([2, 3, c, c], Distribution::Normal(0.0, 1.0), &device);
        let g1 = (fused * weights.clone()).sum().backward();
        let g2 = (tensor * weights).sum().backward();
        // (At C = 1 the tensor path never reads L: no gradient, i.e. 0.)
        let zero = || Tensor::zeros([2, 3, c, c], &device);
        let d1 = leaf.grad(&g1).unwrap_or_else(zero);
        let d2 = leaf.grad(&g2).unwrap_or_else(zero);
        let scale = d2.clone().abs().max().into_scalar().max(1.0);
        let d = max_diff(d1.clone(), d2) / scale;
        assert!(d < 1e-4, "C = {c}: gradients differ by {d} (relative)");
        let upper = d1 * (strict.inner().neg() + 1.0);
        assert_eq!(
            upper.abs().max().into_scalar(),
            0.0,
            "C = {c}: gradient above the strict lower part"
        );
        let d = max_diff(
            unit_lower_inverse(leaf.clone().inner()),
            unit_lower_inverse_tensor(
                leaf.inner()
                    * Tensor::<NdArray<f32>, 2>::ones([c, c], &device)
                        .tril(-1)
                        .unsqueeze::<4>(),
            ),
        );
        assert!(d < 1e-4, "C = {c}: without autodiff, values differ by {d}");
    }
}
