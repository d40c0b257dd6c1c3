//! AdamW on LibTorch, in place: the parameter and both moments updated by PyTorch's `lerp_`,
//! `mul_` and `addcdiv_`, the clipping factor kept on the device; a tensor held elsewhere is
//! copied first.

use burn::backend::libtorch::TchTensor;
use burn::prelude::*;
use burn::tensor::TensorPrimitive;

use super::{applies, Tb};
use crate::kernel::adamw_fits;
use crate::kernel::cast;
use crate::kernel::AdamWResult;
use crate::kernel::AdamWStep;
use crate::kernel::Moments;

/// The tensor of `t` to update in place: its own when no one else holds its memory, else a
/// copy (so that a tensor held elsewhere, a model's clone say, never changes).
fn writable(t: TchTensor) -> tch::Tensor {
    if t.can_mut() {
        t.tensor
    } else {
        t.tensor.copy()
    }
}

/// One AdamW step with clipping by norm ([`crate::optim::FusedAdamW`]) on `LibTorch<f32>`
/// (CPU or CUDA), by PyTorch's in-place kernels: the moments by `lerp_`, the decay and the
/// update by `mul_` and `addcdiv_` on the parameter, with two temporaries (`g²` and the
/// denominator) where Burn's `AdamW` and clipping allocate a tensor for each of about a dozen
/// operations. The clipping factor `min(1, threshold / ‖g‖)` stays a 0-d tensor on the
/// device, so the step never waits for it. The same arithmetic as the ndarray kernel, in the
/// same order up to rounding. The inputs come back unchanged (`Err`) on another backend or
/// element type, or for mismatched shapes.
pub(crate) fn adamw<B: Backend, const D: usize>(
    s: AdamWStep,
    tensor: Tensor<B, D>,
    grad: Tensor<B, D>,
    moments: Moments<B, D>,
) -> AdamWResult<B, D> {
    if !applies::<B>() || !adamw_fits(&tensor, &grad, &moments) {
        return Err((tensor, grad, moments));
    }
    let raw = |t: Tensor<B, D>| cast::<_, Tensor<Tb, D>>(t).map(|t| t.into_primitive().tensor());
    let inputs = (|| {
        let mv = match moments {
            Some((_, m, v)) => Some((raw(m)?, raw(v)?)),
            None => None,
        };
        Some((raw(tensor)?, raw(grad)?, mv))
    })();
    // `B` is `LibTorch<f32>` (checked above), so each cast holds.
    let Some((p, g, mv)) = inputs else {
        unreachable!("LibTorch<f32> tensors")
    };
    let mut p = writable(p);
    let g = g.tensor;
    let (mut m, mut v) = match mv {
        Some((m, v)) => (writable(m), writable(v)),
        None => (g.zeros_like(), g.zeros_like()),
    };
    let g = match s.clip_norm {
        Some(threshold) => {
            let mut coef = g.norm();
            let _ = coef.g_add_scalar_(f64::from(f32::MIN_POSITIVE));
            let _ = coef.reciprocal_();
            let _ = coef.g_mul_scalar_(f64::from(threshold));
            let _ = coef.clamp_max_(1.0);
            &g * &coef
        }
        None => g,
    };
    // m ← β₁ m + (1 − β₁) g and v ← β₂ v + (1 − β₂) g², as interpolations towards g and g².
    let _ = m.lerp_(&g, f64::from(1.0 - s.beta_1));
    let _ = v.lerp_(&g.square(), f64::from(1.0 - s.beta_2));
    let _ = p.g_mul_scalar_(f64::from(s.decay));
    if s.lr != 0.0 {
        // p ← p − lr · (m / c₁) / (√(v / c₂) + ε), as p + m / ((√(v / c₂) + ε) · (−c₁ / lr)).
        let mut denom = &v / f64::from(s.correction_2);
        let _ = denom.sqrt_();
        let _ = denom.g_add_scalar_(f64::from(s.epsilon));
        let _ = denom.g_mul_scalar_(-f64::from(s.correction_1) / f64::from(s.lr));
        let _ = p.addcdiv_(&m, &denom);
    }
    let back = |t: tch::Tensor| {
        let t = Tensor::<Tb, D>::from_primitive(TensorPrimitive::Float(TchTensor::new(t)));
        cast::<_, Tensor<B, D>>(t)
    };
    match (back(p), back(m), back(v)) {
        (Some(p), Some(m), Some(v)) => Ok((p, m, v)),
        _ => unreachable!("B is LibTorch<f32>"),
    }
}
