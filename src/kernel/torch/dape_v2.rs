//! DAPE V2's correction on LibTorch: PyTorch's `conv2d` and LeakyReLU kernels per block of
//! query rows; under autodiff one graph node that keeps only the logits, the bias map and the
//! weights, its backward pass recomputing each block's hidden channels and running PyTorch's
//! `convolution_backward` for both convolutions.
//!
//! For a block `a` `[batch, H, rows, keys]` of the logits and `m` `[1, H, rows, keys]` of the
//! bias map, with `keep` 1 at the keys a row can see and 0 after them (causal rows):
//! `pre = W1_A ⋆ (a ⊙ keep) + W1_B ⋆ (m ⊙ keep) + b1` (`⋆`: the `1 × k` cross-correlation along
//! the keys, zero padding `k / 2`; the bias's half formed once for the batch),
//! `hidden = LeakyReLU(pre)` (`⊙ keep` with `mask_future_hidden`),
//! `out = a + m + W2 ⋆ hidden + b2`. The reference it must equal is
//! `DapeV2::forward_tensor_path` (`tests/torch_kernels.rs`).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::Backward;
use burn::backend::autodiff::ops::Ops;
use burn::backend::autodiff::NodeId;
use burn::backend::libtorch::TchTensor;
use burn::prelude::*;
use burn::tensor::TensorPrimitive;

use super::correction_node::Parents;
use super::dape::{accumulate, row_blocks};
use super::{applies, applies_any, Tb};
use crate::kernel::{cast, cast_opt};

/// DAPE V2's two convolutions on LibTorch, in `Conv2d`'s layouts: `w1` `[D, C, 1, k]` (`C = 2H`
/// over a bias, `H` without), `b1` `[D]`, `w2` `[H, D, 1, k]`, `b2` `[H]`.
#[derive(Clone, Debug)]
struct KeyConvs {
    w1: TchTensor,
    b1: Option<TchTensor>,
    w2: TchTensor,
    b2: Option<TchTensor>,
    slope: f64,
    mask_future_hidden: bool,
    /// The first query row's position and whether rows are causal (for `keep`).
    query_start: i64,
    causal: bool,
}

/// The inputs of one block and what the backward pass recomputes from them.
struct Hidden {
    /// `a ⊙ keep`, `m ⊙ keep`.
    xa: tch::Tensor,
    xm: Option<tch::Tensor>,
    /// `[1, 1, rows, keys]`, or `None` when every key is visible.
    keep: Option<tch::Tensor>,
    /// The pre-activations and the hidden channels, `[batch, D, rows, keys]`.
    pre: tch::Tensor,
    hidden: tch::Tensor,
}

impl KeyConvs {
    fn heads(&self) -> i64 {
        self.w2.tensor.size()[0]
    }

    fn padding(&self) -> [i64; 2] {
        [0, self.w1.tensor.size()[3] / 2]
    }

    /// `W1`'s input channels for the logits (`[D, H, 1, k]`) and for the bias map.
    fn first_weights(&self) -> (tch::Tensor, tch::Tensor) {
        let (w1, h) = (&self.w1.tensor, self.heads());
        let wb = if w1.size()[1] > h {
            w1.narrow(1, h, h)
        } else {
            w1.narrow(1, 0, 0)
        };
        (w1.narrow(1, 0, h), wb)
    }

    /// `keep` for the block of `rows` rows from `r0` over `keys` keys: 1 where the key's index is
    /// at most the row's position.
    fn keep(&self, r0: i64, rows: i64, keys: i64, like: &tch::Tensor) -> Option<tch::Tensor> {
        let first = self.query_start + r0;
        if !self.causal || first + 1 >= keys {
            return None;
        }
        let opts = (tch::Kind::Float, like.device());
        let key = tch::Tensor::arange(keys, opts).view([1, 1, 1, keys]);
        let row = tch::Tensor::arange(rows, opts).view([1, 1, rows, 1]) + first as f64;
        Some(key.le_tensor(&row).to_kind(tch::Kind::Float))
    }

