//! DAPE (V1 or V2) inside the attention node, [`dape_attention`]: the tile of `attention.rs` on
//! `NdArray<f32>` (evaluation) and, on `Autodiff<NdArray<f32>>` (training), as one graph node
//! over q, k, v (or the packed projection, [`Qkv`]), the base bias map, `f`'s four tensors and
//! Scalable-Softmax's row factors, which keeps only its inputs: the backward pass recomputes
//! every block's logits, `Z` and probabilities.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::prelude::*;
use burn::tensor::TensorData;

use super::super::tile::{Qkv, TileForm, TileWeights};
use super::attention::{DapeTile, TileGrads};
use super::correction::Correction;
use super::distance_half::DistanceHalf;
use super::node::{host_opt, prim, record_dape_node, register};
use super::v1::Mlp;
use super::v2::KeyConvs;
use super::{applies, applies_autodiff, host};
use crate::encoding::Span;
use crate::kernel::{cast, cast_opt, row_major_values, view4, Ad, Nd};

/// The operands of [`dape_attention`] for backend `B`.
pub(crate) struct DapeAttentionInputs<B: Backend> {
    pub qkv: Qkv<Tensor<B, 4>>,
    /// Heads `H`.
    pub heads: usize,
    /// The base bias map, `[1 or batch, H, rows, keys]`; `None` over NoPE.
    pub bias: Option<Tensor<B, 4>>,
    /// In place of `bias` (which is then `None`), a base bias of the distance alone, `[H, n]`,
    /// backwards: column `m` holds the bias at distance `n − 1 − m` (the map's row for one
    /// query at position `n − 1`), `n` at least the span's last query position plus one. For
    /// DAPE V1 in evaluation over a causal span whose rows and keys sit at their token
    /// indices: the tile then reads the bias and the bias's half of `f`'s first layer by
    /// distance ([`DistanceHalf`]) and builds no map. Anything else returns `None`.
    pub bias_by_distance: Option<Tensor<B, 2>>,
    /// DAPE's `f`.
    pub f: TileWeights<B>,
    /// Scalable-Softmax's factor per head and row, `[H, rows]`: the softmax reads `c ⊙ Z`.
    /// `None`: the plain softmax.
    pub row_scale: Option<Tensor<B, 2>>,
    /// The logits' scale (`1/√d_head`).
    pub scale: f32,
    /// Largest block of rows `[batch, H, rb, keys]` in floats (`ATTENTION_TILE` normally;
    /// smaller in tests, to run several blocks).
    pub budget: usize,
}

/// `softmax(Z, mask) · V` with `Z = S + B + f([S ‖ B])`, `S = scale · q kᵀ` and `f` DAPE V1's
/// or V2's, over the rows and keys of `span`: `[batch, rows, H, d_v]` (the heads side by side
/// per row, as the attention kernel returns them). `None` (the caller takes the tensor path) when the backend is not
/// ndarray `f32` (± autodiff) or a shape does not fit: the bias map must be `[1 or batch, H,
/// rows, keys]`, and `f`'s input width `2H` with a bias, `H` without (see [`TileWeights`]).
pub(crate) fn dape_attention<B: Backend>(
    x: DapeAttentionInputs<B>,
    span: &Span,
) -> Option<Tensor<B, 4>> {
    if !fits(&x, span) {
        return None;
    }
    if applies::<B>() {
        let x = cast_inputs::<B, Nd>(x)?;
        let f = correction_of(&x)?;
        let dims = tile_dims(&x)?;
        let device = x.f.w1.device();
        let distance = match x.bias_by_distance {
            Some(far) => Some(distance_half(&f, far, span)?),
            None => None,
        };
        let qkv = x.qkv.map(|t| t.into_primitive().tensor());
        let bias = x.bias.map(|m| m.into_primitive().tensor());
        let row_scale = x.row_scale.map(|c| c.into_primitive().tensor());
        let out = run_forward(
            qkv.as_ref(),
            [bias.as_ref(), row_scale.as_ref()],
            dims,
            [x.scale],
            span,
            &f,
            x.budget,
            distance.as_ref(),
        )?;
        return cast(Tensor::<Nd, 4>::from_data(
            TensorData::new(out, out_dims(dims)),
            &device,
        ));
    }
    if applies_autodiff::<B>() && x.bias_by_distance.is_none() {
        return cast(record(cast_inputs::<B, Ad>(x)?, span)?);
    }
    None
}

