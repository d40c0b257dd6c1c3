//! Each ndarray kernel against the tensor path (Burn's own ops), in values and in every
//! gradient, and against its formula; one file per op family.

mod attention;
mod distance_table;
mod gelu;
mod layer_norm;
mod linear;
mod matmul;
mod simd;
mod softmax;
mod stick_breaking;
mod token_nll;
mod unit_lower_inverse;

use burn::backend::{Autodiff, NdArray};
use burn::prelude::*;
use burn::tensor::{DType, Distribution};

use super::*;

fn max_diff<const D: usize>(a: Tensor<NdArray<f32>, D>, b: Tensor<NdArray<f32>, D>) -> f32 {
    (a - b).abs().max().into_scalar()
}

/// A copy of `t` in f64 on `Autodiff<NdArray<f64>>`, tracked. The dtype is named: without
/// it `from_data` takes the device's default float dtype, f32.
fn tracked_f64(t: &Tensor<Autodiff<NdArray<f32>>, 4>) -> Tensor<Autodiff<NdArray<f64>>, 4> {
    let data = t.to_data().convert::<f64>();
    Tensor::from_data(data, (&Default::default(), DType::F64)).require_grad()
}

/// Asserts that `ours` is within 2e-6 of the f64 reference `want`, relative to its largest
/// entry (at least 1).
fn assert_near_f64(
    ours: Tensor<NdArray<f32>, 4>,
    want: Tensor<NdArray<f64>, 4>,
    case: &str,
    what: &str,
) {
    let want =
        Tensor::<NdArray<f32>, 4>::from_data(want.into_data().convert::<f32>(), &ours.device());
    let scale = want.clone().abs().max().into_scalar().max(1.0);
    let d = max_diff(ours, want);
    assert!(
        d < 2e-6 * scale,
        "{case}: {what} differs by {d} (largest {scale})"
    );
}