    fn conv(&self, x: &tch::Tensor, w: &tch::Tensor, b: Option<&tch::Tensor>) -> tch::Tensor {
        x.conv2d(w, b, [1, 1], self.padding(), [1, 1], 1)
    }

    /// The block's masked inputs, pre-activations and hidden channels.
    fn hidden(&self, a: &tch::Tensor, m: Option<&tch::Tensor>, r0: i64) -> Hidden {
        let s = a.size();
        let keep = self.keep(r0, s[2], s[3], a);
        let masked = |x: &tch::Tensor| match &keep {
            Some(k) => x * k,
            None => x.shallow_clone(),
        };
        let (wa, wb) = self.first_weights();
        let xa = masked(a);
        let xm = m.map(masked);
        let mut pre = self.conv(&xa, &wa, self.b1.as_ref().map(|b| &b.tensor));
        if let Some(xm) = &xm {
            let _ = pre.g_add_(&self.conv(xm, &wb, None::<&tch::Tensor>));
        }
        let mut hidden = pre.leaky_relu_backward(&pre, self.slope, false);
        if let (true, Some(k)) = (self.mask_future_hidden, &keep) {
            hidden *= k;
        }
        Hidden {
            xa,
            xm,
            keep,
            pre,
            hidden,
        }
    }

    /// `a + m + f` for one block.
    fn forward(&self, a: &tch::Tensor, m: Option<&tch::Tensor>, r0: i64) -> tch::Tensor {
        let hidden = self.hidden(a, m, r0).hidden;
        let mut out = self.conv(
            &hidden,
            &self.w2.tensor,
            self.b2.as_ref().map(|b| &b.tensor),
        );
        let _ = out.g_add_(a);
        if let Some(m) = m {
            let _ = out.g_add_(m);
        }
        out
    }

    /// The gradients of one block from its output gradient `g` `[batch, H, rows, keys]`.
    fn backward(
        &self,
        a: &tch::Tensor,
        m: Option<&tch::Tensor>,
        g: &tch::Tensor,
        r0: i64,
        out: &mut V2Grads,
    ) {
        let Hidden {
            xa,
            xm,
            keep,
            pre,
            hidden,
        } = self.hidden(a, m, r0);
        let pad = self.padding()[1];
        let (d_hidden, dw2) = conv_backward(g, &hidden, &self.w2.tensor, pad);
        drop(hidden);
        accumulate(&mut out.w2, dw2);
        if self.b2.is_some() {
            accumulate(
                &mut out.b2,
                g.sum_dim_intlist([0i64, 2, 3].as_slice(), false, None),
            );
        }
        let d_hidden = match (self.mask_future_hidden, &keep) {
            (true, Some(k)) => d_hidden * k,
            _ => d_hidden,
        };
        let d_pre = pre.leaky_relu_backward(&d_hidden, self.slope, false);
        drop((pre, d_hidden));
        if self.b1.is_some() {
            accumulate(
                &mut out.b1,
                d_pre.sum_dim_intlist([0i64, 2, 3].as_slice(), false, None),
            );
        }
        let (wa, wb) = self.first_weights();
        let masked = |x: tch::Tensor| match &keep {
            Some(k) => x * k,
            None => x,
        };
        let (dxa, dwa) = conv_backward(&d_pre, &xa, &wa, pad);
        let mut da = masked(dxa);
        let _ = da.g_add_(g);
        out.logits.push(da);
        let dw1 = match (m, &xm) {
            (Some(_), Some(xm)) => {
                // The bias's half ran once for the batch: its gradient sums the batch's.
                let d_pre_sum = d_pre.sum_dim_intlist([0i64].as_slice(), true, None);
                let (dxm, dwb) = conv_backward(&d_pre_sum, xm, &wb, pad);
                let mut dm = masked(dxm);
                let _ = dm.g_add_(&g.sum_dim_intlist([0i64].as_slice(), true, None));
                out.bias.push(dm);
                tch::Tensor::cat(&[dwa, dwb], 1)
            }
            _ => dwa,
        };
        accumulate(&mut out.w1, dw1);
    }
}

