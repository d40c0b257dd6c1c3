//! Fused CPU kernels for the ndarray backend, behind the same generic functions as the tensor
//! path, and the host-copy helpers they share with DAPE's kernels (`encoding/fused.rs`).
//!
//! A kernel runs when the backend is `NdArray<f32>` (evaluation) or `Autodiff<NdArray<f32>>`
//! (training, as one graph node with a hand-written backward pass), checked by type at run
//! time; every other backend, and the `ndarray` feature off, takes the tensor path. Each kernel
//! is tested against the tensor path in values and gradients.
//!
//! With the `tch` feature, LibTorch (`LibTorch<f32>`, with or without autodiff) gets PyTorch's
//! own fused kernels behind the same functions where Burn 0.21 does not reach them under
//! autodiff: exact GELU, LayerNorm (`native_layer_norm`), CPU flash attention, attention with a
//! learned bias, the softmax of adjusted logits, DAPE's correction and AdamW, each one graph
//! node or one in-place step (`kernel/torch.rs`; `tests/torch_kernels.rs` holds them to the
//! tensor path).

use burn::prelude::*;

/// Exact GELU, `x Φ(x)`, as one pass forward and one pass backward on ndarray (elementwise over
/// rayon chunks, in f32 with a branch-free `erfc`), PyTorch's exact GELU kernel forward and
/// backward on LibTorch, and [`crate::util::gelu_exact`] on every other backend. Same
/// function: the tests hold them to 1e-6.
pub fn gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    #[cfg(feature = "ndarray")]
    if x.dtype() == burn::tensor::DType::F32 {
        if applies::<B>() {
            if let Some(y) = gelu_nd(x.clone()) {
                return y;
            }
        } else if applies_autodiff::<B>() {
            if let Some(y) = gelu_autodiff(x.clone()) {
                return y;
            }
        }
    }
    #[cfg(feature = "tch")]
    if let Some(y) = torch::gelu(x.clone()) {
        return y;
    }
    crate::util::gelu_exact(x)
}

/// `x · weight + bias` over the last dimension of `x` `[.., d_in]`, with `weight`
/// `[d_in, d_out]` and `bias` `[d_out]` as Burn's `Linear` holds them, giving `[.., d_out]`.
///
/// Every leading dimension is one row of a single matrix product (`[rows, d_in] · [d_in,
/// d_out]`): Burn's `Linear` on a 3-d input runs one product per sequence and sums the weight
/// gradient's batch afterwards. On ndarray it is one graph node whose forward pass is one GEMM
/// (the `gemm` crate, threaded) onto the bias, and whose backward pass is one GEMM for the
/// input's gradient and one for the weight's, reading the transposed operands through their
/// strides instead of copying them, and one pass of column sums for the bias's. Every other
/// backend runs `burn::tensor::module::linear` on the flattened input: the same function (the
/// tests hold the two together in values and in every gradient).
pub fn linear<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, D> {
    #[cfg(feature = "ndarray")]
    if applies::<B>() || applies_autodiff::<B>() {
        let f32s = x.dtype() == burn::tensor::DType::F32
            && weight.dtype() == burn::tensor::DType::F32
            && bias
                .as_ref()
                .is_none_or(|b| b.dtype() == burn::tensor::DType::F32);
        if f32s && D >= 2 {
            let fused = if applies::<B>() {
                linear_nd(x.clone(), weight.clone(), bias.clone())
            } else {
                linear_autodiff(x.clone(), weight.clone(), bias.clone())
            };
            if let Some(y) = fused {
                return y;
            }
        }
    }
    linear_tensor(x, weight, bias)
}

/// [`linear`] by Burn's own op on `[rows, d_in]`: the tensor path.
pub fn linear_tensor<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, D> {
    let dims = x.dims();
    if D < 2 {
        return burn::tensor::module::linear(x, weight, bias);
    }
    let d_in = dims[D - 1];
    let rows = dims[..D - 1].iter().product::<usize>();
    let y = burn::tensor::module::linear(x.reshape([rows, d_in]), weight, bias);
    let mut out = dims;
    out[D - 1] = y.dims()[1];
    y.reshape(out)
}

/// A Burn `Linear` layer through [`linear`]: every token of `x` `[.., d_in]` in one product.
pub fn linear_layer<B: Backend, const D: usize>(
    layer: &burn::nn::Linear<B>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    linear(x, layer.weight.val(), layer.bias.as_ref().map(|b| b.val()))
}

/// Layer normalization over the last dimension of `x` `[.., d]`:
/// `(x − mean) / √(var + epsilon) · gamma + beta`, with the mean and the biased variance of each
/// row, and `gamma`, `beta` `[d]` (as `B::layer_norm`, which Burn's `LayerNorm` calls).
///
/// On ndarray it is one graph node: the forward pass is one pass per row (its mean and
/// reciprocal standard deviation are all it keeps besides the input), and the backward pass
/// one pass per row for the input's gradient, with the gradients of `gamma` and `beta` summed
/// over rayon tasks of rows. Burn's op is a composite of nine tensor ops (two of them means
/// whose backward passes fill a tensor of ones of the input's size). On LibTorch under autodiff
/// it is one node too: PyTorch's `native_layer_norm` forward and the closed-form backward from
/// its saved row statistics (Burn's autodiff would run the nine-op composite). Every other
/// backend runs `B::layer_norm` (native on LibTorch without autodiff): the tensor path, which
/// the tests hold these to in values and in every gradient. An input with a zero-sized last dimension, or whose `gamma`
/// does not match it, takes the tensor path too.
pub fn layer_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    gamma: Tensor<B, 1>,
    beta: Option<Tensor<B, 1>>,
    epsilon: f64,
) -> Tensor<B, D> {
    #[cfg(feature = "ndarray")]
    if applies::<B>() || applies_autodiff::<B>() {
        let d = x.dims()[D - 1];
        let f32s = [&x.dtype(), &gamma.dtype()]
            .into_iter()
            .chain(beta.as_ref().map(|b| b.dtype()).as_ref())
            .all(|t| *t == burn::tensor::DType::F32);
        let fits = d > 0 && gamma.dims()[0] == d && beta.as_ref().is_none_or(|b| b.dims()[0] == d);
        if f32s && fits {
            let fused = if applies::<B>() {
                layer_norm_nd(x.clone(), gamma.clone(), beta.clone(), epsilon)
            } else {
                layer_norm_autodiff(x.clone(), gamma.clone(), beta.clone(), epsilon)
            };
            if let Some(y) = fused {
                return y;
            }
        }
    }
    #[cfg(feature = "tch")]
    if let Some(y) = torch::layer_norm_autodiff(x.clone(), gamma.clone(), beta.clone(), epsilon) {
        return y;
    }
    layer_norm_tensor(x, gamma, beta, epsilon)
}

/// [`layer_norm`] by the backend's own op (`B::layer_norm`): the tensor path.
pub fn layer_norm_tensor<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    gamma: Tensor<B, 1>,
    beta: Option<Tensor<B, 1>>,
    epsilon: f64,
) -> Tensor<B, D> {
    use burn::tensor::TensorPrimitive;
    Tensor::from_primitive(TensorPrimitive::Float(B::layer_norm(
        x.into_primitive().tensor(),
        gamma.into_primitive().tensor(),
        beta.map(|b| b.into_primitive().tensor()),
        epsilon,
    )))
}

/// Whether [`attention`] has a kernel for backend `B`: ndarray or LibTorch (f32), with or
/// without autodiff.
pub fn attention_applies<B: Backend>() -> bool {
    #[cfg(feature = "ndarray")]
    if applies::<B>() || applies_autodiff::<B>() {
        return true;
    }
    #[cfg(feature = "tch")]
    if torch::applies_any::<B>() {
        return true;
    }
    false
}

/// Attention from the queries to the output in one kernel on ndarray:
/// `softmax(scale · q kᵀ + bias, causal mask) · v`, for `q` `[batch, heads, rows, d_head]`,
/// `k` `[batch, heads, keys, d_head]`, `v` `[batch, heads, keys, d_v]` and an optional additive
/// `bias` `[1 or batch, heads, rows, keys]`. With `causal_from = Some(q0)`, row `r` (absolute
/// position `q0 + r`) sees keys `0..=q0 + r`, as [`fused_softmax`] masks. The output is
/// `[batch, rows, heads, d_v]` (the heads side by side per row, ready for the output projection).
///
/// Each head is one rayon task over the batch: two GEMMs (the `gemm` crate) with the bias,
/// mask and softmax between them in one pass, q, k and v read through their strides (no
/// layout copies). Under autodiff it is one graph node, and the `[rows, keys]` probabilities
/// are never kept: the backward pass recomputes them per head and batch row, as FlashAttention
/// does, so the memory the node holds is its inputs and output. On LibTorch (CPU) it is
/// PyTorch's flash attention forward and backward, with the bias and the causal mask as one
/// float mask, or, for a bias that needs a gradient (which PyTorch's flash kernel does not
/// give), one node of PyTorch's matrix products and softmax kernels forward and backward.
/// `None` when no kernel applies (another backend or element type, mismatched shapes): the
/// caller takes the tensor path.
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    bias: Option<Tensor<B, 4>>,
    scale: f32,
    causal_from: Option<usize>,
) -> Option<Tensor<B, 4>> {
    let [b, h, rows, dh] = q.dims();
    let [kb, kh, keys, kdh] = k.dims();
    let [vb, vh, vkeys, _] = v.dims();
    let shapes_agree = (kb, kh, kdh) == (b, h, dh)
        && (vb, vh, vkeys) == (b, h, keys)
        && bias.as_ref().is_none_or(|t| {
            let [bb, bh, br, bk] = t.dims();
            (bb == 1 || bb == b) && (bh, br, bk) == (h, rows, keys)
        });
    let f32s = [&q, &k, &v]
        .into_iter()
        .chain(bias.as_ref())
        .all(|t| t.dtype() == burn::tensor::DType::F32);
    if !shapes_agree || !f32s {
        return None;
    }
    #[cfg(feature = "ndarray")]
    {
        if applies::<B>() {
            return attention_nd(q, k, v, bias, scale, causal_from);
        }
        if applies_autodiff::<B>() {
            return attention_autodiff(q, k, v, bias, scale, causal_from);
        }
    }
    #[cfg(feature = "tch")]
    if torch::applies_any::<B>() {
        return torch::attention(q, k, v, bias, scale, causal_from);
    }
    let _ = (q, k, v, bias, scale, causal_from);
    None
}

/// `a · b` over the last two dimensions, for `a: [n0, n1, m, k]` and `b: [n0, n1, k, n]` with
/// the same leading dimensions (no broadcasting). On ndarray, with or without autodiff: one
/// `gemm` call per pair of matrices, in parallel, reading strided operands (a transposed key
/// tensor, say) through their strides, and under autodiff one node whose backward pass is
/// `da = g · bᵀ` and `db = aᵀ · g` per pair. Elsewhere, and for other shapes or element types,
/// Burn's `matmul`. The attention layer's tensor path (the encodings that read or rewrite the
/// logits: DAPE, CoPE, Shaw, Transformer-XL, …) takes it for `q · kᵀ` and `P · V`.
pub fn batched_matmul<B: Backend>(a: Tensor<B, 4>, b: Tensor<B, 4>) -> Tensor<B, 4> {
    #[cfg(feature = "ndarray")]
    {
        let [a0, a1, _, ak] = a.dims();
        let [b0, b1, bk, _] = b.dims();
        let fits = (a0, a1, ak) == (b0, b1, bk)
            && a.dtype() == burn::tensor::DType::F32
            && b.dtype() == burn::tensor::DType::F32;
        let fused = if !fits {
            None
        } else if applies::<B>() {
            matmul_nd(a.clone(), b.clone())
        } else if applies_autodiff::<B>() {
            matmul_autodiff(a.clone(), b.clone())
        } else {
            None
        };
        if let Some(y) = fused {
            return y;
        }
    }
    a.matmul(b)
}

/// [`attention`] over queries, keys and values packed as one projection yields them: `qkv`
/// `[batch, seq, 3 · heads, d_head]` holds q's heads, then k's, then v's, and `bias` is
/// `[1 or batch, heads, seq, seq]`; every query row sees every key (or, with
/// `causal_from = Some(0)`, the keys up to its own). The output is `[batch, seq, heads, d_head]`.
///
/// The same kernel as [`attention`], reading q, k and v through their strides in `qkv`; under
/// autodiff it is one graph node whose parent is `qkv` itself, so the backward pass writes the
/// packed gradient at once. Split into three `narrow`s first, each of those ops' backward
/// passes fills a zero tensor of the packed size, copies its part in, and the three are then
/// added. On LibTorch q, k and v are views of `qkv` going into PyTorch's flash kernel (or the
/// learned-bias node), and the node's gradient is one copy into the packed layout. `None`
/// where no kernel applies (another backend or element type, `heads` not dividing
/// the third dimension by three, a bias of another shape): the caller splits and takes
/// [`attention`] or the tensor path.
pub fn attention_packed<B: Backend>(
    qkv: Tensor<B, 4>,
    heads: usize,
    bias: Option<Tensor<B, 4>>,
    scale: f32,
    causal_from: Option<usize>,
) -> Option<Tensor<B, 4>> {
    let [b, l, packed, _] = qkv.dims();
    let shapes_agree = heads > 0
        && packed == 3 * heads
        && causal_from.is_none_or(|q0| q0 == 0)
        && bias.as_ref().is_none_or(|t| {
            let [bb, bh, br, bk] = t.dims();
            (bb == 1 || bb == b) && (bh, br, bk) == (heads, l, l)
        });
    let f32s = std::iter::once(&qkv)
        .chain(bias.as_ref())
        .all(|t| t.dtype() == burn::tensor::DType::F32);
    if !shapes_agree || !f32s {
        return None;
    }
    #[cfg(feature = "ndarray")]
    {
        if applies::<B>() {
            return attention_packed_nd(qkv, heads, bias, scale, causal_from);
        }
        if applies_autodiff::<B>() {
            return attention_packed_autodiff(qkv, heads, bias, scale, causal_from);
        }
    }
    #[cfg(feature = "tch")]
    if torch::applies_any::<B>() {
        return torch::attention_packed(qkv, heads, bias, scale, causal_from);
    }
    let _ = (qkv, heads, bias, scale, causal_from);
    None
}

/// Whether [`distance_table_bias`] has a kernel for backend `B` (ndarray, with or without
/// autodiff).
pub fn distance_table_applies<B: Backend>() -> bool {
    #[cfg(feature = "ndarray")]
    return applies::<B>() || applies_autodiff::<B>();
    #[cfg(not(feature = "ndarray"))]
    false
}

/// A bias that depends on the distance alone, looked up from a per-head table:
/// `out[0, h, r, c] = table[h, |rows[r] - cols[c]|]` for `table` `[heads, n]` and the positions
/// `rows` of the query rows and `cols` of the key columns: `[1, heads, rows, keys]`. One pass on
/// ndarray, where building it from tensor ops would take one pass per op over every (row, key)
/// pair, with a transcendental function in one of them. Under autodiff (training) it is one
/// graph node whose parent is the table: its backward pass sums the bias's gradient per head
/// and distance, so the gradients of whatever the table was computed from (Kerple's `p` and
/// `a`) flow through the table's own `[heads, n]` ops. `None` elsewhere, or when a distance
/// reaches past the table: the caller builds the bias from tensor ops.
pub fn distance_table_bias<B: Backend>(
    table: Tensor<B, 2>,
    rows: &[i64],
    cols: &[i64],
) -> Option<Tensor<B, 4>> {
    #[cfg(feature = "ndarray")]
    if table.dtype() == burn::tensor::DType::F32 {
        if applies::<B>() {
            return distance_table_nd(table, rows, cols);
        }
        if applies_autodiff::<B>() {
            return distance_table_autodiff(table, rows, cols);
        }
    }
    #[cfg(not(feature = "ndarray"))]
    let _ = (table, rows, cols);
    None
}

/// Softmax over the keys of `logits` `[batch, heads, rows, keys]` as one fused pass forward and
/// one backward on ndarray (on LibTorch, PyTorch's softmax kernels as one graph node), with the
/// causal mask folded in: with `causal_from = Some(q0)`, row `r` (absolute position `q0 + r`)
/// sees keys `0..=q0 + r` and gets probability 0 elsewhere, as `mask_fill(-inf)` then `softmax`
/// give. `Err(logits)` hands the input back when no kernel applies (another backend or element
/// type, or neither the `ndarray` nor the `tch` feature on): the caller then takes the tensor
/// path.
pub fn fused_softmax<B: Backend>(
    logits: Tensor<B, 4>,
    causal_from: Option<usize>,
) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    #[cfg(feature = "ndarray")]
    if logits.dtype() == burn::tensor::DType::F32 {
        if applies::<B>() {
            if let Some(p) = softmax_nd(logits.clone(), causal_from) {
                return Ok(p);
            }
        } else if applies_autodiff::<B>() {
            if let Some(p) = softmax_autodiff(logits.clone(), causal_from) {
                return Ok(p);
            }
        }
    }
    #[cfg(feature = "tch")]
    if logits.dtype() == burn::tensor::DType::F32 && torch::applies_any::<B>() {
        if let Some(p) = torch::softmax(logits.clone(), causal_from) {
            return Ok(p);
        }
    }
    #[cfg(not(any(feature = "ndarray", feature = "tch")))]
    let _ = causal_from;
    Err(logits)
}

