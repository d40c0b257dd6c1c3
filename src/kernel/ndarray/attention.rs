//! Attention in one node: `O = softmax(scale·Q·Kᵀ + bias, causal mask)·V` per (batch, head)
//! (or stick-breaking's weights in place of the softmax),
//! `q` `[batch, heads, rows, d_head]`, output `[batch, rows, heads, d_v]`. Two GEMMs with the
//! bias, mask and softmax between them; the backward pass recomputes the `[rows, keys]`
//! probabilities per head (FlashAttention's trade), so the node keeps only its inputs and
//! output.

use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::Backward;
use burn::backend::autodiff::ops::Ops;
use burn::prelude::*;
use burn::tensor::ops::FloatTensorOps;
use burn::tensor::TensorData;
use burn::tensor::TensorPrimitive;
use rayon::prelude::*;

use super::gemm::{gemm, gemm_new, gemm_scaled, view2, Mat};
use super::node::{backward_for_parents, finish_node};
use super::simd::vectorized;
use super::softmax::{softmax_row, visible};
use super::{f32_view, to_nd, Ad, Nd};
use crate::kernel::cast;
use crate::kernel::cast_opt;
use crate::kernel::stick_breaking::Sticks;

/// The operands of one attention call, as 4-d views.
pub(super) struct AttentionViews<'a> {
    pub(super) q: ndarray::ArrayView4<'a, f32>,
    pub(super) k: ndarray::ArrayView4<'a, f32>,
    pub(super) v: ndarray::ArrayView4<'a, f32>,
    pub(super) bias: Option<ndarray::ArrayView4<'a, f32>>,
    pub(super) scale: f32,
    pub(super) causal_from: Option<usize>,
    /// Stick-breaking weights in place of the softmax (then `causal_from` is unused: the
    /// sticks hold only the keys they see).
    pub(super) sticks: Option<Sticks>,
}

pub(crate) fn view4(x: &burn_ndarray::NdArrayTensor) -> Option<ndarray::ArrayView4<'_, f32>> {
    f32_view(x)?.into_dimensionality::<ndarray::Ix4>().ok()
}

vectorized! {
    /// Adds the bias (if any) to each row of the `[rows, keys]` logits `p` over the keys it
    /// sees, and takes the softmax in place (0 at the masked keys).
    fn bias_softmax_rows(
        p: &mut [f32],
        rows: usize,
        keys: usize,
        causal_from: Option<usize>,
        bias: Option<&Mat<'_>>,
    ) {
        for (r, row) in p.chunks_exact_mut(keys.max(1)).enumerate() {
            let n = visible(r, rows, keys, causal_from);
            if let Some(bias) = bias {
                let base = r * bias.rs;
                if bias.cs == 1 {
                    for (x, &b) in row[..n].iter_mut().zip(&bias.data[base..base + n]) {
                        *x += b;
                    }
                } else {
                    for (c, x) in row[..n].iter_mut().enumerate() {
                        *x += bias.data[base + c * bias.cs];
                    }
                }
            }
            softmax_row(row, n);
        }
    }
}

vectorized! {
    /// `dS = P ⊙ (dP − rowsum(dO ⊙ O))` in place over `ds` (holding `dP`), row by row of
    /// `[rows, keys]`, with `dO` and `O` as `[rows, d_v]` matrices.
    fn softmax_grad_rows(ds: &mut [f32], p: &[f32], og: &Mat<'_>, oo: &Mat<'_>, keys: usize) {
        let keys = keys.max(1);
        for (r, (dsr, pr)) in ds.chunks_exact_mut(keys).zip(p.chunks_exact(keys)).enumerate() {
            let d: f32 = (0..og.cols)
                .map(|c| og.data[r * og.rs + c * og.cs] * oo.data[r * oo.rs + c * oo.cs])
                .sum();
            for (x, &y) in dsr.iter_mut().zip(pr) {
                *x = y * (*x - d);
            }
        }
    }
}