/// The backward pass of `y = w ⋆ x` (stride 1, zero padding `pad` along the keys only) for the
/// output gradient `go` `[batch, O, rows, keys]`: the input's gradient `[batch, C, rows, keys]`
/// (the transposed convolution) and the weight's `[O, C, 1, k]`, `dW[o, c, t] = Σ go[b, o, r, j]
/// · x_padded[b, c, r, j + t]` (one contraction per tap; tch 0.22 binds no
/// `convolution_backward`).
fn conv_backward(
    go: &tch::Tensor,
    x: &tch::Tensor,
    w: &tch::Tensor,
    pad: i64,
) -> (tch::Tensor, tch::Tensor) {
    let dx = go.conv_transpose2d(w, None::<&tch::Tensor>, [1, 1], [0, pad], [0, 0], 1, [1, 1]);
    let keys = x.size()[3];
    let padded = x.constant_pad_nd([pad, pad]);
    let taps: Vec<tch::Tensor> = (0..w.size()[3])
        .map(|t| go.tensordot(&padded.narrow(3, t, keys), [0i64, 2, 3], [0i64, 2, 3]))
        .collect();
    (dx, tch::Tensor::stack(&taps, 2).unsqueeze(2))
}

/// The gradients of the blocks so far: the logits' and the bias map's per block (in row
/// order), the weights' summed.
#[derive(Default)]
struct V2Grads {
    logits: Vec<tch::Tensor>,
    bias: Vec<tch::Tensor>,
    w1: Option<tch::Tensor>,
    b1: Option<tch::Tensor>,
    w2: Option<tch::Tensor>,
    b2: Option<tch::Tensor>,
}

/// What the node keeps: its inputs (shared), the weights, and the rows per block.
#[derive(Clone, Debug)]
struct V2State {
    logits: TchTensor,
    bias: Option<TchTensor>,
    convs: KeyConvs,
    rows: i64,
}

/// The forward pass over blocks of `rows` query rows.
fn v2_forward(
    convs: &KeyConvs,
    a: &tch::Tensor,
    m: Option<&tch::Tensor>,
    rows: i64,
) -> tch::Tensor {
    let mut parts = Vec::new();
    row_blocks(a.size()[2], rows, |r0, n| {
        parts.push(convs.forward(
            &a.narrow(2, r0, n),
            m.map(|m| m.narrow(2, r0, n)).as_ref(),
            r0,
        ));
    });
    match parts.len() {
        1 => parts.pop().expect("one block"),
        _ => tch::Tensor::cat(&parts, 2),
    }
}

#[derive(Debug)]
struct V2Backward;

impl Backward<Tb, 6> for V2Backward {
    type State = V2State;

    fn backward(self, ops: Ops<Self::State, 6>, grads: &mut Gradients, _: &mut Checkpointer) {
        let g = grads.consume::<Tb>(&ops.node).tensor;
        let s = &ops.state;
        let [p_logits, p_bias, p_w1, p_b1, p_w2, p_b2] =
            ops.parents.each_ref().map(|p| p.as_ref().map(|n| n.id));
        let (a, m) = (&s.logits.tensor, s.bias.as_ref().map(|m| &m.tensor));
        let mut out = V2Grads::default();
        row_blocks(a.size()[2], s.rows, |r0, n| {
            s.convs.backward(
                &a.narrow(2, r0, n),
                m.map(|m| m.narrow(2, r0, n)).as_ref(),
                &g.narrow(2, r0, n),
                r0,
                &mut out,
            );
        });
        let cat = |parts: Vec<tch::Tensor>| match parts.len() {
            0 => None,
            1 => parts.into_iter().next(),
            _ => Some(tch::Tensor::cat(&parts, 2)),
        };
        let mut put = |parent: Option<NodeId>, t: Option<tch::Tensor>| {
            if let (Some(id), Some(t)) = (parent, t) {
                grads.register::<Tb>(id, TchTensor::new(t));
            }
        };
        put(p_logits, cat(out.logits));
        put(p_bias, cat(out.bias));
        put(p_w1, out.w1);
        put(p_b1, out.b1);
        put(p_w2, out.w2);
        put(p_b2, out.b2);
    }
}