/// The negative log-likelihood of each target under the softmax of its row of logits:
/// `-log softmax(logits)[b, t, targets[b, t]]` for `logits` `[batch, seq, vocab]` and
/// `targets` `[batch, seq]`, giving `[batch, seq]` (the cross-entropy of each token).
///
/// On ndarray one graph node: one pass per row forward (the row's log-sum-exp is all it keeps
/// besides the logits), and one pass per row backward, `g · (softmax − onehot(target))`.
/// Burn's `log_softmax` and `gather` are six composite ops with a backward pass each, the
/// `gather`'s filling a zero tensor of the logits' size. Every other backend, and a target
/// outside `0..vocab`, takes that tensor path ([`token_nll_tensor`]); the tests hold the two
/// together in values and gradients.
pub fn token_nll<B: Backend>(logits: Tensor<B, 3>, targets: Tensor<B, 2, Int>) -> Tensor<B, 2> {
    #[cfg(feature = "ndarray")]
    if logits.dtype() == burn::tensor::DType::F32 && (applies::<B>() || applies_autodiff::<B>()) {
        let [b, l, vocab] = logits.dims();
        if targets.dims() == [b, l] && vocab > 0 {
            let picked: Option<Vec<usize>> = targets
                .clone()
                .into_data()
                .convert::<i64>()
                .to_vec::<i64>()
                .ok()
                .and_then(|t| {
                    t.into_iter()
                        .map(|t| usize::try_from(t).ok().filter(|&t| t < vocab))
                        .collect()
                });
            if let Some(picked) = picked {
                let fused = if applies::<B>() {
                    token_nll_nd(logits.clone(), &picked)
                } else {
                    token_nll_autodiff(logits.clone(), picked)
                };
                if let Some(y) = fused {
                    return y;
                }
            }
        }
    }
    token_nll_tensor(logits, targets)
}

/// [`token_nll`] by Burn's tensor ops (`log_softmax`, then `gather`): the tensor path.
pub fn token_nll_tensor<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
) -> Tensor<B, 2> {
    burn::tensor::activation::log_softmax(logits, 2)
        .gather(2, targets.unsqueeze_dim(2))
        .squeeze_dim::<2>(2)
        .neg()
}

/// The scalars of one AdamW step ([`crate::optim::FusedAdamW`]), shared by its fused kernel and
/// its tensor path.
#[derive(Clone, Copy, Debug)]
// Without ndarray or tch only the tensor path reads it (the clipping threshold).
#[cfg_attr(not(any(feature = "ndarray", feature = "tch")), allow(dead_code))]
pub(crate) struct AdamWStep {
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    /// `1 − lr · weight_decay`.
    pub decay: f32,
    pub lr: f32,
    /// `1 − beta_1^t` and `1 − beta_2^t` at this step's time `t`.
    pub correction_1: f32,
    pub correction_2: f32,
    pub clip_norm: Option<f32>,
}

/// One parameter's AdamW moments before a step: the steps taken, the first moment and the
/// second moment (`None` before the first step).
#[cfg(any(feature = "ndarray", feature = "tch"))]
pub(crate) type Moments<B, const D: usize> = Option<(usize, Tensor<B, D>, Tensor<B, D>)>;

/// What a fused AdamW step gives: the updated parameter and its two moments, or (`Err`) its
/// inputs unchanged, for the tensor path.
#[cfg(any(feature = "ndarray", feature = "tch"))]
#[allow(clippy::type_complexity)]
pub(crate) type AdamWResult<B, const D: usize> =
    Result<(Tensor<B, D>, Tensor<B, D>, Tensor<B, D>), (Tensor<B, D>, Tensor<B, D>, Moments<B, D>)>;

/// Whether a fused AdamW step takes these tensors: all `f32`, all of the parameter's shape.
#[cfg(any(feature = "ndarray", feature = "tch"))]
pub(crate) fn adamw_fits<B: Backend, const D: usize>(
    tensor: &Tensor<B, D>,
    grad: &Tensor<B, D>,
    moments: &Moments<B, D>,
) -> bool {
    let dims = tensor.dims();
    let fits = |t: &Tensor<B, D>| t.dtype() == burn::tensor::DType::F32 && t.dims() == dims;
    fits(tensor) && fits(grad) && moments.as_ref().is_none_or(|(_, m, v)| fits(m) && fits(v))
}

/// Moves a value to the type it is known to have (`None` if it has another).
#[cfg_attr(not(any(feature = "ndarray", feature = "tch")), allow(dead_code))]
pub(crate) fn cast<T: 'static, U: 'static>(x: T) -> Option<U> {
    (Box::new(x) as Box<dyn std::any::Any>)
        .downcast::<U>()
        .ok()
        .map(|u| *u)
}

/// [`cast`] of an optional value: `Some(None)` for `None`, `None` if it has another type.
#[cfg_attr(not(any(feature = "ndarray", feature = "tch")), allow(dead_code))]
pub(crate) fn cast_opt<T: 'static, U: 'static>(x: Option<T>) -> Option<Option<U>> {
    match x {
        Some(x) => cast(x).map(Some),
        None => Some(None),
    }
}

#[cfg(feature = "tch")]
mod torch;
#[cfg(feature = "tch")]
pub(crate) use torch::{adamw as adamw_tch, applies_any as applies_tch, dape_v1 as dape_v1_tch};

#[cfg(feature = "ndarray")]
pub(crate) use nd::*;

#[cfg(feature = "ndarray")]
mod nd {
    use std::any::TypeId;
    use std::sync::Arc;

