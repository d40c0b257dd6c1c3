//! DAPE V1 inside the attention node, [`dape_attention`]: the tile of `attention.rs` on
//! `NdArray<f32>` (evaluation) and, on `Autodiff<NdArray<f32>>` (training), as one graph node
//! over q, k, v, the base bias map and the MLP's four tensors, which keeps only its inputs and
//! its output: the backward pass recomputes every block's logits, `Z` and probabilities.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::prelude::*;
use burn::tensor::ops::FloatTensorOps;
use burn::tensor::TensorData;

use super::attention::{DapeTile, TileGrads};
use super::node::{prim, record_dape_node};
use super::v1::Mlp;
use super::{applies, applies_autodiff, host};
use crate::encoding::Span;
use crate::kernel::{cast, cast_opt, row_major_values, view4, Ad, Nd};

/// The operands of [`dape_attention`] for backend `B`.
pub(crate) struct DapeAttentionInputs<B: Backend> {
    /// `[batch, H, rows, d_head]`, not yet scaled.
    pub q: Tensor<B, 4>,
    /// `[batch, H, keys, d_head]`.
    pub k: Tensor<B, 4>,
    /// `[batch, H, keys, d_v]`.
    pub v: Tensor<B, 4>,
    /// The base bias map, `[1 or batch, H, rows, keys]`; `None` over NoPE.
    pub bias: Option<Tensor<B, 4>>,
    /// `f`'s first layer `[C, D]` and bias `[D]`, second layer `[D, H]` and bias `[H]`.
    pub w1t: Tensor<B, 2>,
    pub b1: Option<Tensor<B, 1>>,
    pub w2t: Tensor<B, 2>,
    pub b2: Option<Tensor<B, 1>>,
    /// LeakyReLU's slope.
    pub slope: f32,
    /// The logits' scale (`1/√d_head`).
    pub scale: f32,
    /// Largest block of rows `[batch, H, rb, keys]` in floats (`ATTENTION_TILE` normally;
    /// smaller in tests, to run several blocks).
    pub budget: usize,
}

/// `softmax(Z, mask) · V` with `Z = S + B + f([S ‖ B])`, `S = scale · q kᵀ`, over the rows and
/// keys of `span`: `[batch, rows, H, d_v]` (the heads side by side per row, as the attention
/// kernel returns them). `None` (the caller takes the tensor path) when the backend is not
/// ndarray `f32` (± autodiff) or a shape does not fit: the bias map must be `[1 or batch, H,
/// rows, keys]`, and `f`'s input width `2H` with a bias, `H` without.
pub(crate) fn dape_attention<B: Backend>(
    x: DapeAttentionInputs<B>,
    span: &Span,
) -> Option<Tensor<B, 4>> {
    if !fits(&x) {
        return None;
    }
    if applies::<B>() {
        let x = cast_inputs::<B, Nd>(x)?;
        let mlp = mlp_of(&x)?;
        let dims = tile_dims(&x);
        let device = x.q.device();
        let [q, k, v] = [x.q, x.k, x.v].map(|t| t.into_primitive().tensor());
        let bias = x.bias.map(|m| m.into_primitive().tensor());
        let out = run_forward(
            [&q, &k, &v],
            bias.as_ref(),
            dims,
            [x.scale],
            span,
            &mlp,
            x.budget,
        )?;
        return cast(Tensor::<Nd, 4>::from_data(
            TensorData::new(out, out_dims(dims)),
            &device,
        ));
    }
    if applies_autodiff::<B>() {
        return cast(record(cast_inputs::<B, Ad>(x)?, span)?);
    }
    None
}