/// Whether the shapes and element types fit the tile.
fn fits<B: Backend>(x: &DapeAttentionInputs<B>, span: &Span) -> bool {
    let h = x.heads;
    let Some([b, _, rows, keys, dh, _]) = tile_dims(x) else {
        return false;
    };
    let bias_fits = x.bias.as_ref().is_none_or(|m| {
        let [mb, mh, mr, mk] = m.dims();
        (mb == 1 || mb == b) && (mh, mr, mk) == (h, rows, keys)
    });
    let rows_fit = x.row_scale.as_ref().is_none_or(|c| c.dims() == [h, rows]);
    let by_distance = x.bias_by_distance.as_ref().is_none_or(|t| {
        let [th, n] = t.dims();
        let f32s = t.dtype() == burn::tensor::DType::F32;
        x.bias.is_none() && th == h && n >= span.query_start + rows && f32s
    });
    let channels = if x.bias.is_some() || x.bias_by_distance.is_some() {
        2 * h
    } else {
        h
    };
    let widths = x.f.dims(h).is_some_and(|[c, _, _]| c == channels);
    let f32s = x
        .qkv
        .iter()
        .into_iter()
        .chain(x.bias.as_ref())
        .all(|t| t.dtype() == burn::tensor::DType::F32)
        && x.row_scale
            .as_ref()
            .is_none_or(|t| t.dtype() == burn::tensor::DType::F32)
        && x.f.w1.dtype() == burn::tensor::DType::F32;
    h > 0 && dh > 0 && bias_fits && rows_fit && by_distance && widths && f32s
}

fn cast_inputs<B: Backend, C: Backend>(
    x: DapeAttentionInputs<B>,
) -> Option<DapeAttentionInputs<C>> {
    Some(DapeAttentionInputs {
        qkv: match x.qkv {
            Qkv::Separate([q, k, v]) => Qkv::Separate([cast(q)?, cast(k)?, cast(v)?]),
            Qkv::Packed(t) => Qkv::Packed(cast(t)?),
        },
        heads: x.heads,
        bias: cast_opt(x.bias)?,
        bias_by_distance: cast_opt(x.bias_by_distance)?,
        f: TileWeights {
            form: x.f.form,
            w1: cast(x.f.w1)?,
            b1: cast_opt(x.f.b1)?,
            w2: cast(x.f.w2)?,
            b2: cast_opt(x.f.b2)?,
            slope: x.f.slope,
        },
        row_scale: cast_opt(x.row_scale)?,
        scale: x.scale,
        budget: x.budget,
    })
}

/// `f`'s weights on the host (the shapes were checked by [`fits`]).
fn correction_of<B: Backend>(x: &DapeAttentionInputs<B>) -> Option<Correction> {
    let f = &x.f;
    let [c, d, h] = f.dims(x.heads)?;
    let (w1, b1) = (host(f.w1.clone())?, host_opt(&f.b1)?);
    let (w2, b2) = (host(f.w2.clone())?, host_opt(&f.b2)?);
    Some(match f.form {
        TileForm::V1 => Correction::V1(Mlp::new([c, d, h], w1, b1, w2, b2, f.slope)),
        TileForm::V2 {
            kernel,
            mask_future_hidden,
        } => Correction::V2(KeyConvs {
            dims: [c, d, h, kernel],
            w1,
            b1: b1.unwrap_or_else(|| vec![0.0; d]),
            w2,
            b2: b2.unwrap_or_else(|| vec![0.0; h]),
            slope: f.slope,
            mask_future_hidden,
        }),
    })
}

