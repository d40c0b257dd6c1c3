//! The inverse `T = (I + L)⁻¹` of a batch of unit lower-triangular matrices (`L: [g, n, C, C]`
//! strictly lower), by forward substitution, one matrix per task:
//! `T_ij = δ_ij − Σ_{j≤k<i} L_ik T_kj`. Backward: `dL = −strict_lower(Tᵀ · dT · Tᵀ)` (from
//! `dT = −T dL T`; the entries on and above the diagonal are not read).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::Backward;
use burn::backend::autodiff::ops::Ops;
use burn::prelude::*;
use burn::tensor::ops::FloatTensorOps;
use burn::tensor::TensorData;
use burn::tensor::TensorPrimitive;
use rayon::prelude::*;

use super::gemm::{gemm, Mat};
use super::node::finish_node;
use super::{row_major_values, to_nd, Ad, Nd};
use crate::kernel::cast;

/// The inverses, row-major, of the `[.., c, c]` matrices in `lower` (row-major values).
fn inverse_values(lower: &[f32], c: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; lower.len()];
    if c == 0 {
        return out;
    }
    out.par_chunks_mut(c * c)
        .zip(lower.par_chunks(c * c))
        .for_each(|(t, l)| {
            for i in 0..c {
                t[i * c + i] = 1.0;
                // Row i of T: −Σ_k L_ik · (row k of T), over the rows k < i already done.
                let (done, row) = t.split_at_mut(i * c);
                let row = &mut row[..c];
                for k in 0..i {
                    let lik = l[i * c + k];
                    if lik != 0.0 {
                        let tk = &done[k * c..k * c + k + 1];
                        row[..=k]
                            .iter_mut()
                            .zip(tk)
                            .for_each(|(r, x)| *r -= lik * x);
                    }
                }
            }
        });
    out
}

/// The forward pass on `NdArray<f32>` (evaluation).
pub(in crate::kernel) fn unit_lower_inverse_nd<B: Backend>(
    lower: Tensor<B, 4>,
) -> Option<Tensor<B, 4>> {
    let lower: Tensor<Nd, 4> = cast(lower)?;
    let dims = lower.dims();
    let device = lower.device();
    let values = row_major_values(&lower.into_primitive().tensor())?.into_owned();
    cast(to_nd(inverse_values(&values, dims[3]), dims, &device))
}

/// What the node keeps: the inverse, row-major, and its shape.
#[derive(Clone, Debug)]
struct InverseState {
    inverse: Vec<f32>,
    dims: [usize; 4],
}

#[derive(Debug)]
struct InverseBackward;

impl Backward<Nd, 1> for InverseBackward {
    type State = InverseState;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Nd>(&ops.node);
        let [parent] = &ops.parents;
        let Some(parent) = parent else { return };
        let InverseState { inverse, dims } = ops.state;
        let c = dims[3];
        let g = row_major_values(&grad)
            .expect("the gradient of an f32 output is f32")
            .into_owned();
        let mut d = vec![0.0f32; inverse.len()];
        if c > 0 {
            d.par_chunks_mut(c * c)
                .zip(inverse.par_chunks(c * c).zip(g.par_chunks(c * c)))
                .for_each(|(out, (t, gm))| {
                    let t = Mat::row_major(std::borrow::Cow::Borrowed(t), c, c);
                    let gm = Mat::row_major(std::borrow::Cow::Borrowed(gm), c, c);
                    // a = dT · Tᵀ, then out = Tᵀ · a; negated and kept strictly below the
                    // diagonal.
                    let mut a = vec![0.0f32; c * c];
                    gemm(&gm, &t.t(), 0.0, &mut a);
                    let a = Mat::row_major(std::borrow::Cow::Owned(a), c, c);
                    gemm(&t.t(), &a, 0.0, out);
                    for i in 0..c {
                        for j in 0..c {
                            let v = &mut out[i * c + j];
                            *v = if j < i { -*v } else { 0.0 };
                        }
                    }
                });
        }
        let t = Nd::float_from_data(TensorData::new(d, dims), &Default::default());
        grads.register::<Nd>(parent.id, t);
    }
}

/// One graph node on `Autodiff<NdArray<f32>>` (training).
pub(in crate::kernel) fn unit_lower_inverse_autodiff<B: Backend>(
    lower: Tensor<B, 4>,
) -> Option<Tensor<B, 4>> {
    let lower: Tensor<Ad, 4> = cast(lower)?;
    let dims = lower.dims();
    let device = lower.device();
    let lower = lower.into_primitive().tensor();
    let values = row_major_values(&lower.primitive)?.into_owned();
    let inverse = inverse_values(&values, dims[3]);
    let out = to_nd(inverse.clone(), dims, &device)
        .into_primitive()
        .tensor();
    let out = finish_node(
        InverseBackward
            .prepare::<NoCheckpointing>([lower.node])
            .compute_bound()
            .stateful(),
        InverseState { inverse, dims },
        out,
    );
    cast(Tensor::<Ad, 4>::from_primitive(TensorPrimitive::Float(out)))
}