impl AttentionViews<'_> {
    pub(super) fn dims(&self) -> (usize, usize, usize, usize, usize, usize) {
        let (b, h, rows, dh) = self.q.dim();
        (b, h, rows, self.k.dim().2, dh, self.v.dim().3)
    }

    /// The probabilities of head `hi`, batch row `bi`: `[rows, keys]`, row-major, 0 at
    /// masked keys (the softmax; stick-breaking has its own tile, `super::attention_sticks`).
    pub(super) fn probs(&self, bi: usize, hi: usize) -> Vec<f32> {
        use ndarray::s;
        let (_, _, rows, keys, _, _) = self.dims();
        let q = view2(self.q.slice(s![bi, hi, .., ..]));
        let k = view2(self.k.slice(s![bi, hi, .., ..]));
        let mut p = gemm_new(self.scale, &q, &k.t());
        let bias = self.bias.as_ref().map(|t| {
            let bb = if t.dim().0 == 1 { 0 } else { bi };
            view2(t.slice(s![bb, hi, .., ..]))
        });
        bias_softmax_rows(&mut p, rows, keys, self.causal_from, bias.as_ref());
        p
    }

    /// The output `[batch, rows, heads, d_v]`, row-major.
    pub(super) fn forward(&self) -> Vec<f32> {
        use ndarray::s;
        let (b, h, rows, keys, _, dv) = self.dims();
        let per_head: Vec<Vec<f32>> = (0..h)
            .into_par_iter()
            .map(|hi| {
                if let Some(sticks) = self.sticks {
                    return self.sticks_head_out(hi, sticks);
                }
                let mut out = vec![0.0f32; b * rows * dv];
                for bi in 0..b {
                    let p = Mat::row_major(std::borrow::Cow::Owned(self.probs(bi, hi)), rows, keys);
                    let v = view2(self.v.slice(s![bi, hi, .., ..]));
                    gemm(&p, &v, 0.0, &mut out[bi * rows * dv..(bi + 1) * rows * dv]);
                }
                out
            })
            .collect();
        let mut out = vec![0.0f32; b * rows * h * dv];
        for (hi, head) in per_head.iter().enumerate() {
            for (block, src) in head.chunks_exact(dv.max(1)).enumerate() {
                let (bi, r) = (block / rows.max(1), block % rows.max(1));
                let at = ((bi * rows + r) * h + hi) * dv;
                out[at..at + dv].copy_from_slice(src);
            }
        }
        out
    }

    /// The gradients of q, k, v (`[batch, heads, .., ..]`, row-major) and of the bias (its
    /// own shape), from the output `o` and its gradient `g` (`[batch, rows, heads, d_v]`
    /// views). `bias_grad`: whether the bias's gradient is wanted.
    pub(super) fn backward(
        &self,
        o: ndarray::ArrayView4<'_, f32>,
        g: ndarray::ArrayView4<'_, f32>,
        bias_grad: bool,
    ) -> [Vec<f32>; 4] {
        let (b, h, rows, keys, dh, dv) = self.dims();
        let bias_batch = self.bias.as_ref().map_or(1, |t| t.dim().0);
        let per_head = self.head_grads(o, g, bias_grad);
        // From per-head blocks [batch, ..] to [batch, heads, ..].
        let gather = |which: usize, per_batch: usize, batches: usize| -> Vec<f32> {
            let mut out = vec![0.0f32; batches * h * per_batch];
            for (hi, head) in per_head.iter().enumerate() {
                for bi in 0..batches {
                    let at = (bi * h + hi) * per_batch;
                    out[at..at + per_batch]
                        .copy_from_slice(&head[which][bi * per_batch..(bi + 1) * per_batch]);
                }
            }
            out
        };
        let dbias = if bias_grad {
            gather(3, rows * keys, bias_batch)
        } else {
            Vec::new()
        };
        [
            gather(0, rows * dh, b),
            gather(1, keys * dh, b),
            gather(2, keys * dv, b),
            dbias,
        ]
    }

    /// The gradient of a packed `[batch, seq, 3 · heads, d_head]` input (q, k, v as
    /// [`packed_views`](super::attention_packed::packed_views) reads them), and the bias's (its own shape, if wanted).
    pub(super) fn backward_packed(
        &self,
        o: ndarray::ArrayView4<'_, f32>,
        g: ndarray::ArrayView4<'_, f32>,
        bias_grad: bool,
    ) -> [Vec<f32>; 2] {
        let (b, h, rows, keys, dh, dv) = self.dims();
        assert!(
            rows == keys && dh == dv,
            "a packed attention block is square"
        );
        let bias_batch = self.bias.as_ref().map_or(1, |t| t.dim().0);
        let per_head = self.head_grads(o, g, bias_grad);
        let mut packed = vec![0.0f32; b * rows * 3 * h * dh];
        for (hi, head) in per_head.iter().enumerate() {
            for (part, src) in head[..3].iter().enumerate() {
                for (block, values) in src.chunks_exact(dh.max(1)).enumerate() {
                    let (bi, r) = (block / rows.max(1), block % rows.max(1));
                    let at = ((bi * rows + r) * 3 * h + part * h + hi) * dh;
                    packed[at..at + dh].copy_from_slice(values);
                }
            }
        }
        let mut dbias = Vec::new();
        if bias_grad {
            let per_batch = rows * keys;
            dbias = vec![0.0f32; bias_batch * h * per_batch];
            for (hi, head) in per_head.iter().enumerate() {
                for bi in 0..bias_batch {
                    let at = (bi * h + hi) * per_batch;
                    dbias[at..at + per_batch]
                        .copy_from_slice(&head[3][bi * per_batch..(bi + 1) * per_batch]);
                }
            }
        }
        [packed, dbias]
    }

    /// Per head: the gradients of q, k and v of every batch row (`[batch, .., ..]`,
    /// row-major), and the bias's (`[1 or batch, rows, keys]`, when wanted).
    pub(super) fn head_grads(
        &self,
        o: ndarray::ArrayView4<'_, f32>,
        g: ndarray::ArrayView4<'_, f32>,
        bias_grad: bool,
    ) -> Vec<[Vec<f32>; 4]> {
        use ndarray::s;
        let (b, h, rows, keys, dh, dv) = self.dims();
        let bias_batch = self.bias.as_ref().map_or(1, |t| t.dim().0);
        (0..h)
            .into_par_iter()
            .map(|hi| {
                if let Some(sticks) = self.sticks {
                    return self.sticks_head_grads(hi, sticks, g, bias_grad);
                }
                let mut dq = vec![0.0f32; b * rows * dh];
                let mut dk = vec![0.0f32; b * keys * dh];
                let mut dv_ = vec![0.0f32; b * keys * dv];
                let mut dbias = if bias_grad {
                    vec![0.0f32; bias_batch * rows * keys]
                } else {
                    Vec::new()
                };
                for bi in 0..b {
                    let p = self.probs(bi, hi);
                    let og = view2(g.slice(s![bi, .., hi, ..]));
                    let oo = view2(o.slice(s![bi, .., hi, ..]));
                    let q = view2(self.q.slice(s![bi, hi, .., ..]));
                    let k = view2(self.k.slice(s![bi, hi, .., ..]));
                    let v = view2(self.v.slice(s![bi, hi, .., ..]));
                    let pm = Mat::row_major(std::borrow::Cow::Borrowed(&p), rows, keys);
                    // dV = Pᵀ · dO
                    gemm(
                        &pm.t(),
                        &og,
                        0.0,
                        &mut dv_[bi * keys * dv..(bi + 1) * keys * dv],
                    );
                    // dP = dO · Vᵀ, then dS = P ⊙ (dP − rowsum(dO ⊙ O)) in place.
                    let mut ds = gemm_new(1.0, &og, &v.t());
                    softmax_grad_rows(&mut ds, &p, &og, &oo, keys);
                    if bias_grad {
                        let at = if bias_batch == 1 { 0 } else { bi * rows * keys };
                        for (acc, &x) in dbias[at..at + rows * keys].iter_mut().zip(&ds) {
                            *acc += x;
                        }
                    }
                    let dsm = Mat::row_major(std::borrow::Cow::Owned(ds), rows, keys);
                    // dq = scale · dS · K, dk = scale · dSᵀ · Q
                    gemm_scaled(
                        self.scale,
                        &dsm,
                        &k,
                        &mut dq[bi * rows * dh..(bi + 1) * rows * dh],
                    );
                    gemm_scaled(
                        self.scale,
                        &dsm.t(),
                        &q,
                        &mut dk[bi * keys * dh..(bi + 1) * keys * dh],
                    );
                }
                [dq, dk, dv_, dbias]
            })
            .collect()
    }
}