/// Whether the shapes and element types fit the tile.
fn fits<B: Backend>(x: &DapeAttentionInputs<B>) -> bool {
    let [b, h, rows, dh] = x.q.dims();
    let [kb, kh, keys, kdh] = x.k.dims();
    let [vb, vh, vkeys, _] = x.v.dims();
    let [c, d] = x.w1t.dims();
    let bias_fits = x.bias.as_ref().is_none_or(|m| {
        let [mb, mh, mr, mk] = m.dims();
        (mb == 1 || mb == b) && (mh, mr, mk) == (h, rows, keys)
    });
    let widths = c == if x.bias.is_some() { 2 * h } else { h }
        && x.w2t.dims() == [d, h]
        && x.b1.as_ref().is_none_or(|t| t.dims() == [d])
        && x.b2.as_ref().is_none_or(|t| t.dims() == [h]);
    let f32s = [&x.q, &x.k, &x.v]
        .into_iter()
        .chain(x.bias.as_ref())
        .all(|t| t.dtype() == burn::tensor::DType::F32)
        && x.w1t.dtype() == burn::tensor::DType::F32;
    (kb, kh, kdh) == (b, h, dh) && (vb, vh, vkeys) == (b, h, keys) && bias_fits && widths && f32s
}

fn cast_inputs<B: Backend, C: Backend>(
    x: DapeAttentionInputs<B>,
) -> Option<DapeAttentionInputs<C>> {
    Some(DapeAttentionInputs {
        q: cast(x.q)?,
        k: cast(x.k)?,
        v: cast(x.v)?,
        bias: cast_opt(x.bias)?,
        w1t: cast(x.w1t)?,
        b1: cast_opt(x.b1)?,
        w2t: cast(x.w2t)?,
        b2: cast_opt(x.b2)?,
        slope: x.slope,
        scale: x.scale,
        budget: x.budget,
    })
}

/// `f`'s weights on the host.
fn mlp_of<B: Backend>(x: &DapeAttentionInputs<B>) -> Option<Mlp> {
    let [c, d] = x.w1t.dims();
    let h = x.q.dims()[1];
    let opt = |t: &Option<Tensor<B, 1>>| match t {
        Some(t) => host(t.clone()).map(Some),
        None => Some(None),
    };
    Some(Mlp::new(
        [c, d, h],
        host(x.w1t.clone())?,
        opt(&x.b1)?,
        host(x.w2t.clone())?,
        opt(&x.b2)?,
        x.slope,
    ))
}

/// `[batch, H, rows, keys, d_head, d_v]`.
fn tile_dims<B: Backend>(x: &DapeAttentionInputs<B>) -> [usize; 6] {
    let [b, h, rows, dh] = x.q.dims();
    [b, h, rows, x.k.dims()[2], dh, x.v.dims()[3]]
}

fn out_dims([b, h, rows, _, _, dv]: [usize; 6]) -> [usize; 4] {
    [b, rows, h, dv]
}

fn four([b, h, rows, keys, _, _]: [usize; 6]) -> [usize; 4] {
    [b, h, rows, keys]
}

/// The tile over the host values of q, k, v (read through their strides) and the bias map;
/// `None` when one is not `f32`.
fn tile<'a>(
    [q, k, v]: [&'a burn_ndarray::NdArrayTensor; 3],
    bias: Option<&'a [f32]>,
    dims: [usize; 6],
    [scale]: [f32; 1],
    span: &'a Span,
    mlp: &'a Mlp,
    block: usize,
) -> Option<DapeTile<'a>> {
    Some(DapeTile {
        q: view4(q)?,
        k: view4(k)?,
        v: view4(v)?,
        bias,
        dims,
        scale,
        span,
        mlp,
        block,
    })
}

/// The tile's forward pass, `[batch, rows, H, d_v]`; `None` when a tensor is not `f32`.
#[allow(clippy::too_many_arguments)]
fn run_forward(
    qkv: [&burn_ndarray::NdArrayTensor; 3],
    bias: Option<&burn_ndarray::NdArrayTensor>,
    dims: [usize; 6],
    scale: [f32; 1],
    span: &Span,
    mlp: &Mlp,
    budget: usize,
) -> Option<Vec<f32>> {
    let bias = match bias {
        Some(m) => Some(row_major_values(m)?),
        None => None,
    };
    let block = DapeTile::block_rows(four(dims), budget);
    Some(tile(qkv, bias.as_deref(), dims, scale, span, mlp, block)?.forward())
}

