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

/// Tracked f32 and f64 tensors.
type T32 = Tensor<Autodiff<NdArray<f32>>, 4>;
type T64 = Tensor<Autodiff<NdArray<f64>>, 4>;

/// A tracked f32 tensor and its tracked f64 copy.
type Pair<'a> = (&'a T32, &'a T64);

/// The inputs of a fused-attention test: the q projection `[b, rows, h, d_head]`, the k | v
/// projection `[b, keys, h, d_head + d_v]` (k its first `d_head` columns), the bias, and the
/// weights of the summed output; each in f32 (tracked) and as its f64 copy.
struct SplitInputs<'a> {
    qp: Pair<'a>,
    kv: Pair<'a>,
    bias: Option<Pair<'a>>,
    weights: (T32, T64),
    d_head: usize,
}

/// Asserts that a fused node's output `ours` equals the f64 reference `want` in values and in
/// the gradients of q, k, v (the projections' parts) and the bias, under the weighted sums.
fn assert_split_attention_matches(case: &str, ours: T32, want: T64, inputs: SplitInputs<'_>) {
    let SplitInputs {
        qp: (qp, qp64),
        kv: (kv, kv64),
        bias,
        weights: (w, w64),
        d_head: dh,
    } = inputs;
    let dv = kv.dims()[3] - dh;
    let close = |ours, want, what: &str| assert_near_f64(ours, want, case, what);
    close(ours.clone().inner(), want.clone().inner(), "output");
    let g1 = (ours * w).sum().backward();
    let g2 = (want * w64).sum().backward();
    close(qp.grad(&g1).unwrap(), qp64.grad(&g2).unwrap(), "dq");
    let (gk, gk64) = (kv.grad(&g1).unwrap(), kv64.grad(&g2).unwrap());
    close(
        gk.clone().narrow(3, 0, dh),
        gk64.clone().narrow(3, 0, dh),
        "dk",
    );
    close(gk.narrow(3, dh, dv), gk64.narrow(3, dh, dv), "dv");
    if let Some((bias, bias64)) = bias {
        close(bias.grad(&g1).unwrap(), bias64.grad(&g2).unwrap(), "dbias");
    }
}
