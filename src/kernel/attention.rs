//! Attention from the queries to the output in one kernel, `softmax(scale·QKᵀ + bias, mask)·V`,
//! for separate and for packed q, k, v: which backend gets which kernel (`None`: the caller
//! takes the tensor path).

use burn::prelude::*;

#[cfg(feature = "ndarray")]
use super::ndarray::{
    applies, applies_autodiff, attention_autodiff, attention_nd, attention_packed_autodiff,
    attention_packed_nd,
};

#[cfg(feature = "tch")]
use super::torch;

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

/// Whether q `[batch, heads, rows, d_head]`, k `[batch, heads, keys, d_head]`, v
/// `[batch, heads, keys, d_v]` and the bias `[1 or batch, heads, rows, keys]` fit together, all
/// f32: what the fused attention kernels take.
pub(super) fn operands_fit<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    bias: Option<&Tensor<B, 4>>,
) -> bool {
    let [b, h, rows, dh] = q.dims();
    let [kb, kh, keys, kdh] = k.dims();
    let [vb, vh, vkeys, _] = v.dims();
    let shapes_agree = (kb, kh, kdh) == (b, h, dh)
        && (vb, vh, vkeys) == (b, h, keys)
        && bias.is_none_or(|t| {
            let [bb, bh, br, bk] = t.dims();
            (bb == 1 || bb == b) && (bh, br, bk) == (h, rows, keys)
        });
    let f32s = [q, k, v]
        .into_iter()
        .chain(bias)
        .all(|t| t.dtype() == burn::tensor::DType::F32);
    shapes_agree && f32s
}

/// Attention from the queries to the output in one kernel on ndarray:
/// `softmax(scale · q kᵀ + bias, causal mask) · v`, for `q` `[batch, heads, rows, d_head]`,
/// `k` `[batch, heads, keys, d_head]`, `v` `[batch, heads, keys, d_v]` and an optional additive
/// `bias` `[1 or batch, heads, rows, keys]`. With `causal_from = Some(q0)`, row `r` (absolute
/// position `q0 + r`) sees keys `0..=q0 + r`, as [`crate::kernel::fused_softmax`] masks. The output is
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
    if !operands_fit(&q, &k, &v, bias.as_ref()) {
        return None;
    }
    #[cfg(feature = "ndarray")]
    {
        if applies::<B>() {
            return attention_nd(q, k, v, bias, scale, causal_from, None);
        }
        if applies_autodiff::<B>() {
            return attention_autodiff(q, k, v, bias, scale, causal_from, None);
        }
    }
    #[cfg(feature = "tch")]
    if torch::applies_any::<B>() {
        return torch::attention(q, k, v, bias, scale, causal_from);
    }
    let _ = (q, k, v, bias, scale, causal_from);
    None
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