/// What the node's backward pass reads: its inputs and output (shared, not copied).
#[derive(Debug)]
struct State {
    q: burn_ndarray::NdArrayTensor,
    k: burn_ndarray::NdArrayTensor,
    v: burn_ndarray::NdArrayTensor,
    bias: Option<burn_ndarray::NdArrayTensor>,
    out: burn_ndarray::NdArrayTensor,
    dims: [usize; 6],
    block: usize,
    bias_maps: usize,
    scale: f32,
    span: Span,
    mlp: Mlp,
}

/// The forward pass on `Autodiff<NdArray<f32>>`, recorded as one node over eight parents.
fn record(x: DapeAttentionInputs<Ad>, span: &Span) -> Option<Tensor<Ad, 4>> {
    let mlp = mlp_of(&x)?;
    let dims = tile_dims(&x);
    let block = DapeTile::block_rows(four(dims), x.budget);
    let device = x.q.device();
    let [q, k, v] = [&x.q, &x.k, &x.v].map(|t| t.clone().inner().into_primitive().tensor());
    let bias = x
        .bias
        .as_ref()
        .map(|m| m.clone().inner().into_primitive().tensor());
    let span = Span {
        positions: None,
        ..span.clone()
    };
    let out = run_forward(
        [&q, &k, &v],
        bias.as_ref(),
        dims,
        [x.scale],
        &span,
        &mlp,
        x.budget,
    )?;
    let out = Tensor::<Nd, 4>::from_data(TensorData::new(out, out_dims(dims)), &device)
        .into_primitive()
        .tensor();
    let bias_maps = x.bias.as_ref().map_or(0, |m| m.dims()[0]);
    let state = Arc::new(State {
        q,
        k,
        v,
        bias,
        out: out.clone(),
        dims,
        block,
        bias_maps,
        scale: x.scale,
        span,
        mlp,
    });
    let parents = [
        Some(prim(x.q)),
        Some(prim(x.k)),
        Some(prim(x.v)),
        x.bias.map(prim),
        Some(prim(x.w1t)),
        x.b1.map(prim),
        Some(prim(x.w2t)),
        x.b2.map(prim),
    ];
    Some(record_dape_node(
        DapeAttentionBackward,
        parents,
        state,
        out,
        &device,
    ))
}

#[derive(Debug)]
struct DapeAttentionBackward;

impl Backward<Nd, 8> for DapeAttentionBackward {
    type State = Arc<State>;

    fn backward(self, ops: Ops<Self::State, 8>, grads: &mut Gradients, _: &mut Checkpointer) {
        let st = Arc::clone(&ops.state);
        let grad = grads.consume::<Nd>(&ops.node);
        let read = |t| row_major_values(t).expect("the attention-DAPE node keeps f32 tensors");
        let bias = st.bias.as_ref().map(read);
        let (o, g) = (read(&st.out), read(&grad));
        let TileGrads {
            q,
            k,
            v,
            bias: db,
            w1t,
            b1,
            w2t,
            b2,
        } = tile(
            [&st.q, &st.k, &st.v],
            bias.as_deref(),
            st.dims,
            [st.scale],
            &st.span,
            &st.mlp,
            st.block,
        )
        .expect("the attention-DAPE node keeps f32 tensors")
        .backward(&o, &g);
        let [b, h, rows, keys, dh, dv] = st.dims;
        let Mlp { c, d, .. } = st.mlp;
        let values = [
            (q, vec![b, h, rows, dh]),
            (k, vec![b, h, keys, dh]),
            (v, vec![b, h, keys, dv]),
            (db, vec![st.bias_maps, h, rows, keys]),
            (w1t, vec![c, d]),
            (b1, vec![d]),
            (w2t, vec![d, h]),
            (b2, vec![h]),
        ];
        let device = Default::default();
        for (parent, (values, shape)) in ops.parents.into_iter().zip(values) {
            if let Some(node) = parent {
                let t = Nd::float_from_data(TensorData::new(values, shape), &device);
                grads.register::<Nd>(node.id, t);
            }
        }
    }
}
