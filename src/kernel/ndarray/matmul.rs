//! Batched `a·b` over the last two dimensions (`[n0, n1, m, k]·[n0, n1, k, n]`), one GEMM per
//! pair of matrices in parallel; backward `da = g·bᵀ`, `db = aᵀ·g`.

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

use super::attention::view4;
use super::gemm::{gemm, view2};
use super::node::finish_node;
use super::{to_nd, Ad, Nd};
use crate::kernel::cast;

/// The products of [`crate::kernel::batched_matmul`] for 4-d `f32` primitives of agreeing shapes:
/// the row-major output and its shape.
fn matmul_values(
    a: &burn_ndarray::NdArrayTensor,
    b: &burn_ndarray::NdArrayTensor,
) -> Option<(Vec<f32>, [usize; 4])> {
    let (a4, b4) = (view4(a)?, view4(b)?);
    let (n0, n1, m, k) = a4.dim();
    let (b0, b1, bk, n) = b4.dim();
    if (b0, b1, bk) != (n0, n1, k) {
        return None;
    }
    let mut out = vec![0.0f32; n0 * n1 * m * n];
    if m * n > 0 {
        out.par_chunks_mut(m * n).enumerate().for_each(|(i, c)| {
            let (i0, i1) = (i / n1, i % n1);
            let am = view2(
                a4.index_axis(ndarray::Axis(0), i0)
                    .index_axis_move(ndarray::Axis(0), i1),
            );
            let bm = view2(
                b4.index_axis(ndarray::Axis(0), i0)
                    .index_axis_move(ndarray::Axis(0), i1),
            );
            gemm(&am, &bm, 0.0, c);
        });
    }
    Some((out, [n0, n1, m, n]))
}

pub(in crate::kernel) fn matmul_nd<B: Backend>(
    a: Tensor<B, 4>,
    b: Tensor<B, 4>,
) -> Option<Tensor<B, 4>> {
    let (a, b): (Tensor<Nd, 4>, Tensor<Nd, 4>) = (cast(a)?, cast(b)?);
    let device = a.device();
    let (y, dims) = matmul_values(&a.into_primitive().tensor(), &b.into_primitive().tensor())?;
    cast(to_nd(y, dims, &device))
}

/// What a batched matrix product node keeps: both inputs (shared, not copied).
#[derive(Clone, Debug)]
struct MatmulState {
    a: burn_ndarray::NdArrayTensor,
    b: burn_ndarray::NdArrayTensor,
}

#[derive(Debug)]
struct MatmulBackward;

impl Backward<Nd, 2> for MatmulBackward {
    type State = MatmulState;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Nd>(&ops.node);
        let s = &ops.state;
        let (a4, b4) = (
            view4(&s.a).expect("f32 4-d input"),
            view4(&s.b).expect("f32 4-d input"),
        );
        let g4 = view4(&grad).expect("the gradient of an f32 output is f32");
        let (n0, n1, m, k) = a4.dim();
        let n = b4.dim().3;
        fn pair<'v>(
            x: &ndarray::ArrayView4<'v, f32>,
            i: usize,
            n1: usize,
        ) -> ndarray::ArrayView2<'v, f32> {
            (*x).index_axis_move(ndarray::Axis(0), i / n1)
                .index_axis_move(ndarray::Axis(0), i % n1)
        }
        let device = Default::default();
        let [pa, pb] = &ops.parents;
        // da = g · bᵀ, [m, n] · [n, k]; db = aᵀ · g, [k, m] · [m, n].
        for (parent, rows, cols, is_a) in [(pa, m, k, true), (pb, k, n, false)] {
            let Some(parent) = parent else { continue };
            let mut d = vec![0.0f32; n0 * n1 * rows * cols];
            if rows * cols > 0 {
                d.par_chunks_mut(rows * cols)
                    .enumerate()
                    .for_each(|(i, c)| {
                        let gm = view2(pair(&g4, i, n1));
                        if is_a {
                            gemm(&gm, &view2(pair(&b4, i, n1)).t(), 0.0, c);
                        } else {
                            gemm(&view2(pair(&a4, i, n1)).t(), &gm, 0.0, c);
                        }
                    });
            }
            let t = Nd::float_from_data(TensorData::new(d, [n0, n1, rows, cols]), &device);
            grads.register::<Nd>(parent.id, t);
        }
    }
}

pub(in crate::kernel) fn matmul_autodiff<B: Backend>(
    a: Tensor<B, 4>,
    b: Tensor<B, 4>,
) -> Option<Tensor<B, 4>> {
    let (a, b): (Tensor<Ad, 4>, Tensor<Ad, 4>) = (cast(a)?, cast(b)?);
    let device = a.device();
    let [a, b] = [a, b].map(|t| t.into_primitive().tensor());
    let (y, dims) = matmul_values(&a.primitive, &b.primitive)?;
    let out = to_nd(y, dims, &device).into_primitive().tensor();
    let state = MatmulState {
        a: a.primitive,
        b: b.primitive,
    };
    let out = finish_node(
        MatmulBackward
            .prepare::<NoCheckpointing>([a.node, b.node])
            .compute_bound()
            .stateful(),
        state,
        out,
    );
    cast(Tensor::<Ad, 4>::from_primitive(TensorPrimitive::Float(out)))
}