/// DAPE V2 (`logits + bias + f(tril([logits ‖ bias]))`, `f` two `1 × k` convolutions along the
/// keys) on LibTorch, for logits `[batch, H, lq, lk]` and a bias map `[1, H, lq, lk]` shared by
/// the batch (or none, over NoPE), over blocks of query rows whose hidden tensor `[batch, D,
/// rows, lk]` stays under `budget` elements; `rows` gives the first query row's position and
/// whether rows are causal (a causal row sees the keys up to its position). Under autodiff it is one graph node that keeps only
/// its inputs (Burn's tensor path keeps every block's hidden channels and a dozen nodes' inputs).
/// `None` on any other backend, or for shapes it does not take (the tensor path then runs).
#[allow(clippy::too_many_arguments)]
pub(crate) fn dape_v2<B: Backend>(
    logits: Tensor<B, 4>,
    bias: Option<Tensor<B, 4>>,
    [w1, w2]: [Tensor<B, 4>; 2],
    [b1, b2]: [Option<Tensor<B, 1>>; 2],
    slope: f64,
    mask_future_hidden: bool,
    (query_start, causal): (usize, bool),
    budget: usize,
) -> Option<Tensor<B, 4>> {
    let [batch, h, lq, lk] = logits.dims();
    let [d, c, one, k] = w1.dims();
    let fits = bias.as_ref().is_none_or(|m| m.dims() == [1, h, lq, lk])
        && c == h * (1 + usize::from(bias.is_some()))
        && one == 1
        && k % 2 == 1
        && w2.dims() == [h, d, 1, k]
        && b1.as_ref().is_none_or(|b| b.dims() == [d])
        && b2.as_ref().is_none_or(|b| b.dims() == [h]);
    if !applies_any::<B>() || !fits || batch * h * lq * lk == 0 {
        return None;
    }
    let rows = (budget / (batch * d * lk).max(1)).max(1) as i64;
    let convs =
        |w1: TchTensor, b1: Option<TchTensor>, w2: TchTensor, b2: Option<TchTensor>| KeyConvs {
            w1,
            b1,
            w2,
            b2,
            slope,
            mask_future_hidden,
            query_start: query_start as i64,
            causal,
        };
    if applies::<B>() {
        let raw4 =
            |t: Tensor<B, 4>| cast::<_, Tensor<Tb, 4>>(t).map(|t| t.into_primitive().tensor());
        let raw1 = |t: Option<Tensor<B, 1>>| {
            cast_opt::<_, Tensor<Tb, 1>>(t).map(|t| t.map(|t| t.into_primitive().tensor()))
        };
        let convs = convs(raw4(w1)?, raw1(b1)?, raw4(w2)?, raw1(b2)?);
        let a = raw4(logits)?;
        let m = match bias {
            Some(m) => Some(raw4(m)?),
            None => None,
        };
        let out = v2_forward(&convs, &a.tensor, m.as_ref().map(|m| &m.tensor), rows);
        let out = Tensor::<Tb, 4>::from_primitive(TensorPrimitive::Float(TchTensor::new(out)));
        return cast(out);
    }
    let parents = Parents::new(logits, bias, [w1, w2], [b1, b2])?;
    let ([w1, w2], [b1, b2]) = parents.weights();
    let convs = convs(w1, b1, w2, b2);
    let (a, m) = parents.inputs();
    let out = v2_forward(&convs, &a.tensor, m.as_ref().map(|m| &m.tensor), rows);
    let state = V2State {
        logits: a,
        bias: m,
        convs,
        rows,
    };
    parents.record(V2Backward, state, out)
}