/// DAPE V1's bias and first layer by distance from `far` (`[H, n]`, see
/// [`DapeAttentionInputs::bias_by_distance`]); `None` for DAPE V2, over a span that is not
/// causal or whose tokens are not at their indices, or when `far` does not cover its rows.
fn distance_half(f: &Correction, far: Tensor<Nd, 2>, span: &Span) -> Option<DistanceHalf> {
    let Correction::V1(mlp) = f else {
        return None;
    };
    let [h, n] = far.dims();
    let fits = h == mlp.h && span.causal && span.positions.is_none();
    if !fits || span.query_start + span.query_len > n {
        return None;
    }
    DistanceHalf::new(mlp, &host(far)?, n)
}

/// `[batch, H, rows, keys, d_head, d_v]`; `None` when q, k and v do not fit together.
fn tile_dims<B: Backend>(x: &DapeAttentionInputs<B>) -> Option<[usize; 6]> {
    let h = x.heads;
    match &x.qkv {
        Qkv::Separate([q, k, v]) => {
            let [b, qh, rows, dh] = q.dims();
            let [kb, kh, keys, kdh] = k.dims();
            let [vb, vh, vkeys, dv] = v.dims();
            let agree = qh == h && (kb, kh, kdh) == (b, h, dh) && (vb, vh, vkeys) == (b, h, keys);
            agree.then_some([b, h, rows, keys, dh, dv])
        }
        Qkv::Packed(t) => {
            let [b, seq, packed, dh] = t.dims();
            (packed == 3 * h).then_some([b, h, seq, seq, dh, dh])
        }
    }
}

fn out_dims([b, h, rows, _, _, dv]: [usize; 6]) -> [usize; 4] {
    [b, rows, h, dv]
}

fn four([b, h, rows, keys, _, _]: [usize; 6]) -> [usize; 4] {
    [b, h, rows, keys]
}

/// q, k and v as `[batch, H, ·, ·]` views (the packed projection's parts through its strides);
/// `None` when a tensor is not `f32`.
fn views<'a>(
    qkv: Qkv<&'a burn_ndarray::NdArrayTensor>,
    heads: usize,
) -> Option<[ndarray::ArrayView4<'a, f32>; 3]> {
    Some(match qkv {
        Qkv::Separate([q, k, v]) => [view4(q)?, view4(k)?, view4(v)?],
        Qkv::Packed(t) => {
            let packed = view4(t)?;
            [0, 1, 2].map(|i| {
                packed
                    .slice_move(ndarray::s![.., .., i * heads..(i + 1) * heads, ..])
                    .permuted_axes([0, 2, 1, 3])
            })
        }
    })
}

/// The tile over the host values of q, k, v (read through their strides), the bias map and
/// the row factors; `None` when one is not `f32`.
#[allow(clippy::too_many_arguments)]
fn tile<'a>(
    qkv: Qkv<&'a burn_ndarray::NdArrayTensor>,
    [bias, row_scale]: [Option<&'a [f32]>; 2],
    dims: [usize; 6],
    [scale]: [f32; 1],
    span: &'a Span,
    f: &'a Correction,
    block: usize,
    distance: Option<&'a DistanceHalf>,
) -> Option<DapeTile<'a>> {
    let [q, k, v] = views(qkv, dims[1])?;
    Some(DapeTile {
        q,
        k,
        v,
        bias,
        dims,
        scale,
        span,
        f,
        row_scale,
        block,
        distance,
    })
}

/// The tile's forward pass, `[batch, rows, H, d_v]`; `None` when a tensor is not `f32`.
#[allow(clippy::too_many_arguments)]
fn run_forward(
    qkv: Qkv<&burn_ndarray::NdArrayTensor>,
    [bias, row_scale]: [Option<&burn_ndarray::NdArrayTensor>; 2],
    dims: [usize; 6],
    scale: [f32; 1],
    span: &Span,
    f: &Correction,
    budget: usize,
    distance: Option<&DistanceHalf>,
) -> Option<Vec<f32>> {
    let [bias, row_scale] = [host_values(bias)?, host_values(row_scale)?];
    let block = DapeTile::block_rows(four(dims), budget);
    let host = [bias.as_deref(), row_scale.as_deref()];
    Some(tile(qkv, host, dims, scale, span, f, block, distance)?.forward())
}

