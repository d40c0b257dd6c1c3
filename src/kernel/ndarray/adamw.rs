//! One AdamW step with clipping by norm, in place over the parameter's and both moments'
//! buffers when nothing else holds them: `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
//! `p ← p·(1 − lr·λ) − lr·m̂/(√v̂ + ε)`.

use burn::prelude::*;
use rayon::prelude::*;

use super::simd::{lane_sum_sq_dev, vectorized};
use super::{applies, from_array, owned_f32, Nd, CHUNK};
use crate::kernel::adamw_fits;
use crate::kernel::cast;
use crate::kernel::AdamWResult;
use crate::kernel::AdamWStep;
use crate::kernel::Moments;

vectorized! {
    fn sum_squares_chunk(g: &[f32]) -> f32 {
        lane_sum_sq_dev(g, 0.0)
    }
}

vectorized! {
    fn adamw_chunk(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], s: &AdamWStep, coef: f32) {
        let (f1, f2) = (1.0 - s.beta_1, 1.0 - s.beta_2);
        for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
            let g = g * coef;
            *m = *m * s.beta_1 + g * f1;
            *v = *v * s.beta_2 + g * g * f2;
            let delta = (*m / s.correction_1) / ((*v / s.correction_2).sqrt() + s.epsilon);
            *p = *p * s.decay - delta * s.lr;
        }
    }
}

/// One AdamW step with clipping by norm ([`crate::optim::FusedAdamW`]) on `NdArray<f32>`:
/// the gradient's norm in one read, then one pass that updates the parameter and both
/// moments in place. The inputs come back unchanged (`Err`) on another backend, another
/// element type or mismatched shapes. Partial sums of the norm run over fixed chunks and
/// are added in order, so the step is deterministic.
pub(crate) fn adamw_nd<B: Backend, const D: usize>(
    s: AdamWStep,
    tensor: Tensor<B, D>,
    grad: Tensor<B, D>,
    moments: Moments<B, D>,
) -> AdamWResult<B, D> {
    let dims = tensor.dims();
    if !applies::<B>() || !adamw_fits(&tensor, &grad, &moments) {
        return Err((tensor, grad, moments));
    }
    let arrays = (|| {
        let p = owned_f32(cast::<_, Tensor<Nd, D>>(tensor)?)?;
        let g = owned_f32(cast::<_, Tensor<Nd, D>>(grad)?)?;
        let mv = match moments {
            Some((_, m, v)) => Some((
                owned_f32(cast::<_, Tensor<Nd, D>>(m)?)?,
                owned_f32(cast::<_, Tensor<Nd, D>>(v)?)?,
            )),
            None => None,
        };
        Some((p, g, mv))
    })();
    // `B` is `NdArray<f32>` and every tensor is `f32` (checked above), so each cast holds.
    let Some((mut p, g, mv)) = arrays else {
        unreachable!("NdArray<f32> tensors of f32 values")
    };
    let (mut m, mut v) = mv.unwrap_or_else(|| {
        let zeros = || ndarray::ArcArray::zeros(ndarray::IxDyn(&dims));
        (zeros(), zeros())
    });
    let (Some(ps), Some(ms), Some(vs), Some(gs)) = (
        p.as_slice_mut(),
        m.as_slice_mut(),
        v.as_slice_mut(),
        g.as_slice(),
    ) else {
        unreachable!("row-major arrays (made so above)")
    };
    let coef = match s.clip_norm {
        Some(threshold) => {
            let partial: Vec<f32> = gs.par_chunks(CHUNK).map(sum_squares_chunk).collect();
            let norm = partial.iter().sum::<f32>().sqrt();
            (threshold / (norm + f32::MIN_POSITIVE)).min(1.0)
        }
        None => 1.0,
    };
    ps.par_chunks_mut(CHUNK)
        .zip(ms.par_chunks_mut(CHUNK))
        .zip(vs.par_chunks_mut(CHUNK))
        .zip(gs.par_chunks(CHUNK))
        .for_each(|(((p, m), v), g)| adamw_chunk(p, m, v, g, &s, coef));
    let out = (from_array::<D>(p), from_array::<D>(m), from_array::<D>(v));
    let cast_back = |t: Tensor<Nd, D>| cast::<_, Tensor<B, D>>(t);
    match (cast_back(out.0), cast_back(out.1), cast_back(out.2)) {
        (Some(p), Some(m), Some(v)) => Ok((p, m, v)),
        _ => unreachable!("B is NdArray<f32>"),
    }
}