fn attention_views<'a>(
    q: &'a burn_ndarray::NdArrayTensor,
    k: &'a burn_ndarray::NdArrayTensor,
    v: &'a burn_ndarray::NdArrayTensor,
    bias: Option<&'a burn_ndarray::NdArrayTensor>,
    scale: f32,
    causal_from: Option<usize>,
    sticks: Option<Sticks>,
) -> Option<AttentionViews<'a>> {
    Some(AttentionViews {
        q: view4(q)?,
        k: view4(k)?,
        v: view4(v)?,
        bias: match bias {
            Some(t) => Some(view4(t)?),
            None => None,
        },
        scale,
        causal_from,
        sticks,
    })
}

fn attention_out_dims(q: [usize; 4], v: [usize; 4]) -> [usize; 4] {
    [q[0], q[2], q[1], v[3]]
}

pub(in crate::kernel) fn attention_nd<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    bias: Option<Tensor<B, 4>>,
    scale: f32,
    causal_from: Option<usize>,
    sticks: Option<Sticks>,
) -> Option<Tensor<B, 4>> {
    let (q, k, v): (Tensor<Nd, 4>, Tensor<Nd, 4>, Tensor<Nd, 4>) = (cast(q)?, cast(k)?, cast(v)?);
    let bias: Option<Tensor<Nd, 4>> = cast_opt(bias)?;
    let (dims, device) = (attention_out_dims(q.dims(), v.dims()), q.device());
    let [q, k, v] = [q, k, v].map(|t| t.into_primitive().tensor());
    let bias = bias.map(|t| t.into_primitive().tensor());
    let y = attention_views(&q, &k, &v, bias.as_ref(), scale, causal_from, sticks)?.forward();
    cast(to_nd(y, dims, &device))
}