/// The row-major values of an optional tensor: `Some(None)` when absent, `None` when not `f32`.
fn host_values(
    t: Option<&burn_ndarray::NdArrayTensor>,
) -> Option<Option<std::borrow::Cow<'_, [f32]>>> {
    match t {
        Some(t) => row_major_values(t).map(Some),
        None => Some(None),
    }
}

/// What the node's backward pass reads: its inputs (shared, not copied).
#[derive(Debug)]
struct State {
    qkv: Qkv<burn_ndarray::NdArrayTensor>,
    bias: Option<burn_ndarray::NdArrayTensor>,
    row_scale: Option<burn_ndarray::NdArrayTensor>,
    dims: [usize; 6],
    block: usize,
    bias_maps: usize,
    scale: f32,
    span: Span,
    f: Correction,
    /// The shapes of `f`'s two weights (as the node's parents have them).
    weight_dims: [[usize; 2]; 2],
}

/// The forward pass on `Autodiff<NdArray<f32>>`, recorded as one node over q, k, v (or the
/// packed projection), the bias map, `f`'s four tensors and the row factors.
fn record(x: DapeAttentionInputs<Ad>, span: &Span) -> Option<Tensor<Ad, 4>> {
    let f = correction_of(&x)?;
    let dims = tile_dims(&x)?;
    let block = DapeTile::block_rows(four(dims), x.budget);
    let device = x.f.w1.device();
    let qkv = x
        .qkv
        .as_ref()
        .map(|t| t.clone().inner().into_primitive().tensor());
    let bias = x
        .bias
        .as_ref()
        .map(|m| m.clone().inner().into_primitive().tensor());
    let row_scale = x
        .row_scale
        .as_ref()
        .map(|c| c.clone().inner().into_primitive().tensor());
    let span = Span {
        positions: None,
        ..span.clone()
    };
    let out = run_forward(
        qkv.as_ref(),
        [bias.as_ref(), row_scale.as_ref()],
        dims,
        [x.scale],
        &span,
        &f,
        x.budget,
        None,
    )?;
    let out = Tensor::<Nd, 4>::from_data(TensorData::new(out, out_dims(dims)), &device)
        .into_primitive()
        .tensor();
    let bias_maps = x.bias.as_ref().map_or(0, |m| m.dims()[0]);
    let state = Arc::new(State {
        qkv,
        bias,
        row_scale,
        dims,
        block,
        bias_maps,
        scale: x.scale,
        span,
        f,
        weight_dims: [x.f.w1.dims(), x.f.w2.dims()],
    });
    let rest = [
        x.bias.map(prim),
        Some(prim(x.f.w1)),
        x.f.b1.map(prim),
        Some(prim(x.f.w2)),
        x.f.b2.map(prim),
        x.row_scale.map(prim),
    ];
    Some(match x.qkv {
        Qkv::Separate([q, k, v]) => {
            let [bias, w1, b1, w2, b2, c] = rest;
            let parents = [
                Some(prim(q)),
                Some(prim(k)),
                Some(prim(v)),
                bias,
                w1,
                b1,
                w2,
                b2,
                c,
            ];
            record_dape_node(SeparateBackward, parents, state, out, &device)
        }
        Qkv::Packed(t) => {
            let [bias, w1, b1, w2, b2, c] = rest;
            let parents = [Some(prim(t)), bias, w1, b1, w2, b2, c];
            record_dape_node(PackedBackward, parents, state, out, &device)
        }
    })
}

/// The backward pass of a node over separate q, k and v (nine parents).
#[derive(Debug)]
struct SeparateBackward;

/// The backward pass of a node over the packed projection (seven parents).
#[derive(Debug)]
struct PackedBackward;

impl Backward<Nd, 9> for SeparateBackward {
    type State = Arc<State>;