    use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::NoCheckpointing};
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::backend::Autodiff;
    use burn::prelude::*;
    use burn::tensor::ops::FloatTensorOps;
    use burn::tensor::{DType, TensorData, TensorPrimitive};
    use rayon::prelude::*;

    use super::{adamw_fits, cast, cast_opt, AdamWResult, AdamWStep, Moments};

    /// The backend the kernels run on outside autodiff.
    pub(crate) type Nd = burn_ndarray::NdArray<f32>;
    /// The backend the kernels run on under autodiff.
    pub(crate) type Ad = Autodiff<Nd>;

    /// Whether `B` is `NdArray<f32>` (no autodiff).
    pub(crate) fn applies<B: Backend>() -> bool {
        TypeId::of::<B>() == TypeId::of::<Nd>()
    }

    /// Whether `B` is `Autodiff<NdArray<f32>>` (training on ndarray).
    pub(crate) fn applies_autodiff<B: Backend>() -> bool {
        TypeId::of::<B>() == TypeId::of::<Ad>()
    }

    /// Reads an `f32` tensor's values in row-major order (`None` for another element type). On
    /// ndarray this is one copy of the array's memory; `into_data` would walk the elements one
    /// by one whenever the array is shared (as a graph's tensors are).
    pub(crate) fn host<B: Backend, const D: usize>(x: Tensor<B, D>) -> Option<Vec<f32>> {
        if x.dtype() != DType::F32 {
            return None;
        }
        if applies::<B>() {
            let x: Tensor<Nd, D> = cast(x)?;
            return host_primitive(x.into_primitive().tensor());
        }
        x.into_data().into_vec::<f32>().ok()
    }

    /// Elements per rayon task of the elementwise kernels.
    const CHUNK: usize = 1 << 14;

    const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;

    /// `e^x` in f32 by Cephes' `expf` scheme: `x = k ln 2 + r` with `k` rounded to nearest
    /// (the 1.5·2²³ trick, not `round`, which is a libm call on baseline x86-64) and `ln 2` in
    /// two parts, a degree-5 polynomial for `e^r`, and `2^k` built from its bits. Within a few
    /// ulps of the true value; 0 below -88 (`-inf` included) and `inf` from about 88.4 (the true
    /// overflow is at 88.72); NaN stays NaN. Plain arithmetic and a select, so that a loop of it
    /// vectorizes: glibc's `expf` is one call per element.
    #[inline(always)]
    pub(super) fn exp(x: f32) -> f32 {
        const LOG2_E: f32 = std::f32::consts::LOG2_E;
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_4e-4;
        const ROUND: f32 = 12_582_912.0;
        let xc = x.clamp(-88.0, 88.0);
        let t = xc * LOG2_E + ROUND;
        let k = t - ROUND;
        let r = xc - k * LN2_HI - k * LN2_LO;
        let p = 1.987_569_1e-4f32;
        let p = p * r + 1.398_199_9e-3;
        let p = p * r + 8.333_452e-3;
        let p = p * r + 4.166_579_6e-2;
        let p = p * r + 1.666_666_5e-1;
        let p = p * r + 0.5;
        let y = p * r * r + r + 1.0;
        // `k` sits in the low bits of `t`'s mantissa: `2^k` from integer arithmetic on the
        // bits (an `as i32` cast saturates lane by lane and does not vectorize).
        let k_bits = t.to_bits().wrapping_sub(ROUND.to_bits());
        let scale = f32::from_bits(k_bits.wrapping_add(127) << 23);
        if x < -88.0 {
            0.0
        } else {
            y * scale
        }
    }

    /// `Φ(x) = (1 + erf(x / √2)) / 2` in f32, from `erfc(z)` for `z = |x| / √2` by the
    /// Chebyshev fit of Numerical Recipes (`erfcc`, fractional error under 1.2e-7 for every
    /// `z`): `Φ(x) = erfc(z) / 2` for negative `x` (no cancellation in the tail) and
    /// `1 − erfc(z) / 2` otherwise. One `exp` and no branch but a select, so that it runs at the
    /// speed of the elementwise pass ([`exp`]); libm's `erff` branches on the input's range. Plain
    /// multiply-adds: `mul_add` is a call to `fmaf` unless the build targets FMA.
    #[inline(always)]
    pub(super) fn phi(x: f32) -> f32 {
        let z = x.abs() * FRAC_1_SQRT_2;
        let t = 1.0 / (1.0 + 0.5 * z);
        let p = 0.170_872_77f32;
        let p = p * t + -0.822_152_23;
        let p = p * t + 1.488_515_9;
        let p = p * t + -1.135_204;
        let p = p * t + 0.278_868_07;
        let p = p * t + -0.186_288_06;
        let p = p * t + 0.096_784_18;
        let p = p * t + 0.374_091_96;
        let p = p * t + 1.000_023_7;
        let p = p * t + -1.265_512_2;
        let half_erfc = 0.5 * t * exp(p - z * z);
        if x < 0.0 {
            half_erfc
        } else {
            1.0 - half_erfc
        }
    }

    /// Defines `fn name(args) -> ret` whose body is compiled three times, for AVX-512, for AVX2
    /// and as built (SSE2 on baseline x86-64), and runs the widest that the CPU has (detected at
    /// run time). The elementwise loops of the kernels are plain arithmetic that the compiler
    /// vectorizes to the width it may use. A function, not a closure, so that the body is
    /// always inlined into the wide copies (a closure passed to a `#[target_feature]` function
    /// can stay a call of its own, compiled narrow).
    macro_rules! vectorized {
        ($(#[$attr:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
            $(#[$attr])*
            fn $name($($arg: $ty),*) $(-> $ret)? {
                #[inline(always)]
                fn plain($($arg: $ty),*) $(-> $ret)? $body
                #[cfg(target_arch = "x86_64")]
                {
                    #[target_feature(enable = "avx512f,avx2,fma")]
                    unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                        plain($($arg),*)
                    }
                    #[target_feature(enable = "avx2,fma")]
                    unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                        plain($($arg),*)
                    }
                    if std::arch::is_x86_feature_detected!("avx512f") {
                        // SAFETY: the CPU has AVX-512F (checked just above), and with it AVX2
                        // and FMA.
                        return unsafe { avx512($($arg),*) };
                    }
                    if std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                    {
                        // SAFETY: the CPU has AVX2 and FMA (checked just above).
                        return unsafe { avx2($($arg),*) };
                    }
                }
                plain($($arg),*)
            }
        };
    }

    vectorized! {
        fn gelu_chunk(y: &mut [f32], x: &[f32]) {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = x * phi(x);
            }
        }
    }

    fn gelu_forward(x: &[f32]) -> Vec<f32> {
        let mut y = vec![0.0f32; x.len()];
        y.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(y, x)| gelu_chunk(y, x));
        y
    }

    vectorized! {
        /// GELU and its derivative in one pass: `y = x Φ(x)`, `d = Φ(x) + x φ(x)`.
        fn gelu_and_slope_chunk(y: &mut [f32], d: &mut [f32], x: &[f32]) {
            const INV_SQRT_2PI: f32 = 0.398_942_3;
            for ((y, d), &x) in y.iter_mut().zip(d.iter_mut()).zip(x) {
                let p = phi(x);
                *y = x * p;
                *d = p + x * exp(-0.5 * x * x) * INV_SQRT_2PI;
            }
        }
    }

    /// GELU's values and its slope at `x` (what the backward pass multiplies by).
    fn gelu_forward_with_slope(x: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let mut y = vec![0.0f32; x.len()];
        let mut d = vec![0.0f32; x.len()];
        y.par_chunks_mut(CHUNK)
            .zip(d.par_chunks_mut(CHUNK))
            .zip(x.par_chunks(CHUNK))
            .for_each(|((y, d), x)| gelu_and_slope_chunk(y, d, x));
        (y, d)
    }

    vectorized! {
        fn mul_chunk(out: &mut [f32], a: &[f32], b: &[f32]) {
            for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
                *o = a * b;
            }
        }
    }

    /// `a ⊙ b`, elementwise over rayon chunks.
    fn mul_values(a: &[f32], b: &[f32]) -> Vec<f32> {
        let mut out = vec![0.0f32; a.len()];
        out.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
            .for_each(|(o, (a, b))| mul_chunk(o, a, b));
        out
    }

    fn to_nd<const D: usize>(
        values: Vec<f32>,
        dims: [usize; D],
        device: &burn_ndarray::NdArrayDevice,
    ) -> Tensor<Nd, D> {
        Tensor::from_data(TensorData::new(values, dims), device)
    }

    /// The forward kernel on `NdArray<f32>`.
    pub(super) fn gelu_nd<B: Backend, const D: usize>(x: Tensor<B, D>) -> Option<Tensor<B, D>> {
        let x: Tensor<Nd, D> = cast(x)?;
        let (dims, device) = (x.dims(), x.device());
        let y = gelu_forward(&row_major_values(&x.into_primitive().tensor())?);
        cast(to_nd(y, dims, &device))
    }

    /// [`super::distance_table_bias`] on `NdArray<f32>`: one task per (head, row).
    pub(super) fn distance_table_nd<B: Backend>(
        table: Tensor<B, 2>,
        rows: &[i64],
        cols: &[i64],
    ) -> Option<Tensor<B, 4>> {
        let table: Tensor<Nd, 2> = cast(table)?;
        let [h, n] = table.dims();
        let device = table.device();
        let out = distance_lookup(&host(table)?, h, n, rows, cols)?;
        cast(to_nd(out, [1, h, rows.len(), cols.len()], &device))
    }

    /// `[heads, rows, cols]` values `table[h, |rows[r] - cols[c]|]` (one task per head and
    /// row); `None` when a distance reaches past the table or `cols` is not sorted.
    fn distance_lookup(
        values: &[f32],
        h: usize,
        n: usize,
        rows: &[i64],
        cols: &[i64],
    ) -> Option<Vec<f32>> {
        let (lq, lk) = (rows.len(), cols.len());
        let (first, last) = (*cols.first()?, *cols.last()?);
        let reach = rows
            .iter()
            .map(|&p| (p - first).unsigned_abs().max((p - last).unsigned_abs()))
            .max()?;
        if reach as usize >= n || cols.windows(2).any(|w| w[0] > w[1]) || values.len() != h * n {
            return None;
        }
        let mut out = vec![0.0f32; h * lq * lk];
        out.par_chunks_mut(lk).enumerate().for_each(|(task, row)| {
            let (head, r) = (task / lq, task % lq);
            let tab = &values[head * n..(head + 1) * n];
            let p = rows[r];
            for (o, &c) in row.iter_mut().zip(cols) {
                *o = tab[(p - c).unsigned_abs() as usize];
            }
        });
        Some(out)
    }

    /// A matrix in borrowed or owned memory, read through its row and column strides (in
    /// elements, never negative): what the GEMM takes, so that a transposed operand is a
    /// swap of strides rather than a copy.
    pub(crate) struct Mat<'a> {
        data: std::borrow::Cow<'a, [f32]>,
        rows: usize,
        cols: usize,
        rs: usize,
        cs: usize,
    }

    impl<'a> Mat<'a> {
        /// A row-major `rows × cols` matrix.
        pub(crate) fn row_major(
            data: std::borrow::Cow<'a, [f32]>,
            rows: usize,
            cols: usize,
        ) -> Self {
            assert_eq!(data.len(), rows * cols, "matrix of {rows} x {cols}");
            Self {
                data,
                rows,
                cols,
                rs: cols,
                cs: 1,
            }
        }

        /// An array as the matrix `[product of the leading dims, last dim]`: borrowed when the
        /// array is row-major, or (two dimensions) any layout of non-negative strides that fills
        /// its memory; copied to row-major otherwise.
        fn of(view: ndarray::ArrayView<'a, f32, ndarray::IxDyn>) -> Self {
            let shape = view.shape().to_vec();
            let cols = shape.last().copied().unwrap_or(1);
            let rows = shape[..shape.len().saturating_sub(1)].iter().product();
            if shape.len() == 2 && view.strides().iter().all(|&s| s >= 0) {
                let (rs, cs) = (view.strides()[0] as usize, view.strides()[1] as usize);
                let start = view.as_ptr();
                if let Some(data) = view.to_slice_memory_order() {
                    // The first element is the lowest address when no stride is negative.
                    debug_assert_eq!(data.as_ptr(), start);
                    return Self {
                        data: std::borrow::Cow::Borrowed(data),
                        rows,
                        cols,
                        rs,
                        cs,
                    };
                }
            }
            let data = match view.to_slice() {
                Some(values) => std::borrow::Cow::Borrowed(values),
                None => std::borrow::Cow::Owned(view.iter().copied().collect()),
            };
            Self::row_major(data, rows, cols)
        }

        /// The values in row-major order: borrowed when the matrix already is, else copied.
        fn row_major_values(&self) -> std::borrow::Cow<'_, [f32]> {
            if self.cs == 1 && self.rs == self.cols {
                std::borrow::Cow::Borrowed(&self.data[..self.rows * self.cols])
            } else {
                std::borrow::Cow::Owned(
                    (0..self.rows)
                        .flat_map(|r| (0..self.cols).map(move |c| r * self.rs + c * self.cs))
                        .map(|at| self.data[at])
                        .collect(),
                )
            }
        }

        /// The transpose (no copy).
        pub(crate) fn t(&self) -> Mat<'_> {
            Mat {
                data: std::borrow::Cow::Borrowed(&self.data),
                rows: self.cols,
                cols: self.rows,
                rs: self.cs,
                cs: self.rs,
            }
        }

        /// Whether every element lies inside the memory.
        fn in_bounds(&self) -> bool {
            self.rows == 0
                || self.cols == 0
                || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
        }
    }

    /// `c = a · b + beta · c`, `c` row-major `a.rows × b.cols`.
    pub(crate) fn gemm(a: &Mat, b: &Mat, beta: f32, c: &mut [f32]) {
        gemm_alpha(1.0, a, b, beta, c)
    }

    /// `c = alpha · a · b + beta · c`, `c` row-major `a.rows × b.cols`.
    fn gemm_alpha(alpha: f32, a: &Mat, b: &Mat, beta: f32, c: &mut [f32]) {
        assert_eq!(c.len(), a.rows * b.cols, "output of a matrix product");
        // SAFETY: `c` is a live, initialised, exclusively borrowed buffer of the output's size.
        unsafe { gemm_raw(alpha, a, b, beta, c.as_mut_ptr()) }
    }

    /// `alpha · a · b` in a new row-major `a.rows × b.cols` buffer that the GEMM writes
    /// without its being zeroed first (the fills were 3% of a training step).
    pub(crate) fn gemm_new(alpha: f32, a: &Mat, b: &Mat) -> Vec<f32> {
        let n = a.rows * b.cols;
        let mut c: Vec<f32> = Vec::with_capacity(n);
        // SAFETY: `c` has room for `n` values and nothing else refers to it. With `beta = 0`
        // (`read_dst` false) `gemm` never reads `dst` and writes every one of its `n`
        // elements: zeros when the inner dimension is empty, `alpha · a · b` otherwise
        // (gemm-common 0.19's `gemm_basic_generic`: `alpha` is set to zero, so the first depth
        // block stores `lhs · rhs` without loading `dst`). So all `n` are initialised before
        // `set_len`.
        unsafe {
            gemm_raw(alpha, a, b, 0.0, c.as_mut_ptr());
            c.set_len(n);
        }
        c
    }

    /// `c = alpha · a · b + beta · c` into `c`, row-major `a.rows × b.cols`; with `beta = 0`
    /// the memory at `c` is only written.
    ///
    /// # Safety
    /// `c` must be valid for writes of `a.rows × b.cols` values, aliased by nothing else, and
    /// initialised when `beta != 0`.
    unsafe fn gemm_raw(alpha: f32, a: &Mat, b: &Mat, beta: f32, c: *mut f32) {
        assert_eq!(a.cols, b.rows, "inner dimensions of a matrix product");
        assert!(
            a.in_bounds() && b.in_bounds(),
            "matrix strides past the memory"
        );
        if a.rows == 0 || b.cols == 0 {
            return;
        }
        // Inside a rayon task (the attention node's heads) the product runs on that task's
        // thread; otherwise `gemm` splits it over rayon's pool (it keeps small products serial).
        let parallelism = if rayon::current_thread_index().is_some() {
            gemm::Parallelism::None
        } else {
            gemm::Parallelism::Rayon(0)
        };
        // SAFETY: the asserts above keep every element that the strides reach inside `a`'s
        // and `b`'s memory; the caller vouches for `c`. `gemm` computes
        // `dst = alpha · dst + beta · lhs · rhs` (its alpha and beta are BLAS's swapped) and
        // reads `dst` only when told to.
        unsafe {
            gemm::gemm(
                a.rows,
                b.cols,
                a.cols,
                c,
                1,
                b.cols as isize,
                beta != 0.0,
                a.data.as_ptr(),
                a.cs as isize,
                a.rs as isize,
                b.data.as_ptr(),
                b.cs as isize,
                b.rs as isize,
                beta,
                alpha,
                false,
                false,
                false,
                parallelism,
            );
        }
    }

    /// A view of an `f32` ndarray primitive's values (`None` for another element type).
    fn f32_view(
        x: &burn_ndarray::NdArrayTensor,
    ) -> Option<ndarray::ArrayView<'_, f32, ndarray::IxDyn>> {
        match x {
            burn_ndarray::NdArrayTensor::F32(storage) => Some(storage.view()),
            _ => None,
        }
    }

    /// `x · w + b`, row-major `[x.rows, w.cols]`: the bias is written first, and the GEMM adds
    /// onto it.
    fn linear_forward(x: &Mat, w: &Mat, b: Option<&[f32]>) -> Vec<f32> {
        let (rows, n) = (x.rows, w.cols);
        let mut y = match b {
            Some(b) => {
                assert_eq!(b.len(), n, "bias of a linear layer");
                let mut y = Vec::with_capacity(rows * n);
                for _ in 0..rows {
                    y.extend_from_slice(b);
                }
                y
            }
            None => return gemm_new(1.0, x, w),
        };
        gemm(x, w, 1.0, &mut y);
        y
    }

    /// Column sums of a row-major `rows × cols` matrix, over rayon tasks of rows.
    fn column_sums(g: &[f32], cols: usize) -> Vec<f32> {
        const ROWS: usize = 64;
        if cols == 0 {
            return Vec::new();
        }
        g.par_chunks(ROWS * cols)
            .map(|block| {
                let mut sums = vec![0.0f32; cols];
                for row in block.chunks_exact(cols) {
                    for (s, &v) in sums.iter_mut().zip(row) {
                        *s += v;
                    }
                }
                sums
            })
            .reduce(
                || vec![0.0f32; cols],
                |mut a, b| {
                    for (x, y) in a.iter_mut().zip(&b) {
                        *x += y;
                    }
                    a
                },
            )
    }

    /// The output shape of a linear layer on `x_dims`.
    fn linear_out<const D: usize>(x_dims: [usize; D], d_out: usize) -> [usize; D] {
        let mut out = x_dims;
        out[D - 1] = d_out;
        out
    }

    pub(super) fn linear_nd<B: Backend, const D: usize>(
        x: Tensor<B, D>,
        w: Tensor<B, 2>,
        b: Option<Tensor<B, 1>>,
    ) -> Option<Tensor<B, D>> {
        let x: Tensor<Nd, D> = cast(x)?;
        let w: Tensor<Nd, 2> = cast(w)?;
        let b: Option<Tensor<Nd, 1>> = cast_opt(b)?;
        let (dims, device) = (x.dims(), x.device());
        let d_out = w.dims()[1];
        let (x, w) = (x.into_primitive().tensor(), w.into_primitive().tensor());
        let b = b.map(|b| b.into_primitive().tensor());
        let y = linear_values(&x, &w, b.as_ref())?;
        cast(to_nd(y, linear_out(dims, d_out), &device))
    }

    /// The forward values from the primitives.
    fn linear_values(
        x: &burn_ndarray::NdArrayTensor,
        w: &burn_ndarray::NdArrayTensor,
        b: Option<&burn_ndarray::NdArrayTensor>,
    ) -> Option<Vec<f32>> {
        let xm = Mat::of(f32_view(x)?);
        let wm = Mat::of(f32_view(w)?);
        let bias = match b {
            Some(b) => Some(Mat::of(f32_view(b)?)),
            None => None,
        };
        Some(linear_forward(&xm, &wm, bias.as_ref().map(|b| &b.data[..])))
    }

    /// What a linear node keeps: its input and weight (shared, not copied).
    #[derive(Clone, Debug)]
    struct LinearState {
        x: burn_ndarray::NdArrayTensor,
        w: burn_ndarray::NdArrayTensor,
        x_dims: Vec<usize>,
    }

    /// Implements `Backward<Nd, N>` for `$node<N>` for each parent count `N` listed (a node
    /// with and without its optional last parent), each running `$backward(ops, grads)`.
    macro_rules! backward_for_parents {
        ($node:ident, $state:ty, $backward:ident, [$($n:literal),*]) => {
            $(impl Backward<Nd, $n> for $node<$n> {
                type State = $state;

                fn backward(self, ops: Ops<Self::State, $n>, grads: &mut Gradients, _: &mut Checkpointer) {
                    $backward(ops, grads);
                }
            })*
        };
    }

    /// What a distance-table node keeps: the positions and the table's shape.
    #[derive(Clone, Debug)]
    struct DistanceTableState {
        rows: Arc<Vec<i64>>,
        cols: Arc<Vec<i64>>,
        heads: usize,
        n: usize,
    }

    #[derive(Debug)]
    struct DistanceTableBackward<const N: usize>;

    fn distance_table_backward<const N: usize>(
        ops: Ops<DistanceTableState, N>,
        grads: &mut Gradients,
    ) {
        let grad = grads.consume::<Nd>(&ops.node);
        let Some(parent) = &ops.parents[0] else {
            return;
        };
        let s = &ops.state;
        let (lq, lk) = (s.rows.len(), s.cols.len());
        let g = Mat::of(f32_view(&grad).expect("the gradient of an f32 output is f32"));
        let g = g.row_major_values();
        // Per head: the gradient summed over the pairs at each distance.
        let mut dtable = vec![0.0f32; s.heads * s.n];
        dtable
            .par_chunks_mut(s.n.max(1))
            .enumerate()
            .for_each(|(head, acc)| {
                let block = &g[head * lq * lk..(head + 1) * lq * lk];
                for (row, &p) in block.chunks_exact(lk.max(1)).zip(s.rows.iter()) {
                    for (&x, &c) in row.iter().zip(s.cols.iter()) {
                        acc[(p - c).unsigned_abs() as usize] += x;
                    }
                }
            });
        let t = Nd::float_from_data(TensorData::new(dtable, [s.heads, s.n]), &Default::default());
        grads.register::<Nd>(parent.id, t);
    }

    backward_for_parents!(
        DistanceTableBackward,
        DistanceTableState,
        distance_table_backward,
        [1]
    );

    /// [`super::distance_table_bias`] on `Autodiff<NdArray<f32>>`: one node over the table.
    pub(super) fn distance_table_autodiff<B: Backend>(
        table: Tensor<B, 2>,
        rows: &[i64],
        cols: &[i64],
    ) -> Option<Tensor<B, 4>> {
        let table: Tensor<Ad, 2> = cast(table)?;
        let [h, n] = table.dims();
        let device = table.device();
        let table = table.into_primitive().tensor();
        let values = host_primitive(table.primitive.clone())?;
        let out = distance_lookup(&values, h, n, rows, cols)?;
        let out = to_nd(out, [1, h, rows.len(), cols.len()], &device)
            .into_primitive()
            .tensor();
        let state = DistanceTableState {
            rows: Arc::new(rows.to_vec()),
            cols: Arc::new(cols.to_vec()),
            heads: h,
            n,
        };
        let out = finish_node(
            DistanceTableBackward::<1>
                .prepare::<NoCheckpointing>([table.node])
                .compute_bound()
                .stateful(),
            state,
            out,
        );
        cast(Tensor::<Ad, 4>::from_primitive(TensorPrimitive::Float(out)))
    }

    /// The backward pass of a linear node with `N` parents (input, weight, and bias when
    /// there is one).
    #[derive(Debug)]
    struct LinearBackward<const N: usize>;

    fn linear_backward<const N: usize>(ops: Ops<LinearState, N>, grads: &mut Gradients) {
        let grad = grads.consume::<Nd>(&ops.node);
        let state = &ops.state;
        let g_view = f32_view(&grad).expect("the gradient of an f32 output is f32");
        let g = Mat::of(g_view.clone());
        let g = if g.cs == 1 && g.rs == g.cols {
            g
        } else {
            // Row-major for the column sums.
            let values = g_view.iter().copied().collect();
            Mat::row_major(std::borrow::Cow::Owned(values), g.rows, g.cols)
        };
        let x = Mat::of(f32_view(&state.x).expect("f32 input"));
        let w = Mat::of(f32_view(&state.w).expect("f32 weight"));
        let device = Default::default();
        let parents = ops.parents;
        if let Some(parent) = &parents[0] {
            let dx = gemm_new(1.0, &g, &w.t());
            let t = Nd::float_from_data(TensorData::new(dx, state.x_dims.clone()), &device);
            grads.register::<Nd>(parent.id, t);
        }
        if let Some(parent) = &parents[1] {
            let dw = gemm_new(1.0, &x.t(), &g);
            let t = Nd::float_from_data(TensorData::new(dw, [w.rows, w.cols]), &device);
            grads.register::<Nd>(parent.id, t);
        }
        if N == 3 {
            if let Some(parent) = &parents[N - 1] {
                let db = column_sums(&g.data, g.cols);
                let t = Nd::float_from_data(TensorData::new(db, [g.cols]), &device);
                grads.register::<Nd>(parent.id, t);
            }
        }
    }

    backward_for_parents!(LinearBackward, LinearState, linear_backward, [2, 3]);

    pub(super) fn linear_autodiff<B: Backend, const D: usize>(
        x: Tensor<B, D>,
        w: Tensor<B, 2>,
        b: Option<Tensor<B, 1>>,
    ) -> Option<Tensor<B, D>> {
        let x: Tensor<Ad, D> = cast(x)?;
        let w: Tensor<Ad, 2> = cast(w)?;
        let b: Option<Tensor<Ad, 1>> = cast_opt(b)?;
        let (dims, device) = (x.dims(), x.device());
        let d_out = w.dims()[1];
        let (x, w) = (x.into_primitive().tensor(), w.into_primitive().tensor());
        let b = b.map(|b| b.into_primitive().tensor());
        let y = linear_values(&x.primitive, &w.primitive, b.as_ref().map(|b| &b.primitive))?;
        let out = to_nd(y, linear_out(dims, d_out), &device)
            .into_primitive()
            .tensor();
        let state = LinearState {
            x: x.primitive,
            w: w.primitive,
            x_dims: dims.to_vec(),
        };
        let out = match b {
            Some(b) => finish_node(
                LinearBackward::<3>
                    .prepare::<NoCheckpointing>([x.node, w.node, b.node])
                    .compute_bound()
                    .stateful(),
                state,
                out,
            ),
            None => finish_node(
                LinearBackward::<2>
                    .prepare::<NoCheckpointing>([x.node, w.node])
                    .compute_bound()
                    .stateful(),
                state,
                out,
            ),
        };
        cast(Tensor::<Ad, D>::from_primitive(TensorPrimitive::Float(out)))
    }

    /// Records a stateful node of `N` parents: `out` with its backward pass and `state` when a
    /// parent is tracked, `out` alone otherwise.
    pub(crate) fn finish_node<BW: Backward<Nd, N>, const N: usize>(
        kind: OpsKind<BW, Nd, BW::State, NoCheckpointing, N>,
        state: BW::State,
        out: burn::tensor::ops::FloatTensor<Nd>,
    ) -> burn::tensor::ops::FloatTensor<Ad> {
        match kind {
            OpsKind::Tracked(prep) => prep.finish(state, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    /// The sum of `x` over sixteen running sums (so that it vectorizes: one running sum is a
    /// chain of dependent adds).
    #[inline(always)]
    pub(crate) fn lane_sum(x: &[f32]) -> f32 {
        let mut acc = [0.0f32; 16];
        let chunks = x.chunks_exact(16);
        let tail: f32 = chunks.remainder().iter().sum();
        for c in chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += v;
            }
        }
        acc.iter().sum::<f32>() + tail
    }

    /// The largest of `x` (`-inf` when empty) over sixteen running maxima.
    #[inline(always)]
    fn lane_max(x: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; 16];
        let chunks = x.chunks_exact(16);
        let tail = chunks
            .remainder()
            .iter()
            .copied()
            .fold(f32::NEG_INFINITY, f32::max);
        for c in chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a = if v > *a { v } else { *a };
            }
        }
        acc.iter().copied().fold(tail, f32::max)
    }

    /// `Σ (x − mean)²` over sixteen running sums.
    #[inline(always)]
    fn lane_sum_sq_dev(x: &[f32], mean: f32) -> f32 {
        let mut acc = [0.0f32; 16];
        let chunks = x.chunks_exact(16);
        let tail: f32 = chunks
            .remainder()
            .iter()
            .map(|&v| (v - mean) * (v - mean))
            .sum();
        for c in chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += (v - mean) * (v - mean);
            }
        }
        acc.iter().sum::<f32>() + tail
    }

    /// `Σ x ⊙ y` over sixteen running sums.
    #[inline(always)]
    fn lane_dot(x: &[f32], y: &[f32]) -> f32 {
        let mut acc = [0.0f32; 16];
        let (cx, cy) = (x.chunks_exact(16), y.chunks_exact(16));
        let tail: f32 = cx
            .remainder()
            .iter()
            .zip(cy.remainder())
            .map(|(a, b)| a * b)
            .sum();
        for (a16, b16) in cx.zip(cy) {
            for ((a, &u), &v) in acc.iter_mut().zip(a16).zip(b16) {
                *a += u * v;
            }
        }
        acc.iter().sum::<f32>() + tail
    }

    /// Rows of a layer-norm block per rayon task.
    const NORM_ROWS: usize = 32;

    vectorized! {
        /// The forward pass over whole rows of `d = gamma.len()` values: `y` and each row's
        /// `[mean, 1 / √(var + eps)]`.
        fn layer_norm_rows(
            x: &[f32],
            y: &mut [f32],
            stats: &mut [[f32; 2]],
            gamma: &[f32],
            beta: Option<&[f32]>,
            eps: f32,
        ) {
            let d = gamma.len();
            for ((xr, yr), st) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)).zip(stats) {
                let mean = lane_sum(xr) / d as f32;
                let rstd = 1.0 / (lane_sum_sq_dev(xr, mean) / d as f32 + eps).sqrt();
                *st = [mean, rstd];
                match beta {
                    Some(beta) => {
                        for (((y, &x), &g), &b) in yr.iter_mut().zip(xr).zip(gamma).zip(beta) {
                            *y = (x - mean) * rstd * g + b;
                        }
                    }
                    None => {
                        for ((y, &x), &g) in yr.iter_mut().zip(xr).zip(gamma) {
                            *y = (x - mean) * rstd * g;
                        }
                    }
                }
            }
        }
    }

    vectorized! {
        /// The backward pass over whole rows: `dx = rstd · (ĝ − mean(ĝ) − x̂ · mean(ĝ ⊙ x̂))`
        /// with `ĝ = g ⊙ gamma`, and `Σ g ⊙ x̂`, `Σ g` added into `dgamma`, `dbeta`.
        fn layer_norm_grad_rows(
            x: &[f32],
            g: &[f32],
            stats: &[[f32; 2]],
            gamma: &[f32],
            dx: &mut [f32],
            dgamma: &mut [f32],
            dbeta: &mut [f32],
        ) {
            let d = gamma.len();
            let mut xhat = vec![0.0f32; d];
            let mut gh = vec![0.0f32; d];
            let rows = x.chunks_exact(d).zip(g.chunks_exact(d));
            for (((xr, gr), dxr), &[mean, rstd]) in rows.zip(dx.chunks_exact_mut(d)).zip(stats) {
                for ((((xh, h), &x), &gv), &ga) in
                    xhat.iter_mut().zip(gh.iter_mut()).zip(xr).zip(gr).zip(gamma)
                {
                    *xh = (x - mean) * rstd;
                    *h = gv * ga;
                }
                let a = lane_sum(&gh) / d as f32;
                let b = lane_dot(&gh, &xhat) / d as f32;
                for (((dx, &h), &xh), ((dga, dbe), &gv)) in dxr
                    .iter_mut()
                    .zip(&gh)
                    .zip(&xhat)
                    .zip(dgamma.iter_mut().zip(dbeta.iter_mut()).zip(gr))
                {
                    *dx = rstd * (h - a - xh * b);
                    *dga += gv * xh;
                    *dbe += gv;
                }
            }
        }
    }

    /// The values of a primitive in row-major order, borrowed when it is row-major already.
    pub(crate) fn row_major_values(
        x: &burn_ndarray::NdArrayTensor,
    ) -> Option<std::borrow::Cow<'_, [f32]>> {
        let view = f32_view(x)?;
        Some(match view.to_slice() {
            Some(values) => std::borrow::Cow::Borrowed(values),
            None => std::borrow::Cow::Owned(view.iter().copied().collect()),
        })
    }

    /// The forward pass: the output and each row's `[mean, rstd]`.
    fn layer_norm_values(
        x: &burn_ndarray::NdArrayTensor,
        gamma: &burn_ndarray::NdArrayTensor,
        beta: Option<&burn_ndarray::NdArrayTensor>,
        eps: f64,
    ) -> Option<(Vec<f32>, Vec<[f32; 2]>)> {
        let x = row_major_values(x)?;
        let gamma = row_major_values(gamma)?;
        let beta = match beta {
            Some(b) => Some(row_major_values(b)?),
            None => None,
        };
        let d = gamma.len();
        let rows = x.len() / d;
        let mut y = vec![0.0f32; x.len()];
        let mut stats = vec![[0.0f32; 2]; rows];
        y.par_chunks_mut(NORM_ROWS * d)
            .zip(x.par_chunks(NORM_ROWS * d))
            .zip(stats.par_chunks_mut(NORM_ROWS))
            .for_each(|((y, x), st)| {
                layer_norm_rows(x, y, st, &gamma, beta.as_deref(), eps as f32)
            });
        Some((y, stats))
    }

    pub(super) fn layer_norm_nd<B: Backend, const D: usize>(
        x: Tensor<B, D>,
        gamma: Tensor<B, 1>,
        beta: Option<Tensor<B, 1>>,
        eps: f64,
    ) -> Option<Tensor<B, D>> {
        let x: Tensor<Nd, D> = cast(x)?;
        let gamma: Tensor<Nd, 1> = cast(gamma)?;
        let beta: Option<Tensor<Nd, 1>> = cast_opt(beta)?;
        let (dims, device) = (x.dims(), x.device());
        let beta = beta.map(|b| b.into_primitive().tensor());
        let (y, _) = layer_norm_values(
            &x.into_primitive().tensor(),
            &gamma.into_primitive().tensor(),
            beta.as_ref(),
            eps,
        )?;
        cast(to_nd(y, dims, &device))
    }

    /// What a layer-norm node keeps: its input and `gamma` (shared, not copied) and each row's
    /// `[mean, rstd]`.
    #[derive(Clone, Debug)]
    struct LayerNormState {
        x: burn_ndarray::NdArrayTensor,
        gamma: burn_ndarray::NdArrayTensor,
        stats: Arc<Vec<[f32; 2]>>,
        dims: Vec<usize>,
    }

    /// The backward pass of a layer-norm node with `N` parents (input, gamma, and beta when
    /// there is one).
    #[derive(Debug)]
    struct LayerNormBackward<const N: usize>;

    fn layer_norm_backward<const N: usize>(ops: Ops<LayerNormState, N>, grads: &mut Gradients) {
        let grad = grads.consume::<Nd>(&ops.node);
        let state = &ops.state;
        let g = row_major_values(&grad).expect("the gradient of an f32 output is f32");
        let x = row_major_values(&state.x).expect("f32 input");
        let gamma = row_major_values(&state.gamma).expect("f32 gamma");
        let d = gamma.len();
        let mut dx = vec![0.0f32; x.len()];
        let (dgamma, dbeta) = dx
            .par_chunks_mut(NORM_ROWS * d)
            .zip(x.par_chunks(NORM_ROWS * d).zip(g.par_chunks(NORM_ROWS * d)))
            .zip(state.stats.par_chunks(NORM_ROWS))
            .map(|((dx, (x, g)), st)| {
                let (mut dga, mut dbe) = (vec![0.0f32; d], vec![0.0f32; d]);
                layer_norm_grad_rows(x, g, st, &gamma, dx, &mut dga, &mut dbe);
                (dga, dbe)
            })
            .reduce(
                || (vec![0.0f32; d], vec![0.0f32; d]),
                |(mut a, mut b), (c, e)| {
                    a.iter_mut().zip(&c).for_each(|(a, c)| *a += c);
                    b.iter_mut().zip(&e).for_each(|(b, e)| *b += e);
                    (a, b)
                },
            );
        let device = Default::default();
        let parents = ops.parents;
        let mut register = |i: usize, values: Vec<f32>, dims: Vec<usize>| {
            if let Some(parent) = &parents[i] {
                let t = Nd::float_from_data(TensorData::new(values, dims), &device);
                grads.register::<Nd>(parent.id, t);
            }
        };
        register(0, dx, state.dims.clone());
        register(1, dgamma, vec![d]);
        if N == 3 {
            register(N - 1, dbeta, vec![d]);
        }
    }

    backward_for_parents!(
        LayerNormBackward,
        LayerNormState,
        layer_norm_backward,
        [2, 3]
    );

    pub(super) fn layer_norm_autodiff<B: Backend, const D: usize>(
        x: Tensor<B, D>,
        gamma: Tensor<B, 1>,
        beta: Option<Tensor<B, 1>>,
        eps: f64,
    ) -> Option<Tensor<B, D>> {
        let x: Tensor<Ad, D> = cast(x)?;
        let gamma: Tensor<Ad, 1> = cast(gamma)?;
        let beta: Option<Tensor<Ad, 1>> = cast_opt(beta)?;
        let (dims, device) = (x.dims(), x.device());
        let (x, gamma) = (x.into_primitive().tensor(), gamma.into_primitive().tensor());
        let beta = beta.map(|b| b.into_primitive().tensor());
        let (y, stats) = layer_norm_values(
            &x.primitive,
            &gamma.primitive,
            beta.as_ref().map(|b| &b.primitive),
            eps,
        )?;
        let out = to_nd(y, dims, &device).into_primitive().tensor();
        let state = LayerNormState {
            x: x.primitive,
            gamma: gamma.primitive,
            stats: Arc::new(stats),
            dims: dims.to_vec(),
        };
        let out = match beta {
            Some(b) => finish_node(
                LayerNormBackward::<3>
                    .prepare::<NoCheckpointing>([x.node, gamma.node, b.node])
                    .compute_bound()
                    .stateful(),
                state,
                out,
            ),
            None => finish_node(
                LayerNormBackward::<2>
                    .prepare::<NoCheckpointing>([x.node, gamma.node])
                    .compute_bound()
                    .stateful(),
                state,
                out,
            ),
        };
        cast(Tensor::<Ad, D>::from_primitive(TensorPrimitive::Float(out)))
    }

    /// A 2-d view as a matrix without copying (non-negative strides), or copied to row-major.
    fn view2<'a>(view: ndarray::ArrayView2<'a, f32>) -> Mat<'a> {
        let (rows, cols) = view.dim();
        let strides = view.strides();
        if rows == 0 || cols == 0 || strides.iter().any(|&s| s < 0) {
            let values = view.iter().copied().collect();
            return Mat::row_major(std::borrow::Cow::Owned(values), rows, cols);
        }
        let (rs, cs) = (strides[0] as usize, strides[1] as usize);
        let span = (rows - 1) * rs + (cols - 1) * cs + 1;
        // SAFETY: with non-negative strides, the view's first element is its lowest address and
        // its last (rows - 1, cols - 1) its highest; every address between lies in the same
        // allocation (the array's buffer), is initialised, and is not written while the view
        // borrows the array.
        let data = unsafe { std::slice::from_raw_parts(view.as_ptr(), span) };
        Mat {
            data: std::borrow::Cow::Borrowed(data),
            rows,
            cols,
            rs,
            cs,
        }
    }

    /// `c = alpha · a · b` (row-major `c`, overwritten).
    fn gemm_scaled(alpha: f32, a: &Mat, b: &Mat, c: &mut [f32]) {
        gemm_alpha(alpha, a, b, 0.0, c);
    }

    /// The operands of one attention call, as 4-d views.
    struct AttentionViews<'a> {
        q: ndarray::ArrayView4<'a, f32>,
        k: ndarray::ArrayView4<'a, f32>,
        v: ndarray::ArrayView4<'a, f32>,
        bias: Option<ndarray::ArrayView4<'a, f32>>,
        scale: f32,
        causal_from: Option<usize>,
    }

    fn view4(x: &burn_ndarray::NdArrayTensor) -> Option<ndarray::ArrayView4<'_, f32>> {
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
        fn dims(&self) -> (usize, usize, usize, usize, usize, usize) {
            let (b, h, rows, dh) = self.q.dim();
            (b, h, rows, self.k.dim().2, dh, self.v.dim().3)
        }

        /// The probabilities of head `hi`, batch row `bi`: `[rows, keys]`, row-major, 0 at
        /// masked keys.
        fn probs(&self, bi: usize, hi: usize) -> Vec<f32> {
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
        fn forward(&self) -> Vec<f32> {
            use ndarray::s;
            let (b, h, rows, keys, _, dv) = self.dims();
            let per_head: Vec<Vec<f32>> = (0..h)
                .into_par_iter()
                .map(|hi| {
                    let mut out = vec![0.0f32; b * rows * dv];
                    for bi in 0..b {
                        let p =
                            Mat::row_major(std::borrow::Cow::Owned(self.probs(bi, hi)), rows, keys);
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
        fn backward(
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
        /// [`packed_views`] reads them), and the bias's (its own shape, if wanted).
        fn backward_packed(
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
        fn head_grads(
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
        })
    }

    fn attention_out_dims(q: [usize; 4], v: [usize; 4]) -> [usize; 4] {
        [q[0], q[2], q[1], v[3]]
    }

    pub(super) fn attention_nd<B: Backend>(
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        bias: Option<Tensor<B, 4>>,
        scale: f32,
        causal_from: Option<usize>,
    ) -> Option<Tensor<B, 4>> {
        let (q, k, v): (Tensor<Nd, 4>, Tensor<Nd, 4>, Tensor<Nd, 4>) =
            (cast(q)?, cast(k)?, cast(v)?);
        let bias: Option<Tensor<Nd, 4>> = cast_opt(bias)?;
        let (dims, device) = (attention_out_dims(q.dims(), v.dims()), q.device());
        let [q, k, v] = [q, k, v].map(|t| t.into_primitive().tensor());
        let bias = bias.map(|t| t.into_primitive().tensor());
        let y = attention_views(&q, &k, &v, bias.as_ref(), scale, causal_from)?.forward();
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
    }

    /// The backward pass of an attention node with `N` parents (q, k, v, and the bias when
    /// there is one).
    #[derive(Debug)]
    struct AttentionBackward<const N: usize>;

    fn attention_backward<const N: usize>(ops: Ops<AttentionState, N>, grads: &mut Gradients) {
        let grad = grads.consume::<Nd>(&ops.node);
        let s = &ops.state;
        let views = attention_views(&s.q, &s.k, &s.v, s.bias.as_ref(), s.scale, s.causal_from)
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

    pub(super) fn attention_autodiff<B: Backend>(
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        bias: Option<Tensor<B, 4>>,
        scale: f32,
        causal_from: Option<usize>,
    ) -> Option<Tensor<B, 4>> {
        let (q, k, v): (Tensor<Ad, 4>, Tensor<Ad, 4>, Tensor<Ad, 4>) =
            (cast(q)?, cast(k)?, cast(v)?);
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

    /// q, k and v `[batch, heads, seq, d_head]` as strided views of a packed
    /// `[batch, seq, 3 · heads, d_head]` projection (no copies).
    fn packed_views<'a>(
        qkv: &'a burn_ndarray::NdArrayTensor,
        heads: usize,
        bias: Option<&'a burn_ndarray::NdArrayTensor>,
        scale: f32,
        causal_from: Option<usize>,
    ) -> Option<AttentionViews<'a>> {
        use ndarray::s;
        let packed = view4(qkv)?;
        if heads == 0 || packed.dim().2 != 3 * heads {
            return None;
        }
        let [q, k, v] = [0, 1, 2].map(|i| {
            packed
                .slice_move(s![.., .., i * heads..(i + 1) * heads, ..])
                .permuted_axes([0, 2, 1, 3])
        });
        Some(AttentionViews {
            q,
            k,
            v,
            bias: match bias {
                Some(t) => Some(view4(t)?),
                None => None,
            },
            scale,
            causal_from,
        })
    }

    fn packed_out_dims(qkv: [usize; 4], heads: usize) -> [usize; 4] {
        [qkv[0], qkv[1], heads, qkv[3]]
    }

    pub(super) fn attention_packed_nd<B: Backend>(
        qkv: Tensor<B, 4>,
        heads: usize,
        bias: Option<Tensor<B, 4>>,
        scale: f32,
        causal_from: Option<usize>,
    ) -> Option<Tensor<B, 4>> {
        let qkv: Tensor<Nd, 4> = cast(qkv)?;
        let bias: Option<Tensor<Nd, 4>> = cast_opt(bias)?;
        let (dims, device) = (packed_out_dims(qkv.dims(), heads), qkv.device());
        let qkv = qkv.into_primitive().tensor();
        let bias = bias.map(|t| t.into_primitive().tensor());
        let y = packed_views(&qkv, heads, bias.as_ref(), scale, causal_from)?.forward();
        cast(to_nd(y, dims, &device))
    }

    /// What a packed attention node keeps: its inputs and output (shared, not copied).
    #[derive(Clone, Debug)]
    struct PackedAttentionState {
        qkv: burn_ndarray::NdArrayTensor,
        heads: usize,
        bias: Option<burn_ndarray::NdArrayTensor>,
        out: burn_ndarray::NdArrayTensor,
        scale: f32,
        causal_from: Option<usize>,
    }

    /// The backward pass of a packed attention node with `N` parents (the packed q, k, v, and
    /// the bias when there is one).
    #[derive(Debug)]
    struct PackedAttentionBackward<const N: usize>;

    fn packed_attention_backward<const N: usize>(
        ops: Ops<PackedAttentionState, N>,
        grads: &mut Gradients,
    ) {
        let grad = grads.consume::<Nd>(&ops.node);
        let s = &ops.state;
        let views = packed_views(&s.qkv, s.heads, s.bias.as_ref(), s.scale, s.causal_from)
            .expect("a packed attention node keeps an f32 4-d input");
        let bias_grad = N == 2 && ops.parents[N - 1].is_some();
        let o = view4(&s.out).expect("f32 output");
        let g = view4(&grad).expect("the gradient of an f32 output is f32");
        let [dqkv, dbias] = views.backward_packed(o, g, bias_grad);
        let device = Default::default();
        if let Some(parent) = &ops.parents[0] {
            let shape = view4(&s.qkv).expect("f32 input").shape().to_vec();
            let t = Nd::float_from_data(TensorData::new(dqkv, shape), &device);
            grads.register::<Nd>(parent.id, t);
        }
        if let (true, Some(parent), Some(bias)) = (
            bias_grad,
            ops.parents.get(1).and_then(|p| p.as_ref()),
            &views.bias,
        ) {
            let t = Nd::float_from_data(TensorData::new(dbias, bias.shape().to_vec()), &device);
            grads.register::<Nd>(parent.id, t);
        }
    }

    backward_for_parents!(
        PackedAttentionBackward,
        PackedAttentionState,
        packed_attention_backward,
        [1, 2]
    );

    pub(super) fn attention_packed_autodiff<B: Backend>(
        qkv: Tensor<B, 4>,
        heads: usize,
        bias: Option<Tensor<B, 4>>,
        scale: f32,
        causal_from: Option<usize>,
    ) -> Option<Tensor<B, 4>> {
        let qkv: Tensor<Ad, 4> = cast(qkv)?;
        let bias: Option<Tensor<Ad, 4>> = cast_opt(bias)?;
        let (dims, device) = (packed_out_dims(qkv.dims(), heads), qkv.device());
        let qkv = qkv.into_primitive().tensor();
        let bias = bias.map(|t| t.into_primitive().tensor());
        let y = packed_views(
            &qkv.primitive,
            heads,
            bias.as_ref().map(|t| &t.primitive),
            scale,
            causal_from,
        )?
        .forward();
        let out = to_nd(y, dims, &device).into_primitive().tensor();
        let state = PackedAttentionState {
            qkv: qkv.primitive,
            heads,
            bias: bias.as_ref().map(|t| t.primitive.clone()),
            out: out.clone(),
            scale,
            causal_from,
        };
        let out = match bias {
            Some(t) => finish_node(
                PackedAttentionBackward::<2>
                    .prepare::<NoCheckpointing>([qkv.node, t.node])
                    .compute_bound()
                    .stateful(),
                state,
                out,
            ),
            None => finish_node(
                PackedAttentionBackward::<1>
                    .prepare::<NoCheckpointing>([qkv.node])
                    .compute_bound()
                    .stateful(),
                state,
                out,
            ),
        };
        cast(Tensor::<Ad, 4>::from_primitive(TensorPrimitive::Float(out)))
    }

    /// Rows of logits per rayon task of the token NLL kernel.
    const NLL_ROWS: usize = 32;

    vectorized! {
        /// Each row's log-sum-exp as its max and `ln Σ exp(x − max)` (`lse`, kept apart so
        /// that `x − max` stays exact), and the NLL of its target (`nll`), for row-major
        /// `rows × cols` logits `x`.
        fn nll_rows(
            x: &[f32],
            cols: usize,
            targets: &[usize],
            lse: &mut [[f32; 2]],
            nll: &mut [f32],
        ) {
            let mut e = vec![0.0f32; cols];
            for (((row, &t), l), n) in x
                .chunks_exact(cols)
                .zip(targets)
                .zip(lse.iter_mut())
                .zip(nll.iter_mut())
            {
                let max = lane_max(row);
                for (e, &v) in e.iter_mut().zip(row) {
                    *e = exp(v - max);
                }
                let log_sum = lane_sum(&e).ln();
                *l = [max, log_sum];
                *n = log_sum - (row[t] - max);
            }
        }
    }

    vectorized! {
        /// `dx = g · (exp(x − lse) − onehot(target))` row by row.
        fn nll_grad_rows(
            dx: &mut [f32],
            x: &[f32],
            cols: usize,
            targets: &[usize],
            lse: &[[f32; 2]],
            g: &[f32],
        ) {
            for ((((d, row), &t), &[max, log_sum]), &g) in dx
                .chunks_exact_mut(cols)
                .zip(x.chunks_exact(cols))
                .zip(targets)
                .zip(lse)
                .zip(g)
            {
                for (d, &v) in d.iter_mut().zip(row) {
                    *d = g * exp((v - max) - log_sum);
                }
                d[t] -= g;
            }
        }
    }

    /// The logits as row-major `[rows, vocab]` values, NLL per row and log-sum-exp per row.
    fn nll_values(x: &burn_ndarray::NdArrayTensor, targets: &[usize]) -> Option<NllValues> {
        let view = f32_view(x)?;
        let cols = *view.shape().last()?;
        let rows = targets.len();
        if cols == 0 || view.len() != rows * cols {
            return None;
        }
        let m = Mat::of(view);
        if m.rows != rows {
            return None;
        }
        let x = m.row_major_values();
        let mut lse = vec![[0.0f32; 2]; rows];
        let mut nll = vec![0.0f32; rows];
        x.par_chunks(NLL_ROWS * cols)
            .zip(targets.par_chunks(NLL_ROWS))
            .zip(lse.par_chunks_mut(NLL_ROWS))
            .zip(nll.par_chunks_mut(NLL_ROWS))
            .for_each(|(((x, t), l), n)| nll_rows(x, cols, t, l, n));
        Some(NllValues { nll, lse, cols })
    }

    struct NllValues {
        nll: Vec<f32>,
        lse: Vec<[f32; 2]>,
        cols: usize,
    }

    pub(super) fn token_nll_nd<B: Backend>(
        logits: Tensor<B, 3>,
        targets: &[usize],
    ) -> Option<Tensor<B, 2>> {
        let logits: Tensor<Nd, 3> = cast(logits)?;
        let ([b, l, _], device) = (logits.dims(), logits.device());
        let values = nll_values(&logits.into_primitive().tensor(), targets)?;
        cast(to_nd(values.nll, [b, l], &device))
    }

    /// What a token NLL node keeps: the logits (shared, not copied), the targets and each
    /// row's log-sum-exp.
    #[derive(Clone, Debug)]
    struct NllState {
        logits: burn_ndarray::NdArrayTensor,
        targets: Arc<Vec<usize>>,
        lse: Arc<Vec<[f32; 2]>>,
        cols: usize,
    }

    #[derive(Debug)]
    struct NllBackward<const N: usize>;

    fn nll_backward<const N: usize>(ops: Ops<NllState, N>, grads: &mut Gradients) {
        let grad = grads.consume::<Nd>(&ops.node);
        let s = &ops.state;
        let Some(parent) = &ops.parents[0] else {
            return;
        };
        let view = f32_view(&s.logits).expect("f32 logits");
        let shape = view.shape().to_vec();
        let m = Mat::of(view);
        let cols = s.cols;
        let rows = s.targets.len();
        let x = m.row_major_values();
        // The output's gradient in row-major order (it may be a broadcast view of a mean's).
        let g: Vec<f32> = f32_view(&grad)
            .expect("the gradient of an f32 output is f32")
            .iter()
            .copied()
            .collect();
        let mut dx = vec![0.0f32; rows * cols];
        dx.par_chunks_mut(NLL_ROWS * cols)
            .zip(x.par_chunks(NLL_ROWS * cols))
            .zip(s.targets.par_chunks(NLL_ROWS))
            .zip(s.lse.par_chunks(NLL_ROWS))
            .zip(g.par_chunks(NLL_ROWS))
            .for_each(|((((d, x), t), l), g)| nll_grad_rows(d, x, cols, t, l, g));
        let t = Nd::float_from_data(TensorData::new(dx, shape), &Default::default());
        grads.register::<Nd>(parent.id, t);
    }

    backward_for_parents!(NllBackward, NllState, nll_backward, [1]);

    pub(super) fn token_nll_autodiff<B: Backend>(
        logits: Tensor<B, 3>,
        targets: Vec<usize>,
    ) -> Option<Tensor<B, 2>> {
        let logits: Tensor<Ad, 3> = cast(logits)?;
        let ([b, l, _], device) = (logits.dims(), logits.device());
        let logits = logits.into_primitive().tensor();
        let values = nll_values(&logits.primitive, &targets)?;
        let out = to_nd(values.nll, [b, l], &device).into_primitive().tensor();
        let state = NllState {
            logits: logits.primitive,
            targets: Arc::new(targets),
            lse: Arc::new(values.lse),
            cols: values.cols,
        };
        let out = finish_node(
            NllBackward::<1>
                .prepare::<NoCheckpointing>([logits.node])
                .compute_bound()
                .stateful(),
            state,
            out,
        );
        cast(Tensor::<Ad, 2>::from_primitive(TensorPrimitive::Float(out)))
    }

    /// Softmax of `row[..n]` in place, and 0 at `row[n..]` (the masked keys).
    #[inline(always)]
    fn softmax_row(row: &mut [f32], n: usize) {
        let max = lane_max(&row[..n]);
        for x in &mut row[..n] {
            *x = exp(*x - max);
        }
        let inv = lane_sum(&row[..n]).recip();
        for x in &mut row[..n] {
            *x *= inv;
        }
        row[n..].fill(0.0);
    }

    vectorized! {
        fn softmax_row_wide(row: &mut [f32], n: usize) {
            softmax_row(row, n)
        }
    }

    /// How many keys row `row` of a `[.., rows, keys]` block sees.
    fn visible(row: usize, rows: usize, keys: usize, causal_from: Option<usize>) -> usize {
        match causal_from {
            Some(q0) => (q0 + row % rows + 1).min(keys),
            None => keys,
        }
    }

    fn softmax_forward(
        x: &[f32],
        [_, _, rows, keys]: [usize; 4],
        causal_from: Option<usize>,
    ) -> Vec<f32> {
        let mut y = vec![0.0f32; x.len()];
        y.par_chunks_mut(keys)
            .zip(x.par_chunks(keys))
            .enumerate()
            .for_each(|(row, (y, x))| {
                let n = visible(row, rows, keys, causal_from);
                y[..n].copy_from_slice(&x[..n]);
                softmax_row_wide(y, n);
            });
        y
    }

    vectorized! {
        /// `dx = y ⊙ (g − Σ_j g_j y_j)` over one row.
        fn softmax_grad_row(dx: &mut [f32], y: &[f32], g: &[f32]) {
            let dot = lane_dot(y, g);
            for ((dx, &y), &g) in dx.iter_mut().zip(y).zip(g) {
                *dx = y * (g - dot);
            }
        }
    }

    /// `dx = y ⊙ (g − Σ_j g_j y_j)` per row (0 at masked keys, where `y` is 0).
    fn softmax_backward(
        y: &[f32],
        g: &[f32],
        [_, _, rows, keys]: [usize; 4],
        causal_from: Option<usize>,
    ) -> Vec<f32> {
        let mut dx = vec![0.0f32; y.len()];
        dx.par_chunks_mut(keys)
            .zip(y.par_chunks(keys).zip(g.par_chunks(keys)))
            .enumerate()
            .for_each(|(row, (dx, (y, g)))| {
                let n = visible(row, rows, keys, causal_from);
                softmax_grad_row(&mut dx[..n], &y[..n], &g[..n]);
            });
        dx
    }

    pub(super) fn softmax_nd<B: Backend>(
        x: Tensor<B, 4>,
        causal_from: Option<usize>,
    ) -> Option<Tensor<B, 4>> {
        let x: Tensor<Nd, 4> = cast(x)?;
        let (dims, device) = (x.dims(), x.device());
        let y = softmax_forward(
            &row_major_values(&x.into_primitive().tensor())?,
            dims,
            causal_from,
        );
        cast(to_nd(y, dims, &device))
    }

    /// The softmax's backward pass: from its saved output (the output tensor itself, shared,
    /// not a copy), `y ⊙ (g − Σ g y)` per row.
    #[derive(Debug)]
    struct SoftmaxGrad {
        y: burn_ndarray::NdArrayTensor,
        dims: [usize; 4],
        causal_from: Option<usize>,
    }

    impl UnaryGrad for SoftmaxGrad {
        fn input_grad(&self, grad: &[f32]) -> Vec<f32> {
            let y = row_major_values(&self.y).expect("the softmax's output is f32");
            softmax_backward(&y, grad, self.dims, self.causal_from)
        }
    }

    pub(super) fn softmax_autodiff<B: Backend>(
        x: Tensor<B, 4>,
        causal_from: Option<usize>,
    ) -> Option<Tensor<B, 4>> {
        let x: Tensor<Ad, 4> = cast(x)?;
        let dims = x.dims();
        let input = x.clone().inner().into_primitive().tensor();
        let y = softmax_forward(&row_major_values(&input)?, dims, causal_from);
        cast(record_unary(x, y, |y| {
            Box::new(SoftmaxGrad {
                y,
                dims,
                causal_from,
            })
        }))
    }

    /// The backward pass of a one-input kernel: the input's gradient (same shape) from the
    /// output's, given what the forward pass saved.
    trait UnaryGrad: std::fmt::Debug + Send + Sync + 'static {
        fn input_grad(&self, grad: &[f32]) -> Vec<f32>;
    }

    /// What a one-input node keeps for its backward pass.
    #[derive(Debug)]
    struct Saved {
        dims: Vec<usize>,
        grad: Box<dyn UnaryGrad>,
    }

    #[derive(Debug)]
    struct UnaryBackward;

    impl Backward<Nd, 1> for UnaryBackward {
        type State = Arc<Saved>;

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let grad = grads.consume::<Nd>(&ops.node);
            let [Some(parent)] = ops.parents else {
                return;
            };
            let dx = match row_major_values(&grad) {
                Some(g) => ops.state.grad.input_grad(&g),
                None => ops.state.grad.input_grad(&host_grad(grad)),
            };
            let t = Nd::float_from_data(
                TensorData::new(dx, ops.state.dims.clone()),
                &Default::default(),
            );
            grads.register::<Nd>(parent.id, t);
        }
    }

    /// Records a one-input kernel as one node of `x`'s graph, with output values `y` (`x`'s
    /// shape). `saved` runs only when `x` is tracked, and is given the output tensor (shared
    /// with the graph, not a copy).
    fn record_unary<const D: usize>(
        x: Tensor<Ad, D>,
        y: Vec<f32>,
        saved: impl FnOnce(burn_ndarray::NdArrayTensor) -> Box<dyn UnaryGrad>,
    ) -> Tensor<Ad, D> {
        record_unary_lazy(x, |_| (y, Some(saved)))
    }

    /// [`record_unary`] for a kernel whose forward pass does more when `x` is tracked:
    /// `forward(tracked)` gives the output values and, when tracked, what makes the saved state.
    fn record_unary_lazy<const D: usize, S>(
        x: Tensor<Ad, D>,
        forward: impl FnOnce(bool) -> (Vec<f32>, Option<S>),
    ) -> Tensor<Ad, D>
    where
        S: FnOnce(burn_ndarray::NdArrayTensor) -> Box<dyn UnaryGrad>,
    {
        let (dims, device) = (x.dims(), x.device());
        let node = x.into_primitive().tensor().node;
        let out = match UnaryBackward
            .prepare::<NoCheckpointing>([node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (y, saved) = forward(true);
                let saved = saved.expect("a tracked unary kernel saves its state");
                let out = to_nd(y, dims, &device).into_primitive().tensor();
                let state = Arc::new(Saved {
                    dims: dims.to_vec(),
                    grad: saved(out.clone()),
                });
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => {
                let (y, _) = forward(false);
                prep.finish(to_nd(y, dims, &device).into_primitive().tensor())
            }
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }

    /// The values of an `f32` ndarray primitive, row-major: one copy of the array's memory when
    /// it is contiguous.
    fn host_primitive(x: burn_ndarray::NdArrayTensor) -> Option<Vec<f32>> {
        match x {
            burn_ndarray::NdArrayTensor::F32(storage) => {
                let view = storage.view();
                Some(match view.as_slice() {
                    Some(values) => values.to_vec(),
                    None => view.iter().copied().collect(),
                })
            }
            _ => None,
        }
    }

    /// A gradient's values (the gradient of an `f32` output is `f32`).
    fn host_grad(grad: burn_ndarray::NdArrayTensor) -> Vec<f32> {
        host_primitive(grad).expect("the gradient of an f32 output is f32")
    }

    /// GELU's backward pass: the slope `Φ(x) + x φ(x)` at the input, computed in the forward
    /// pass beside the values (it shares `Φ`), so that the backward pass is one product
    /// `g · slope` and the input itself need not be kept.
    #[derive(Debug)]
    struct GeluGrad {
        slope: Vec<f32>,
    }

    impl UnaryGrad for GeluGrad {
        fn input_grad(&self, grad: &[f32]) -> Vec<f32> {
            mul_values(grad, &self.slope)
        }
    }

    /// The kernel on `Autodiff<NdArray<f32>>`: one node, whose backward multiplies the
    /// incoming gradient by the slope saved in the forward pass (only when `x` is tracked).
    pub(super) fn gelu_autodiff<B: Backend, const D: usize>(
        x: Tensor<B, D>,
    ) -> Option<Tensor<B, D>> {
        let x: Tensor<Ad, D> = cast(x)?;
        let input = x.clone().inner().into_primitive().tensor();
        let values = row_major_values(&input)?;
        cast(record_unary_lazy(x, |tracked| {
            if tracked {
                let (y, slope) = gelu_forward_with_slope(&values);
                let saved = move |_| Box::new(GeluGrad { slope }) as Box<dyn UnaryGrad>;
                (y, Some(saved))
            } else {
                (gelu_forward(&values), None)
            }
        }))
    }
    /// An `f32` array of `NdArray<f32>` in row-major order, owned (copied only when it is not
    /// row-major).
    fn owned_f32<const D: usize>(
        x: Tensor<Nd, D>,
    ) -> Option<ndarray::ArcArray<f32, ndarray::IxDyn>> {
        match x.into_primitive().tensor() {
            burn_ndarray::NdArrayTensor::F32(storage) => {
                let a = storage.into_owned();
                Some(if a.is_standard_layout() {
                    a
                } else {
                    a.as_standard_layout().into_owned().into_shared()
                })
            }
            _ => None,
        }
    }

    fn from_array<const D: usize>(a: ndarray::ArcArray<f32, ndarray::IxDyn>) -> Tensor<Nd, D> {
        Tensor::from_primitive(TensorPrimitive::Float(burn_ndarray::NdArrayTensor::from(a)))
    }

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
    /// The products of [`super::batched_matmul`] for 4-d `f32` primitives of agreeing shapes:
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

    pub(super) fn matmul_nd<B: Backend>(a: Tensor<B, 4>, b: Tensor<B, 4>) -> Option<Tensor<B, 4>> {
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

    pub(super) fn matmul_autodiff<B: Backend>(
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
}

#[cfg(all(test, feature = "ndarray"))]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::{DType, Distribution};

    fn max_diff<const D: usize>(a: Tensor<NdArray<f32>, D>, b: Tensor<NdArray<f32>, D>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    /// The fused linear layer against Burn's own op (the tensor path) on `Autodiff<NdArray>`:
    /// values, and the gradients of the input, the weight and the bias, for a row-major input
    /// and weight, a transposed input (read through its strides), a transposed weight, 2-d and
    /// 4-d inputs, and no bias.
    /// The batched matrix product node equals Burn's `matmul` in values and in both gradients
    /// (row-major operands, a transposed right operand as `q · kᵀ` has, a transposed left
    /// one), without autodiff too; gives zeros for an empty inner dimension; and hands shapes it
    /// does not take (broadcast leading dimensions) to Burn's `matmul`.
    #[test]
    fn batched_matmul_is_burns_matmul_in_values_and_gradients() {
        let _graphs = crate::util::autodiff_test_lock();
        type A = Autodiff<NdArray<f32>>;
        let device = Default::default();
        let normal = Distribution::Normal(0.0, 1.0);
        for (case, ta, tb, k) in [
            ("row-major", false, false, 4),
            ("transposed right operand", false, true, 4),
            ("transposed left operand", true, false, 3),
        ] {
            let (m, n) = (5, 6);
            let a_leaf = match ta {
                true => Tensor::<A, 4>::random([2, 3, k, m], normal, &device),
                false => Tensor::<A, 4>::random([2, 3, m, k], normal, &device),
            }
            .require_grad();
            let b_leaf = match tb {
                true => Tensor::<A, 4>::random([2, 3, n, k], normal, &device),
                false => Tensor::<A, 4>::random([2, 3, k, n], normal, &device),
            }
            .require_grad();
            let a = || {
                if ta {
                    a_leaf.clone().swap_dims(2, 3)
                } else {
                    a_leaf.clone()
                }
            };
            let b = || {
                if tb {
                    b_leaf.clone().swap_dims(2, 3)
                } else {
                    b_leaf.clone()
                }
            };
            let fused = batched_matmul(a(), b());
            let burn = a().matmul(b());
            let d = max_diff(fused.clone().inner(), burn.clone().inner());
            assert!(d < 1e-5, "{case}: values differ by {d}");
            let weights = Tensor::<A, 4>::random([2, 3, m, n], normal, &device);
            let g1 = (fused * weights.clone()).sum().backward();
            let g2 = (burn * weights).sum().backward();
            let da = max_diff(a_leaf.grad(&g1).unwrap(), a_leaf.grad(&g2).unwrap());
            let db = max_diff(b_leaf.grad(&g1).unwrap(), b_leaf.grad(&g2).unwrap());
            assert!(
                da < 1e-5 && db < 1e-5,
                "{case}: gradients differ by {da}, {db}"
            );
            let d = max_diff(
                batched_matmul(a().inner(), b().inner()),
                a().inner().matmul(b().inner()),
            );
            assert!(d < 1e-5, "{case}, no autodiff: values differ by {d}");
        }
        // An empty inner dimension: zeros (Burn 0.21's ndarray matmul divides by zero there).
        let a = Tensor::<A, 4>::zeros([2, 3, 5, 0], &device).require_grad();
        let b = Tensor::<A, 4>::zeros([2, 3, 0, 6], &device).require_grad();
        let y = batched_matmul(a.clone(), b.clone());
        assert_eq!(y.dims(), [2, 3, 5, 6]);
        assert_eq!(y.clone().inner().abs().max().into_scalar(), 0.0);
        let g = y.sum().backward();
        assert_eq!(a.grad(&g).map(|t| t.dims()), Some([2, 3, 5, 0]));
        // Broadcast leading dimensions: Burn's matmul.
        let a = Tensor::<NdArray<f32>, 4>::random([1, 3, 5, 4], normal, &device);
        let b = Tensor::<NdArray<f32>, 4>::random([2, 3, 4, 6], normal, &device);
        let d = max_diff(batched_matmul(a.clone(), b.clone()), a.matmul(b));
        assert_eq!(d, 0.0, "broadcast shapes go to Burn's matmul");
    }

    #[test]
    fn fused_linear_is_the_tensor_path_in_values_and_gradients() {
        let _graphs = crate::util::autodiff_test_lock();
        type A = Autodiff<NdArray<f32>>;
        let device = Default::default();
        let normal = Distribution::Normal(0.0, 1.0);
        for (case, transposed_x, transposed_w, with_bias) in [
            ("row-major", false, false, true),
            ("transposed input", true, false, true),
            ("transposed weight", false, true, true),
            ("no bias", false, false, false),
        ] {
            let (d_in, d_out) = (7, 5);
            // The leaves whose gradients are compared; each path builds its own operands from
            // them (a backward pass frees the graph it ran through), and a transposed view
            // reads the same values through other strides.
            let x_leaf = if transposed_x {
                Tensor::<A, 3>::random([3, d_in, 9], normal, &device).require_grad()
            } else {
                Tensor::<A, 3>::random([3, 9, d_in], normal, &device).require_grad()
            };
            let w_leaf = if transposed_w {
                Tensor::<A, 2>::random([d_out, d_in], normal, &device).require_grad()
            } else {
                Tensor::<A, 2>::random([d_in, d_out], normal, &device).require_grad()
            };
            let x = || match transposed_x {
                true => x_leaf.clone().swap_dims(1, 2),
                false => x_leaf.clone(),
            };
            let w = || match transposed_w {
                true => w_leaf.clone().transpose(),
                false => w_leaf.clone(),
            };
            let b =
                with_bias.then(|| Tensor::<A, 1>::random([d_out], normal, &device).require_grad());
            let fused = linear(x(), w(), b.clone());
            let tensor = linear_tensor(x(), w(), b.clone());
            let d = max_diff(fused.clone().inner(), tensor.clone().inner());
            assert!(d < 1e-5, "{case}: values differ by {d}");
            // A weighted sum, so that every output element has its own gradient.
            let weights = Tensor::<A, 3>::random([3, 9, d_out], normal, &device);
            let g1 = (fused * weights.clone()).sum().backward();
            let g2 = (tensor * weights).sum().backward();
            let dx = max_diff(x_leaf.grad(&g1).unwrap(), x_leaf.grad(&g2).unwrap());
            let dw = max_diff(w_leaf.grad(&g1).unwrap(), w_leaf.grad(&g2).unwrap());
            assert!(
                dx < 1e-5 && dw < 1e-5,
                "{case}: gradients differ by {dx}, {dw}"
            );
            if let Some(b) = &b {
                let db = max_diff(b.grad(&g1).unwrap(), b.grad(&g2).unwrap());
                assert!(db < 1e-5, "{case}: bias gradients differ by {db}");
            }
        }
        // Two and four dimensions, without autodiff too.
        let w = Tensor::<NdArray<f32>, 2>::random([4, 6], normal, &device);
        let b = Tensor::<NdArray<f32>, 1>::random([6], normal, &device);
        let x2 = Tensor::<NdArray<f32>, 2>::random([130, 4], normal, &device);
        let d = max_diff(
            linear(x2.clone(), w.clone(), Some(b.clone())),
            linear_tensor(x2, w.clone(), Some(b.clone())),
        );
        assert!(d < 1e-5, "2-d: {d}");
        let x4 = Tensor::<NdArray<f32>, 4>::random([2, 3, 5, 4], normal, &device);
        let d = max_diff(
            linear(x4.clone(), w.clone(), Some(b.clone())),
            linear_tensor(x4, w, Some(b)),
        );
        assert!(d < 1e-5, "4-d: {d}");
    }

    /// The fused layer norm against `B::layer_norm` (the tensor path) on `Autodiff<NdArray>`:
    /// values against the f32 tensor path, and the gradients of the input, gamma and beta
    /// against the tensor path run in f64 (Burn's f32 ndarray layer norm is itself off by up to
    /// ~2e-4 of the gradient's scale on an AVX2 machine, where the fused path is within 2e-7),
    /// for a row-major input, a transposed one (copied to row-major by the kernel), no beta,
    /// rows that do not fill a rayon task, a width that is not a multiple of the sixteen
    /// running sums, and 2-d and 4-d inputs without autodiff.
    #[test]
    fn fused_layer_norm_is_the_tensor_path_in_values_and_gradients() {
        let _graphs = crate::util::autodiff_test_lock();
        type A = Autodiff<NdArray<f32>>;
        type A64 = Autodiff<NdArray<f64>>;
        let device = Default::default();
        let normal = Distribution::Normal(0.5, 2.0);
        // Inputs from a generator of the test's own: the backend's random source is shared by
        // the tests running beside this one, so seeding it would not fix the values.
        let mut rng = crate::util::Rng::new(11);
        let mut seeded = |dims: [usize; 3]| {
            let n = dims.iter().product::<usize>();
            (0..n)
                .map(|_| (rng.below(1 << 20) as f32 / (1 << 20) as f32) * 8.0 - 3.5)
                .collect::<Vec<f32>>()
        };
        let seeded_1d = |n: usize, rng: &mut crate::util::Rng| {
            (0..n)
                .map(|_| (rng.below(1 << 20) as f32 / (1 << 20) as f32) * 4.0 - 1.5)
                .collect::<Vec<f32>>()
        };
        // A tracked leaf of `values` in element type `$e` (f32 or f64, named: `from_data`
        // would take the device's default f32 otherwise).
        macro_rules! leaf {
            ($e:ty, $values:expr, $dims:expr) => {
                Tensor::<Autodiff<NdArray<$e>>, _>::from_data(
                    TensorData::new($values.to_vec(), $dims).convert::<$e>(),
                    (&Default::default(), <$e as burn::tensor::Element>::dtype()),
                )
                .require_grad()
            };
        }
        let to_f32 = |t: Tensor<NdArray<f64>, 3>| {
            Tensor::<NdArray<f32>, 3>::from_data(t.into_data().convert::<f32>(), &device)
        };
        let to_f32_1d = |t: Tensor<NdArray<f64>, 1>| {
            Tensor::<NdArray<f32>, 1>::from_data(t.into_data().convert::<f32>(), &device)
        };
        for (case, transposed, with_beta, d) in [
            ("row-major", false, true, 40),
            ("transposed input", true, true, 19),
            ("no beta", false, false, 33),
            ("narrow rows", false, true, 3),
        ] {
            let x_dims = if transposed { [3, d, 45] } else { [3, 45, d] };
            let x_values = seeded(x_dims);
            let mut local = crate::util::Rng::new(d as u64);
            let gamma_values = seeded_1d(d, &mut local);
            let beta_values = with_beta.then(|| seeded_1d(d, &mut local));
            let weights = seeded([3, 45, d]);
            let x_leaf = leaf!(f32, &x_values, x_dims);
            let x = match transposed {
                true => x_leaf.clone().swap_dims(1, 2),
                false => x_leaf.clone(),
            };
            let gamma = leaf!(f32, &gamma_values, [d]);
            let beta = beta_values.as_ref().map(|b| leaf!(f32, b, [d]));
            let fused = layer_norm(x.clone(), gamma.clone(), beta.clone(), 1e-5);
            let tensor = layer_norm_tensor(x, gamma.clone(), beta.clone(), 1e-5);
            let dv = max_diff(fused.clone().inner(), tensor.inner());
            assert!(dv < 1e-4, "{case}: values differ by {dv}");
            let w =
                Tensor::<A, 3>::from_data(TensorData::new(weights.clone(), [3, 45, d]), &device);
            let grads = (fused * w).sum().backward();
            // The tensor path in f64.
            let x64_leaf = leaf!(f64, &x_values, x_dims);
            let x64 = match transposed {
                true => x64_leaf.clone().swap_dims(1, 2),
                false => x64_leaf.clone(),
            };
            let gamma64 = leaf!(f64, &gamma_values, [d]);
            let beta64 = beta_values.as_ref().map(|b| leaf!(f64, b, [d]));
            let w64: Tensor<A64, 3> = leaf!(f64, &weights, [3, 45, d]).detach();
            let grads64 = (layer_norm_tensor(x64, gamma64.clone(), beta64.clone(), 1e-5) * w64)
                .sum()
                .backward();
            // Relative to the gradient's scale: a row of three features can have a small
            // variance, and then a large `1 / σ` in its gradient.
            let rel = |a: Tensor<NdArray<f32>, 3>, b: Tensor<NdArray<f32>, 3>| {
                let scale = 1.0 + b.clone().abs().max().into_scalar();
                max_diff(a, b) / scale
            };
            let dx = rel(
                x_leaf.grad(&grads).unwrap(),
                to_f32(x64_leaf.grad(&grads64).unwrap()),
            );
            let dg = max_diff(
                gamma.grad(&grads).unwrap(),
                to_f32_1d(gamma64.grad(&grads64).unwrap()),
            );
            assert!(
                dx < 1e-5 && dg < 1e-4,
                "{case}: gradients differ from the f64 tensor path by {dx} (relative), {dg}"
            );
            if let (Some(b), Some(b64)) = (&beta, &beta64) {
                let db = max_diff(
                    b.grad(&grads).unwrap(),
                    to_f32_1d(b64.grad(&grads64).unwrap()),
                );
                assert!(db < 1e-4, "{case}: beta gradients differ by {db}");
            }
        }
        let gamma = Tensor::<NdArray<f32>, 1>::random([6], normal, &device);
        let beta = Tensor::<NdArray<f32>, 1>::random([6], normal, &device);
        let x2 = Tensor::<NdArray<f32>, 2>::random([70, 6], normal, &device);
        let d = max_diff(
            layer_norm(x2.clone(), gamma.clone(), Some(beta.clone()), 1e-5),
            layer_norm_tensor(x2, gamma.clone(), Some(beta.clone()), 1e-5),
        );
        assert!(d < 1e-4, "2-d: {d}");
        let x4 = Tensor::<NdArray<f32>, 4>::random([2, 3, 5, 6], normal, &device);
        let d = max_diff(
            layer_norm(x4.clone(), gamma.clone(), Some(beta.clone()), 1e-5),
            layer_norm_tensor(x4, gamma, Some(beta), 1e-5),
        );
        assert!(d < 1e-4, "4-d: {d}");
    }

    /// The fused layer norm is the formula, computed in f64, in values and in the input's
    /// gradient (`dx = rstd · (ĝ − mean ĝ − x̂ · mean(ĝ x̂))`, `ĝ = g γ`), with a large mean
    /// that a one-pass variance would lose.
    #[test]
    fn fused_layer_norm_is_the_formula() {
        let _graphs = crate::util::autodiff_test_lock();
        type A = Autodiff<NdArray<f32>>;
        let device = Default::default();
        let (rows, d) = (3, 21);
        let xs: Vec<f32> = (0..rows * d)
            .map(|i| 100.0 + (i as f32 * 0.37).sin())
            .collect();
        let gs: Vec<f32> = (0..d).map(|i| 1.0 + (i as f32 * 0.91).cos()).collect();
        let bs: Vec<f32> = (0..d).map(|i| (i as f32 * 0.5).sin()).collect();
        let ws: Vec<f32> = (0..rows * d).map(|i| (i as f32 * 1.3).cos()).collect();
        let eps = 1e-5;
        let x = Tensor::<A, 2>::from_data(TensorData::new(xs.clone(), [rows, d]), &device)
            .require_grad();
        let gamma = Tensor::<A, 1>::from_data(TensorData::new(gs.clone(), [d]), &device);
        let beta = Tensor::<A, 1>::from_data(TensorData::new(bs.clone(), [d]), &device);
        let weights = Tensor::<A, 2>::from_data(TensorData::new(ws.clone(), [rows, d]), &device);
        let y = layer_norm(x.clone(), gamma, Some(beta), eps);
        let grads = (y.clone() * weights).sum().backward();
        let y = y.into_data().into_vec::<f32>().unwrap();
        let dx = x
            .grad(&grads)
            .unwrap()
            .into_data()
            .into_vec::<f32>()
            .unwrap();
        for r in 0..rows {
            let row: Vec<f64> = xs[r * d..(r + 1) * d]
                .iter()
                .map(|&v| f64::from(v))
                .collect();
            let mean = row.iter().sum::<f64>() / d as f64;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d as f64;
            let rstd = 1.0 / (var + eps).sqrt();
            let xhat: Vec<f64> = row.iter().map(|v| (v - mean) * rstd).collect();
            let gh: Vec<f64> = (0..d)
                .map(|c| f64::from(ws[r * d + c]) * f64::from(gs[c]))
                .collect();
            let a = gh.iter().sum::<f64>() / d as f64;
            let b = gh.iter().zip(&xhat).map(|(g, x)| g * x).sum::<f64>() / d as f64;
            for c in 0..d {
                let want = xhat[c] * f64::from(gs[c]) + f64::from(bs[c]);
                let got = f64::from(y[r * d + c]);
                assert!((got - want).abs() < 1e-3, "y[{r}, {c}]: {got} vs {want}");
                let want = rstd * (gh[c] - a - xhat[c] * b);
                let got = f64::from(dx[r * d + c]);
                assert!((got - want).abs() < 1e-3, "dx[{r}, {c}]: {got} vs {want}");
            }
        }
    }

    /// The fused linear layer's values are the formula, computed in f64.
    #[test]
    fn fused_linear_is_the_formula() {
        let device = Default::default();
        let xs: Vec<f32> = (0..12).map(|i| (i as f32 * 0.37).sin()).collect();
        let ws: Vec<f32> = (0..8).map(|i| (i as f32 * 0.91).cos()).collect();
        let bs = [0.5f32, -0.25];
        let x = Tensor::<NdArray<f32>, 2>::from_data(TensorData::new(xs.clone(), [3, 4]), &device);
        let w = Tensor::<NdArray<f32>, 2>::from_data(TensorData::new(ws.clone(), [4, 2]), &device);
        let b = Tensor::<NdArray<f32>, 1>::from_data(TensorData::new(bs.to_vec(), [2]), &device);
        let y = linear(x, w, Some(b)).into_data().into_vec::<f32>().unwrap();
        for r in 0..3 {
            for c in 0..2 {
                let want = f64::from(bs[c])
                    + (0..4)
                        .map(|i| f64::from(xs[r * 4 + i]) * f64::from(ws[i * 2 + c]))
                        .sum::<f64>();
                let got = f64::from(y[r * 2 + c]);
                assert!(
                    (got - want).abs() < 1e-6,
                    "row {r} col {c}: {got} vs {want}"
                );
            }
        }
    }

    /// The kernels' `exp` against f64's: a few ulps across the range where f32 is normal, 1 at
    /// 0, 0 for `-inf` and below -88, NaN for NaN.
    #[test]
    fn exp_is_within_a_few_ulps() {
        for i in -8700..=8800 {
            let x = i as f32 / 100.0;
            let want = f64::from(x).exp();
            let got = f64::from(nd::exp(x));
            let error = (got - want).abs() / want;
            assert!(
                error < 4.0 * f64::from(f32::EPSILON),
                "exp({x}) = {got}, not {want}"
            );
        }
        assert_eq!(nd::exp(0.0), 1.0);
        assert_eq!(nd::exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(nd::exp(-1000.0), 0.0);
        assert!(nd::exp(f32::NAN).is_nan());
    }

    /// The normal CDF of the GELU kernel against libm's f64 `erfc`: relative error within a
    /// few f32 roundings of the exponent from -9 (Φ ≈ 1e-19) to 8, the far negative tail
    /// included (where `1 + erf` would cancel), and under 2e-6 from -4.
    #[test]
    fn phi_is_the_normal_cdf() {
        let mut worst = 0.0f64;
        for i in -900..=800 {
            let x = i as f32 / 100.0;
            let want = 0.5 * libm::erfc(-f64::from(x) / std::f64::consts::SQRT_2);
            let got = f64::from(nd::phi(x));
            let error = (got - want).abs() / want;
            assert!(
                x < -4.0 || error < 2e-6,
                "x = {x}: relative error {error:e}"
            );
            worst = worst.max(error);
        }
        assert!(worst < 1e-5, "relative error {worst:e}");
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

    /// `softmax(scale · q kᵀ + bias, mask) · v` by Burn's tensor ops, as
    /// `[batch, rows, heads, d_v]`: the reference of the fused attention kernel.
    fn attention_reference<B: Backend>(
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        bias: Option<Tensor<B, 4>>,
        scale: f32,
        causal_from: Option<usize>,
    ) -> Tensor<B, 4> {
        let [b, h, rows, _] = q.dims();
        let keys = k.dims()[2];
        let mut logits = q.matmul(k.transpose()) * scale;
        if let Some(bias) = bias {
            logits = logits + bias;
        }
        if let Some(q0) = causal_from {
            let future: Vec<bool> = (0..rows * keys).map(|i| i % keys > q0 + i / keys).collect();
            let mask = Tensor::<B, 2, Bool>::from_data(
                TensorData::new(future, [rows, keys]),
                &logits.device(),
            )
            .unsqueeze::<4>()
            .expand([b, h, rows, keys]);
            logits = logits.mask_fill(mask, f32::NEG_INFINITY);
        }
        burn::tensor::activation::softmax(logits, 3)
            .matmul(v)
            .swap_dims(1, 2)
    }

    /// The fused attention node against the tensor path on `Autodiff<NdArray>`, in values and
    /// in the gradients of q, k, v and the bias: causal over a full square, a causal chunk of
    /// query rows after earlier keys (ragged: rows that see part of the keys), full
    /// (non-causal) attention, a bias shared by the batch or one per batch row, no bias, a
    /// `d_v` unlike `d_head`, and q, k, v read through strides (views of one projection).
    #[test]
    fn fused_attention_is_the_tensor_path_in_values_and_gradients() {
        let _graphs = crate::util::autodiff_test_lock();
        type A = Autodiff<NdArray<f32>>;
        let device = Default::default();
        let normal = Distribution::Normal(0.0, 1.0);
        let (b, h, dh) = (2, 3, 5);
        for (case, rows, keys, causal_from, bias_batch, dv) in [
            ("causal square", 7, 7, Some(0), Some(1), dh),
            ("causal chunk", 4, 9, Some(3), Some(1), dh),
            ("decode step", 1, 6, Some(5), Some(1), dh),
            ("full", 5, 8, None, Some(1), dh),
            ("bias per batch row", 6, 6, Some(0), Some(b), dh),
            ("no bias, wide v", 6, 6, Some(0), None, 7),
        ] {
            // One projection [b, rows or keys, heads, q | k | v], viewed per part.
            let qp = Tensor::<A, 4>::random([b, rows, h, dh], normal, &device).require_grad();
            let kv = Tensor::<A, 4>::random([b, keys, h, dh + dv], normal, &device).require_grad();
            let bias = bias_batch.map(|bb| {
                Tensor::<A, 4>::random([bb, h, rows, keys], normal, &device).require_grad()
            });
            let parts = || {
                (
                    qp.clone().swap_dims(1, 2),
                    kv.clone().narrow(3, 0, dh).swap_dims(1, 2),
                    kv.clone().narrow(3, dh, dv).swap_dims(1, 2),
                )
            };
            let scale = 0.37;
            let (q, k, v) = parts();
            let fused = attention(q, k, v, bias.clone(), scale, causal_from)
                .expect("a kernel on Autodiff<NdArray<f32>>");
            assert_eq!(fused.dims(), [b, rows, h, dv], "{case}");
            let weights = Tensor::<A, 4>::random([b, rows, h, dv], normal, &device);
            // The reference in f64 (two f32 computations in different orders differ by ~5e-5
            // here): the same inputs, the tensor path, on Autodiff<NdArray<f64>>.
            let (qp64, kv64, w64) = (tracked_f64(&qp), tracked_f64(&kv), tracked_f64(&weights));
            let bias64 = bias.as_ref().map(tracked_f64);
            let reference = attention_reference(
                qp64.clone().swap_dims(1, 2),
                kv64.clone().narrow(3, 0, dh).swap_dims(1, 2),
                kv64.clone().narrow(3, dh, dv).swap_dims(1, 2),
                bias64.clone(),
                scale,
                causal_from,
            );
            let close = |ours, want, what: &str| assert_near_f64(ours, want, case, what);
            close(fused.clone().inner(), reference.clone().inner(), "output");
            let g1 = (fused * weights).sum().backward();
            let g2 = (reference * w64).sum().backward();
            close(qp.grad(&g1).unwrap(), qp64.grad(&g2).unwrap(), "dq");
            let (gk, gk64) = (kv.grad(&g1).unwrap(), kv64.grad(&g2).unwrap());
            close(
                gk.clone().narrow(3, 0, dh),
                gk64.clone().narrow(3, 0, dh),
                "dk",
            );
            close(gk.narrow(3, dh, dv), gk64.narrow(3, dh, dv), "dv");
            if let (Some(bias), Some(bias64)) = (&bias, &bias64) {
                close(bias.grad(&g1).unwrap(), bias64.grad(&g2).unwrap(), "dbias");
            }
        }
    }

    /// The packed attention node (q, k, v read from one `[batch, seq, 3·heads, d_head]`
    /// projection, one gradient for it) against the tensor path in f64 on the split parts:
    /// values, and the gradients of the packed tensor (each of its q, k and v parts) and of the
    /// bias, causal and non-causal, a bias shared by the batch or one per row, and no bias. The
    /// projection comes transposed (a strided view), as a layer's output may.
    #[test]
    fn packed_attention_is_the_tensor_path_in_values_and_gradients() {
        let _graphs = crate::util::autodiff_test_lock();
        type A = Autodiff<NdArray<f32>>;
        let device = Default::default();
        let normal = Distribution::Normal(0.0, 1.0);
        let (b, h, dh, l) = (2, 3, 4, 7);
        for (case, causal_from, bias_batch) in [
            ("causal", Some(0), Some(1)),
            ("full", None, Some(1)),
            ("bias per batch row", Some(0), Some(b)),
            ("no bias", Some(0), None),
        ] {
            let stored = Tensor::<A, 4>::random([b, 3 * h, l, dh], normal, &device).require_grad();
            let qkv = stored.clone().swap_dims(1, 2);
            let bias = bias_batch
                .map(|bb| Tensor::<A, 4>::random([bb, h, l, l], normal, &device).require_grad());
            let scale = 0.41;
            let fused = attention_packed(qkv, h, bias.clone(), scale, causal_from)
                .expect("a kernel on Autodiff<NdArray<f32>>");
            assert_eq!(fused.dims(), [b, l, h, dh], "{case}");
            let weights = Tensor::<A, 4>::random([b, l, h, dh], normal, &device);
            let (stored64, w64) = (tracked_f64(&stored), tracked_f64(&weights));
            let bias64 = bias.as_ref().map(tracked_f64);
            let part = |i: usize| stored64.clone().narrow(1, i * h, h);
            let reference = attention_reference(
                part(0),
                part(1),
                part(2),
                bias64.clone(),
                scale,
                causal_from,
            );
            let close = |ours, want, what: &str| assert_near_f64(ours, want, case, what);
            close(fused.clone().inner(), reference.clone().inner(), "output");
            let g1 = (fused * weights).sum().backward();
            let g2 = (reference * w64).sum().backward();
            let (gs, gs64) = (stored.grad(&g1).unwrap(), stored64.grad(&g2).unwrap());
            for (i, what) in ["dq", "dk", "dv"].into_iter().enumerate() {
                close(
                    gs.clone().narrow(1, i * h, h),
                    gs64.clone().narrow(1, i * h, h),
                    what,
                );
            }
            if let (Some(bias), Some(bias64)) = (&bias, &bias64) {
                close(bias.grad(&g1).unwrap(), bias64.grad(&g2).unwrap(), "dbias");
            }
        }
    }

    /// Without autodiff the packed kernel is the split one; it hands back a third dimension
    /// that is not three times the heads, a bias of another shape, and a causal block that
    /// does not start at 0.
    #[test]
    fn packed_attention_without_autodiff_and_bad_shapes() {
        type N = NdArray<f32>;
        let device = Default::default();
        let normal = Distribution::Normal(0.0, 1.0);
        let (b, h, dh, l) = (2, 2, 4, 6);
        let qkv = Tensor::<N, 4>::random([b, l, 3 * h, dh], normal, &device);
        let bias = Tensor::<N, 4>::random([1, h, l, l], normal, &device);
        let fused = attention_packed(qkv.clone(), h, Some(bias.clone()), 0.5, Some(0))
            .expect("a kernel on NdArray<f32>");
        let part = |i: usize| qkv.clone().narrow(2, i * h, h).swap_dims(1, 2);
        let split = attention(part(0), part(1), part(2), Some(bias.clone()), 0.5, Some(0))
            .expect("a kernel on NdArray<f32>");
        assert_eq!(max_diff(fused, split), 0.0);
        assert!(attention_packed(qkv.clone(), 3, None, 0.5, None).is_none());
        let wrong_bias = Tensor::<N, 4>::zeros([1, h, l, l - 1], &device);
        assert!(attention_packed(qkv.clone(), h, Some(wrong_bias), 0.5, None).is_none());
        assert!(attention_packed(qkv, h, None, 0.5, Some(2)).is_none());
    }

    /// The fused token NLL against `log_softmax` + `gather` in f64: values and the logits'
    /// gradient under a weighted sum (each token's own weight) and under a mean (a broadcast
    /// gradient), for row-major and transposed (strided) logits, with rows of a wide range
    /// (a max subtracted or not shows); a target outside the vocabulary takes the tensor path.
    #[test]
    fn fused_token_nll_is_the_tensor_path_in_values_and_gradients() {
        let _graphs = crate::util::autodiff_test_lock();
        type A = Autodiff<NdArray<f32>>;
        type A64 = Autodiff<NdArray<f64>>;
        let device = Default::default();
        let (b, l, vocab) = (3, 37, 50);
        let mut rng = crate::util::Rng::new(7);
        let targets: Vec<i64> = (0..b * l).map(|_| rng.below(vocab as u64) as i64).collect();
        let mut unit = || (rng.next_u64() >> 40) as f32 / 16_777_216.0;
        let logits: Vec<f32> = (0..b * l * vocab)
            .map(|i| (unit() - 0.5) * 8.0 + (i % 5) as f32 * 20.0)
            .collect();
        let weights: Vec<f32> = (0..b * l).map(|_| unit()).collect();
        for transposed in [false, true] {
            for mean in [false, true] {
                let case = format!("transposed {transposed}, mean {mean}");
                let stored = if transposed {
                    // The same logits, stored [b, vocab, l] and viewed back.
                    let mut t = vec![0.0f32; logits.len()];
                    for bi in 0..b {
                        for r in 0..l {
                            for c in 0..vocab {
                                t[(bi * vocab + c) * l + r] = logits[(bi * l + r) * vocab + c];
                            }
                        }
                    }
                    Tensor::<A, 3>::from_data(TensorData::new(t, [b, vocab, l]), &device)
                } else {
                    Tensor::<A, 3>::from_data(
                        TensorData::new(logits.clone(), [b, l, vocab]),
                        &device,
                    )
                }
                .require_grad();
                let x = if transposed {
                    stored.clone().swap_dims(1, 2)
                } else {
                    stored.clone()
                };
                let t = Tensor::<A, 2, Int>::from_data(
                    TensorData::new(targets.clone(), [b, l]),
                    &device,
                );
                let w =
                    Tensor::<A, 2>::from_data(TensorData::new(weights.clone(), [b, l]), &device);
                let x64 = Tensor::<A64, 3>::from_data(
                    TensorData::new(logits.clone(), [b, l, vocab]).convert::<f64>(),
                    (&device, DType::F64),
                )
                .require_grad();
                let t64 = Tensor::<A64, 2, Int>::from_data(
                    TensorData::new(targets.clone(), [b, l]),
                    &device,
                );
                let w64 = Tensor::<A64, 2>::from_data(
                    TensorData::new(weights.clone(), [b, l]).convert::<f64>(),
                    (&device, DType::F64),
                );
                let ours = token_nll(x, t);
                let want = token_nll_tensor(x64.clone(), t64);
                let ov = ours.to_data().to_vec::<f32>().unwrap();
                let wv = want.to_data().convert::<f32>().to_vec::<f32>().unwrap();
                for (o, w) in ov.iter().zip(&wv) {
                    assert!(
                        (o - w).abs() < 2e-5 * w.abs().max(1.0),
                        "{case}: nll {o} vs {w}"
                    );
                }
                let (g, g64) = if mean {
                    (ours.mean().backward(), want.mean().backward())
                } else {
                    ((ours * w).sum().backward(), (want * w64).sum().backward())
                };
                let mut dx = stored.grad(&g).unwrap();
                if transposed {
                    dx = dx.swap_dims(1, 2);
                }
                let dx = dx.into_data().to_vec::<f32>().unwrap();
                let dx64 = x64
                    .grad(&g64)
                    .unwrap()
                    .into_data()
                    .convert::<f32>()
                    .to_vec::<f32>()
                    .unwrap();
                for (i, (o, w)) in dx.iter().zip(&dx64).enumerate() {
                    assert!((o - w).abs() < 1e-6, "{case}: gradient {i}: {o} vs {w}");
                }
            }
        }
        // A target outside 0..vocab: the tensor path (Burn's gather), not the kernel.
        type N = NdArray<f32>;
        let x = Tensor::<N, 3>::from_data(
            TensorData::new(logits[..vocab].to_vec(), [1, 1, vocab]),
            &device,
        );
        let inside = Tensor::<N, 2, Int>::from_data(TensorData::new(vec![3i64], [1, 1]), &device);
        let a = token_nll(x.clone(), inside.clone()).into_scalar();
        let b_ = token_nll_tensor(x, inside).into_scalar();
        assert!((a - b_).abs() < 1e-5, "{a} vs {b_}");
    }

    /// The distance-table lookup under autodiff against Burn's `select` of the same table (the
    /// tensor path): values, and the table's gradient under a weighted sum (pairs at the same
    /// distance add up), for a causal chunk after earlier keys, a non-causal block (both signs
    /// of the offset) and sparse randomized positions; a distance past the table hands back.
    #[test]
    fn distance_table_lookup_is_select_in_values_and_gradients() {
        let _graphs = crate::util::autodiff_test_lock();
        type A = Autodiff<NdArray<f32>>;
        let device = Default::default();
        let normal = Distribution::Normal(0.0, 1.0);
        let h = 3;
        for (case, rows, cols) in [
            (
                "causal chunk",
                (4..9).collect::<Vec<i64>>(),
                (0..9).collect::<Vec<i64>>(),
            ),
            ("non-causal", (0..6).collect(), (0..6).collect()),
            (
                "randomized",
                vec![3, 10, 17, 40],
                vec![0, 3, 10, 17, 22, 40],
            ),
        ] {
            let n = 41;
            let table = Tensor::<A, 2>::random([h, n], normal, &device).require_grad();
            let ours = distance_table_bias(table.clone(), &rows, &cols)
                .expect("a kernel on Autodiff<NdArray<f32>>");
            let (lq, lk) = (rows.len(), cols.len());
            let index: Vec<i64> = rows
                .iter()
                .flat_map(|&p| cols.iter().map(move |&c| (p - c).abs()))
                .collect();
            let index = Tensor::<A, 1, Int>::from_data(TensorData::new(index, [lq * lk]), &device);
            let want = table.clone().select(1, index).reshape([1, h, lq, lk]);
            assert_eq!(
                max_diff(ours.clone().inner(), want.clone().inner()),
                0.0,
                "{case}"
            );
            let w = Tensor::<A, 4>::random([1, h, lq, lk], normal, &device);
            let g1 = (ours * w.clone()).sum().backward();
            let g2 = (want * w).sum().backward();
            let d = max_diff(table.grad(&g1).unwrap(), table.grad(&g2).unwrap());
            assert!(d < 1e-5, "{case}: the table's gradient differs by {d}");
        }
        let table = Tensor::<A, 2>::zeros([h, 4], &device);
        assert!(distance_table_bias(table, &[0, 1, 2, 3, 4], &[0, 1, 2, 3, 4]).is_none());
    }

    /// Without autodiff the kernel gives the same values, and it hands other shapes back.
    #[test]
    fn fused_attention_without_autodiff_and_bad_shapes() {
        type N = NdArray<f32>;
        let device = Default::default();
        let normal = Distribution::Normal(0.0, 1.0);
        let q = Tensor::<N, 4>::random([2, 2, 5, 4], normal, &device);
        let k = Tensor::<N, 4>::random([2, 2, 8, 4], normal, &device);
        let v = Tensor::<N, 4>::random([2, 2, 8, 3], normal, &device);
        let bias = Tensor::<N, 4>::random([1, 2, 5, 8], normal, &device);
        let fused = attention(
            q.clone(),
            k.clone(),
            v.clone(),
            Some(bias.clone()),
            0.5,
            Some(3),
        )
        .expect("a kernel on NdArray<f32>");
        let reference =
            attention_reference(q.clone(), k.clone(), v.clone(), Some(bias), 0.5, Some(3));
        let d = max_diff(fused, reference);
        assert!(d < 1e-5, "values differ by {d}");
        let wrong_bias = Tensor::<N, 4>::zeros([1, 2, 5, 7], &device);
        assert!(attention(q.clone(), k.clone(), v.clone(), Some(wrong_bias), 0.5, None).is_none());
        let wrong_v = Tensor::<N, 4>::zeros([2, 2, 7, 3], &device);
        assert!(attention(q, k, wrong_v, None, 0.5, None).is_none());
    }

    #[test]
    fn fused_gelu_is_the_tensor_path_in_values() {
        let device = Default::default();
        // Large enough for several rayon chunks, and a ragged last one; values far into both
        // tails.
        let x = Tensor::<NdArray<f32>, 3>::random(
            [3, 70, 333],
            Distribution::Normal(0.0, 4.0),
            &device,
        );
        assert!(applies::<NdArray<f32>>());
        let d = max_diff(gelu(x.clone()), crate::util::gelu_exact(x.clone()));
        assert!(d <= 1e-6, "fused GELU differs by {d}");
        // A transposed (non-contiguous) input reads in logical order.
        let t = x.swap_dims(1, 2);
        let d = max_diff(gelu(t.clone()), crate::util::gelu_exact(t));
        assert!(d <= 1e-6, "fused GELU on a transposed input differs by {d}");
    }

    #[test]
    fn fused_gelu_is_the_tensor_path_in_gradients() {
        let _graphs = crate::util::autodiff_test_lock();
        type A = Autodiff<NdArray<f32>>;
        assert!(applies_autodiff::<A>() && !applies::<A>());
        let device = Default::default();
        let base =
            Tensor::<NdArray<f32>, 2>::random([129, 257], Distribution::Normal(0.0, 3.0), &device);
        let w = Tensor::<A, 2>::random([129, 257], Distribution::Default, &device);
        // On a leaf, and on an intermediate tensor (tracked, though `is_require_grad` says no:
        // the model's case, GELU after a linear layer).
        for intermediate in [false, true] {
            let run = |fused: bool| {
                let x = Tensor::<A, 2>::from_inner(base.clone()).require_grad();
                let input = if intermediate {
                    x.clone() * 1.5 - 0.25
                } else {
                    x.clone()
                };
                // Two uses of the output, so that the node's gradient is a sum.
                let y = if fused {
                    gelu(input)
                } else {
                    crate::util::gelu_exact(input)
                };
                let loss = (y.clone() * w.clone()).sum() + (y.clone() * y.clone()).sum();
                let grads = loss.backward();
                (y.inner(), x.grad(&grads).unwrap())
            };
            let (y1, g1) = run(true);
            let (y2, g2) = run(false);
            assert!(max_diff(y1, y2) <= 1e-6);
            let scale = g2.clone().abs().max().into_scalar().max(1.0);
            let d = max_diff(g1, g2);
            assert!(
                d <= 2e-6 * scale,
                "fused GELU gradient (intermediate input: {intermediate}) differs by {d} (scale {scale})"
            );
        }
    }

    /// The tensor path of [`fused_softmax`]: `mask_fill(-inf)` at future keys, then softmax.
    fn softmax_reference<B: Backend>(x: Tensor<B, 4>, causal_from: Option<usize>) -> Tensor<B, 4> {
        let [b, h, rows, keys] = x.dims();
        let x = match causal_from {
            Some(q0) => {
                let i = Tensor::<B, 1, Int>::arange(q0 as i64..(q0 + rows) as i64, &x.device())
                    .reshape([rows, 1])
                    .expand([rows, keys]);
                let j = Tensor::<B, 1, Int>::arange(0..keys as i64, &x.device())
                    .reshape([1, keys])
                    .expand([rows, keys]);
                let future = j.greater(i).unsqueeze::<4>().expand([b, h, rows, keys]);
                x.mask_fill(future, f32::NEG_INFINITY)
            }
            None => x,
        };
        burn::tensor::activation::softmax(x, 3)
    }

    /// Full causal, a chunk (rows 5.. of 13 keys), a decode step (one row), an extra key past
    /// the last row (DAPE V2's lookahead column) and non-causal.
    const SPANS: &[([usize; 4], Option<usize>)] = &[
        ([2, 3, 13, 13], Some(0)),
        ([2, 3, 4, 9], Some(5)),
        ([1, 2, 1, 17], Some(16)),
        ([2, 2, 6, 7], Some(0)),
        ([2, 3, 5, 11], None),
    ];

    #[test]
    fn fused_softmax_is_the_tensor_path_in_values() {
        let device = Default::default();
        for &(dims, causal_from) in SPANS {
            let x =
                Tensor::<NdArray<f32>, 4>::random(dims, Distribution::Normal(0.0, 3.0), &device);
            let fused = fused_softmax(x.clone(), causal_from).expect("the kernel applies");
            let d = max_diff(fused, softmax_reference(x, causal_from));
            assert!(
                d <= 1e-6,
                "{dims:?} {causal_from:?}: fused softmax differs by {d}"
            );
        }
    }

    /// The gradient of `Σ p·w + Σ p²` with respect to the logits, `p = softmax` over each row's
    /// visible keys, computed in f64 on the host from the formula `y ⊙ (G − Σ G y)`.
    fn softmax_grad_f64(
        x: &[f32],
        w: &[f32],
        [_, _, rows, keys]: [usize; 4],
        causal_from: Option<usize>,
    ) -> Vec<f64> {
        let mut grad = vec![0.0; x.len()];
        for row in 0..x.len() / keys {
            let n = match causal_from {
                Some(q0) => (q0 + row % rows + 1).min(keys),
                None => keys,
            };
            let (x, w) = (
                &x[row * keys..row * keys + n],
                &w[row * keys..row * keys + n],
            );
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let e: Vec<f64> = x.iter().map(|&v| (f64::from(v) - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            let y: Vec<f64> = e.iter().map(|v| v / sum).collect();
            let g: Vec<f64> = (0..n).map(|j| f64::from(w[j]) + 2.0 * y[j]).collect();
            let dot: f64 = (0..n).map(|j| g[j] * y[j]).sum();
            for j in 0..n {
                grad[row * keys + j] = y[j] * (g[j] - dot);
            }
        }
        grad
    }

    #[test]
    fn fused_softmax_gradient_is_the_formula_and_the_tensor_path() {
        let _graphs = crate::util::autodiff_test_lock();
        type A = Autodiff<NdArray<f32>>;
        let device = Default::default();
        for &(dims, causal_from) in SPANS {
            let base =
                Tensor::<NdArray<f32>, 4>::random(dims, Distribution::Normal(0.0, 3.0), &device);
            let w = Tensor::<NdArray<f32>, 4>::random(dims, Distribution::Default, &device);
            let run = |fused: bool| {
                let x = Tensor::<A, 4>::from_inner(base.clone()).require_grad();
                let p = if fused {
                    fused_softmax(x.clone(), causal_from).expect("the kernel applies")
                } else {
                    softmax_reference(x.clone(), causal_from)
                };
                // Two uses of the output, so that the node's incoming gradient is a sum.
                let loss =
                    (p.clone() * Tensor::from_inner(w.clone())).sum() + (p.clone() * p).sum();
                let grads = loss.backward();
                x.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap()
            };
            let exact = softmax_grad_f64(
                &base.clone().into_data().to_vec::<f32>().unwrap(),
                &w.clone().into_data().to_vec::<f32>().unwrap(),
                dims,
                causal_from,
            );
            let err = |g: &[f32]| {
                g.iter()
                    .zip(&exact)
                    .map(|(a, b)| (f64::from(*a) - b).abs())
                    .fold(0.0, f64::max)
            };
            let (fused, tensor) = (err(&run(true)), err(&run(false)));
            // Burn's composite backward (max, exp, sum, div) rounds more: up to ~1e-4 here.
            assert!(
                fused <= 2e-6,
                "{dims:?} {causal_from:?}: fused softmax gradient off by {fused:e}"
            );
            assert!(
                tensor <= 1e-3,
                "{dims:?} {causal_from:?}: tensor path off by {tensor:e}"
            );
        }
    }

    #[test]
    fn fused_softmax_hands_other_backends_back() {
        // Another backend type gets its input back, for the caller's tensor path.
        let device = Default::default();
        let x = Tensor::<NdArray<f64>, 4>::zeros([1, 1, 2, 2], &device);
        assert!(fused_softmax(x, Some(0)).is_err());
    }

    #[test]
    fn fused_gelu_leaves_untracked_inputs_untracked() {
        let _graphs = crate::util::autodiff_test_lock();
        type A = Autodiff<NdArray<f32>>;
        let device = Default::default();
        let x = Tensor::<A, 1>::from_floats([-1.0, 0.0, 2.0], &device);
        let y = gelu(x);
        assert!(!y.is_require_grad());
        let expected = [-0.158_655_26f32, 0.0, 1.954_499_7];
        for (got, want) in y.into_data().to_vec::<f32>().unwrap().iter().zip(expected) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
    }
}