/// What an attention node keeps: its inputs and output (shared, not copied).
#[derive(Clone, Debug)]
struct AttentionState {
    q: burn_ndarray::NdArrayTensor,
    k: burn_ndarray::NdArrayTensor,
    v: burn_ndarray::NdArrayTensor,
    bias: Option<burn_ndarray::NdArrayTensor>,
    out: burn_ndarray::NdArrayTensor,
    scale: f32,
    causal_from: Option<usize>,
    sticks: Option<Sticks>,
}

/// The backward pass of an attention node with `N` parents (q, k, v, and the bias when
/// there is one).
#[derive(Debug)]
struct AttentionBackward<const N: usize>;

fn attention_backward<const N: usize>(ops: Ops<AttentionState, N>, grads: &mut Gradients) {
    let grad = grads.consume::<Nd>(&ops.node);
    let s = &ops.state;
    let views = attention_views(
        &s.q,
        &s.k,
        &s.v,
        s.bias.as_ref(),
        s.scale,
        s.causal_from,
        s.sticks,
    )
    .expect("an attention node keeps f32 4-d inputs");
    let bias_grad = N == 4 && ops.parents[N - 1].is_some();
    let o = view4(&s.out).expect("f32 output");
    let g = view4(&grad).expect("the gradient of an f32 output is f32");
    let [dq, dk, dv, dbias] = views.backward(o, g, bias_grad);
    let shapes = [
        views.q.shape().to_vec(),
        views.k.shape().to_vec(),
        views.v.shape().to_vec(),
        views
            .bias
            .as_ref()
            .map_or(Vec::new(), |t| t.shape().to_vec()),
    ];
    let device = Default::default();
    for ((parent, values), shape) in ops.parents.iter().zip([dq, dk, dv, dbias]).zip(shapes) {
        if let Some(parent) = parent {
            let t = Nd::float_from_data(TensorData::new(values, shape), &device);
            grads.register::<Nd>(parent.id, t);
        }
    }
}

backward_for_parents!(
    AttentionBackward,
    AttentionState,
    attention_backward,
    [3, 4]
);

pub(in crate::kernel) fn attention_autodiff<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    bias: Option<Tensor<B, 4>>,
    scale: f32,
    causal_from: Option<usize>,
    sticks: Option<Sticks>,
) -> Option<Tensor<B, 4>> {
    let (q, k, v): (Tensor<Ad, 4>, Tensor<Ad, 4>, Tensor<Ad, 4>) = (cast(q)?, cast(k)?, cast(v)?);
    let bias: Option<Tensor<Ad, 4>> = cast_opt(bias)?;
    let (dims, device) = (attention_out_dims(q.dims(), v.dims()), q.device());
    let [q, k, v] = [q, k, v].map(|t| t.into_primitive().tensor());
    let bias = bias.map(|t| t.into_primitive().tensor());
    let y = attention_views(
        &q.primitive,
        &k.primitive,
        &v.primitive,
        bias.as_ref().map(|t| &t.primitive),
        scale,
        causal_from,
        sticks,
    )?
    .forward();
    let out = to_nd(y, dims, &device).into_primitive().tensor();
    let state = AttentionState {
        q: q.primitive,
        k: k.primitive,
        v: v.primitive,
        bias: bias.as_ref().map(|t| t.primitive.clone()),
        out: out.clone(),
        scale,
        causal_from,
        sticks,
    };
    let out = match bias {
        Some(t) => finish_node(
            AttentionBackward::<4>
                .prepare::<NoCheckpointing>([q.node, k.node, v.node, t.node])
                .compute_bound()
                .stateful(),
            state,
            out,
        ),
        None => finish_node(
            AttentionBackward::<3>
                .prepare::<NoCheckpointing>([q.node, k.node, v.node])
                .compute_bound()
                .stateful(),
            state,
            out,
        ),
    };
    cast(Tensor::<Ad, 4>::from_primitive(TensorPrimitive::Float(out)))
}
