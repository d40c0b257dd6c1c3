//! The inverse `T = (I + L)⁻¹` of a batch of unit lower-triangular matrices, `L: [g, n, C, C]`
//! strictly lower (PaTH's UT transform, [`crate::encoding::householder`]): forward
//! substitution in one graph node on ndarray, block doubling in Burn's ops elsewhere.

use burn::prelude::*;

/// `(I + L)⁻¹` for `lower: [g, n, C, C]` whose entries strictly below the diagonal are `L`'s
/// (the others are not read; their gradient is 0). `C` a power of two.
pub fn unit_lower_inverse<B: Backend>(lower: Tensor<B, 4>) -> Tensor<B, 4> {
    #[cfg(feature = "ndarray")]
    {
        use super::ndarray::{applies, applies_autodiff};
        if lower.dtype() == burn::tensor::DType::F32 {
            let fused = if applies::<B>() {
                super::ndarray::unit_lower_inverse_nd(lower.clone())
            } else if applies_autodiff::<B>() {
                super::ndarray::unit_lower_inverse_autodiff(lower.clone())
            } else {
                None
            };
            if let Some(t) = fused {
                return t;
            }
        }
    }
    unit_lower_inverse_tensor(lower)
}

/// [`unit_lower_inverse`] on the tensor path, by block doubling: the inverses of the diagonal
/// blocks of size `m` give those of size `2m` as `[[A⁻¹, 0], [−D⁻¹ B A⁻¹, D⁻¹]]`, `log₂ C`
/// batched steps. `C` must be a power of two.
pub fn unit_lower_inverse_tensor<B: Backend>(lower: Tensor<B, 4>) -> Tensor<B, 4> {
    let [g, n, c, _] = lower.dims();
    let device = lower.device();
    // The inverses of the diagonal blocks of size m, as [g·n·(C/m), m, m].
    let mut inv = Tensor::<B, 3>::ones([g * n * c, 1, 1], &device);
    let mut m = 1;
    while m < c {
        let pairs = c / (2 * m);
        let inv4: Tensor<B, 4> = inv.reshape([g * n * pairs, 2, m, m]);
        let a_inv = inv4.clone().narrow(1, 0, 1).squeeze_dim::<3>(1);
        let d_inv = inv4.narrow(1, 1, 1).squeeze_dim::<3>(1);
        // The lower-left m × m block of each diagonal 2m × 2m block of L.
        let coupling = diagonal_blocks(lower.clone(), 2 * m)
            .narrow(1, m, m)
            .narrow(2, 0, m);
        let low = d_inv.clone().matmul(coupling).matmul(a_inv.clone()).neg();
        let top = Tensor::cat(
            vec![a_inv, Tensor::zeros([g * n * pairs, m, m], &device)],
            2,
        );
        let bottom = Tensor::cat(vec![low, d_inv], 2);
        inv = Tensor::cat(vec![top, bottom], 1);
        m *= 2;
    }
    inv.reshape([g, n, c, c])
}

/// The diagonal blocks of size `s` of `x: [g, n, C, C]`, as `[g·n·(C/s), s, s]`.
fn diagonal_blocks<B: Backend>(x: Tensor<B, 4>, s: usize) -> Tensor<B, 3> {
    let [g, n, c, _] = x.dims();
    let k = c / s;
    if k == 1 {
        return x.reshape([g * n, c, c]);
    }
    let device = x.device();
    // Row block r of x, its column blocks side by side: [g·n·k, s, k, s]; keep column block r.
    let blocks: Tensor<B, 4> = x.reshape([g * n * k, s, k, s]);
    let eye = Tensor::<B, 2>::eye(k, &device)
        .reshape([1, k, 1, k, 1])
        .expand([g * n, k, 1, k, 1])
        .reshape([g * n * k, 1, k, 1]);
    (blocks * eye).sum_dim(2).reshape([g * n * k, s, s])
}
