//! [`batched_matmul`] against Burn's `matmul`.

use super::*;

/// The batched matrix product node equals Burn's `matmul` in values and in both gradients
/// (row-major operands, a transposed right operand as `q · kᵀ` has, a transposed left
/// one), without autodiff too; gives zeros for an empty inner dimension; and hands shapes it
/// does not take (broadcast leading dimensions) to Burn's `matmul`.
#[test]
fn batched_matmul_is_burns_matmul_in_values_and_gradients() {
    let _graphs = crate::util::autodiff_test_lock();
    type A = Autodiff<NdArray<f32>>;
    let device = Default::default();
    let normal = Distribution::Normal(0.0, 1.0);
    for (case, ta, tb, k) in [
        ("row-major", false, false, 4),
        ("transposed right operand", false, true, 4),
        ("transposed left operand", true, false, 3),
    ] {
        let (m, n) = (5, 6);
        let a_leaf = match ta {
            true => Tensor::<A, 4>::random([2, 3, k, m], normal, &device),
            false => Tensor::<A, 4>::random([2, 3, m, k], normal, &device),
        }
        .require_grad();
        let b_leaf = match tb {
            true => Tensor::<A, 4>::random([2, 3, n, k], normal, &device),
            false => Tensor::<A, 4>::random([2, 3, k, n], normal, &device),
        }
        .require_grad();
        let a = || {
            if ta {
                a_leaf.clone().swap_dims(2, 3)
            } else {
                a_leaf.clone()
            }
        };
        let b = || {
            if tb {
                b_leaf.clone().swap_dims(2, 3)
            } else {
                b_leaf.clone()
            }
        };
        let fused = batched_matmul(a(), b());
        let burn = a().matmul(b());
        let d = max_diff(fused.clone().inner(), burn.clone().inner());
        assert!(d < 1e-5, "{case}: values differ by {d}");
        let weights = Tensor::<A, 4>::random([2, 3, m, n], normal, &device);
        let g1 = (fused * weights.clone()).sum().backward();
        let g2 = (burn * weights).sum().backward();
        let da = max_diff(a_leaf.grad(&g1).unwrap(), a_leaf.grad(&g2).unwrap());
        let db = max_diff(b_leaf.grad(&g1).unwrap(), b_leaf.grad(&g2).unwrap());
        assert!(
            da < 1e-5 && db < 1e-5,
            "{case}: gradients differ by {da}, {db}"
        );
        let d = max_diff(
            batched_matmul(a().inner(), b().inner()),
            a().inner().matmul(b().inner()),
        );
        assert!(d < 1e-5, "{case}, no autodiff: values differ by {d}");
    }
    // An empty inner dimension: zeros (Burn 0.21's ndarray matmul divides by zero there).
    let a = Tensor::<A, 4>::zeros([2, 3, 5, 0], &device).require_grad();
    let b = Tensor::<A, 4>::zeros([2, 3, 0, 6], &device).require_grad();
    let y = batched_matmul(a.clone(), b.clone());
    assert_eq!(y.dims(), [2, 3, 5, 6]);
    assert_eq!(y.clone().inner().abs().max().into_scalar(), 0.0);
    let g = y.sum().backward();
    assert_eq!(a.grad(&g).map(|t| t.dims()), Some([2, 3, 5, 0]));
    // Broadcast leading dimensions: Burn's matmul.
    let a = Tensor::<NdArray<f32>, 4>::random([1, 3, 5, 4], normal, &device);
    let b = Tensor::<NdArray<f32>, 4>::random([2, 3, 4, 6], normal, &device);
    let d = max_diff(batched_matmul(a.clone(), b.clone()), a.matmul(b));
    assert_eq!(d, 0.0, "broadcast shapes go to Burn's matmul");
}