    fn backward(self, ops: Ops<Self::State, 9>, grads: &mut Gradients, _: &mut Checkpointer) {
        let st = Arc::clone(&ops.state);
        let mut g = tile_grads(&st, grads.consume::<Nd>(&ops.node));
        let [b, h, rows, keys, dh, dv] = st.dims;
        let mut values = vec![
            (std::mem::take(&mut g.q), vec![b, h, rows, dh]),
            (std::mem::take(&mut g.k), vec![b, h, keys, dh]),
            (std::mem::take(&mut g.v), vec![b, h, keys, dv]),
        ];
        values.extend(rest_grads(&st, g));
        register(ops.parents.map(|p| p.map(|n| n.id)), values, grads);
    }
}

impl Backward<Nd, 7> for PackedBackward {
    type State = Arc<State>;

    fn backward(self, ops: Ops<Self::State, 7>, grads: &mut Gradients, _: &mut Checkpointer) {
        let st = Arc::clone(&ops.state);
        let g = tile_grads(&st, grads.consume::<Nd>(&ops.node));
        let [b, h, seq, _, dh, _] = st.dims;
        let mut packed = vec![0.0f32; b * seq * 3 * h * dh];
        // [batch, H, seq, d] per part into [batch, seq, 3 · H, d].
        for (part, src) in [&g.q, &g.k, &g.v].into_iter().enumerate() {
            for (block, values) in src.chunks_exact(dh.max(1)).enumerate() {
                let (plane, r) = (block / seq.max(1), block % seq.max(1));
                let (bi, hh) = (plane / h, plane % h);
                let at = ((bi * seq + r) * 3 * h + part * h + hh) * dh;
                packed[at..at + dh].copy_from_slice(values);
            }
        }
        let mut values = vec![(packed, vec![b, seq, 3 * h, dh])];
        values.extend(rest_grads(&st, g));
        register(ops.parents.map(|p| p.map(|n| n.id)), values, grads);
    }
}

/// The tile's gradients for the node's output gradient `grad`.
fn tile_grads(st: &State, grad: burn_ndarray::NdArrayTensor) -> TileGrads {
    let read = |t| row_major_values(t).expect("the attention-DAPE node keeps f32 tensors");
    let bias = st.bias.as_ref().map(read);
    let row_scale = st.row_scale.as_ref().map(read);
    let g = read(&grad);
    tile(
        st.qkv.as_ref(),
        [bias.as_deref(), row_scale.as_deref()],
        st.dims,
        [st.scale],
        &st.span,
        &st.f,
        st.block,
        None,
    )
    .expect("the attention-DAPE node keeps f32 tensors")
    .backward(&g)
}

/// The gradients of the bias map, `f`'s four tensors and the row factors, with their shapes
/// (those of q, k and v are the caller's).
fn rest_grads(st: &State, g: TileGrads) -> [(Vec<f32>, Vec<usize>); 6] {
    let [_, h, rows, keys, _, _] = st.dims;
    let [w1_dims, w2_dims] = st.weight_dims.map(Vec::from);
    let [w1, b1, w2, b2] = g.weights;
    let [d, h_out] = [b1.len(), b2.len()];
    [
        (g.bias, vec![st.bias_maps, h, rows, keys]),
        (w1, w1_dims),
        (b1, vec![d]),
        (w2, w2_dims),
        (b2, vec![h_out]),
        (g.row_scale, vec![h, rows]),
    ]
}

impl<T> Qkv<T> {
    fn as_ref(&self) -> Qkv<&T> {
        match self {
            Qkv::Separate([q, k, v]) => Qkv::Separate([q, k, v]),
            Qkv::Packed(t) => Qkv::Packed(t),
        }
    }

    fn map<U>(self, f: impl Fn(T) -> U) -> Qkv<U> {
        match self {
            Qkv::Separate(parts) => Qkv::Separate(parts.map(f)),
            Qkv::Packed(t) => Qkv::Packed(f(t)),
        }
    }

    /// The tensors, in order.
    fn iter(&self) -> Vec<&T> {
        match self {
            Qkv::Separate(parts) => parts.iter().collect(),
            Qkv::Packed(t) => vec![t],
        }
    }
}
