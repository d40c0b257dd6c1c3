//! DAPE V1's correction on LibTorch: three batched matrix products and PyTorch's LeakyReLU
//! kernel per block of query rows; under autodiff one graph node that keeps only the logits,
//! the bias map and the weights, its backward pass recomputing each block's pre-activations.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::Backward;
use burn::backend::autodiff::ops::Ops;
use burn::backend::autodiff::NodeId;
use burn::backend::libtorch::TchTensor;
use burn::prelude::*;
use burn::tensor::TensorPrimitive;

use super::correction_node::Parents;
use super::{applies, applies_any, Tb};
use crate::kernel::cast;
use crate::kernel::cast_opt;

/// DAPE V1's MLP on LibTorch, with the weights as Burn's `Linear` layers hold them: `w1`
/// `[C, D]` (`C = 2H` over a bias, `H` without), `b1` `[D]`, `w2` `[D, H]`, `b2` `[H]`. Each
/// function works on one block of query rows flattened to `pairs = rows · keys` columns: the
/// logits `a` `[batch, H, pairs]` and the bias map `m`, `[1, H, pairs]` (shared by the batch:
/// a base bias's) or `[batch, H, pairs]` (one per sequence: forgetting attention's).
#[derive(Clone, Debug)]
struct DapeMlp {
    w1: TchTensor,
    b1: Option<TchTensor>,
    w2: TchTensor,
    b2: Option<TchTensor>,
    slope: f64,
}

/// `w` `[r, s]` times each batch element of `x` `[batch, s, n]`: `[batch, r, n]`, by one
/// batched product (the weight broadcast, not copied).
fn weight_times(w: &tch::Tensor, x: &tch::Tensor) -> tch::Tensor {
    let [r, s] = [w.size()[0], w.size()[1]];
    w.unsqueeze(0).expand([x.size()[0], r, s], false).bmm(x)
}

impl DapeMlp {
    fn heads(&self) -> i64 {
        self.w2.tensor.size()[1]
    }

    /// The logits' half of the first layer, `[D, H]`, and the bias's (when there is one).
    fn first_layer(&self) -> (tch::Tensor, tch::Tensor) {
        let (w1, h) = (&self.w1.tensor, self.heads());
        let wb = if w1.size()[0] > h {
            w1.narrow(0, h, h).transpose(0, 1)
        } else {
            w1.narrow(0, 0, 0)
        };
        (w1.narrow(0, 0, h).transpose(0, 1), wb)
    }

    /// The pre-activations `z = W1ᵀ [a ‖ m] + b1`, `[batch, D, pairs]`: the batch-independent
    /// part (`W_B m + b1` for a shared map, `b1` alone for one per sequence) is formed once and
    /// added to the batch in one pass.
    fn pre_activation(&self, a: &tch::Tensor, m: Option<&tch::Tensor>) -> tch::Tensor {
        let (wa, wb) = self.first_layer();
        let mut z = weight_times(&wa, a);
        let mut shared = None;
        match m {
            Some(m) if shared_map(m) => shared = Some(wb.mm(&m.squeeze_dim(0)).unsqueeze(0)),
            Some(m) => {
                let _ = z.g_add_(&weight_times(&wb, m));
            }
            None => {}
        }
        if let Some(b1) = &self.b1 {
            let b1 = b1.tensor.view([1, -1, 1]);
            shared = Some(match shared {
                Some(mut s) => {
                    let _ = s.g_add_(&b1);
                    s
                }
                None => b1,
            });
        }
        if let Some(s) = shared {
            let _ = z.g_add_(&s);
        }
        z
    }

    /// LeakyReLU of `z` with this slope: PyTorch's LeakyReLU backward kernel given `z` as its
    /// own upstream gradient (`z` where `z > 0`, `slope · z` elsewhere), which takes any slope
    /// where tch's forward binding fixes it at 0.01.
    fn activate(&self, z: &tch::Tensor) -> tch::Tensor {
        z.leaky_relu_backward(z, self.slope, false)
    }

    /// `a + m + f([a ‖ m])` for one block.
    fn forward(&self, a: &tch::Tensor, m: Option<&tch::Tensor>) -> tch::Tensor {
        let act = self.activate(&self.pre_activation(a, m));
        let mut out = weight_times(&self.w2.tensor.transpose(0, 1), &act);
        if let Some(b2) = &self.b2 {
            let _ = out.g_add_(&b2.tensor.view([1, -1, 1]));
        }
        let _ = out.g_add_(a);
        if let Some(m) = m {
            let _ = out.g_add_(m);
        }
        out
    }
}

/// Which gradients a DAPE node's backward pass is asked for, in the order of its parents.
#[derive(Clone, Copy, Debug)]
struct DapeWants {
    logits: bool,
    bias: bool,
    w1: bool,
    b1: bool,
    w2: bool,
    b2: bool,
}

/// The gradients of one block (or their sums over the blocks, for the weights).
#[derive(Default)]
struct DapeGrads {
    logits: Vec<tch::Tensor>,
    bias: Vec<tch::Tensor>,
    w1: Option<tch::Tensor>,
    b1: Option<tch::Tensor>,
    w2: Option<tch::Tensor>,
    b2: Option<tch::Tensor>,
}

/// Whether a bias map `[1 or batch, H, pairs]` is shared by the batch.
fn shared_map(m: &tch::Tensor) -> bool {
    m.size()[0] == 1
}

/// `acc += x` for a gradient summed over blocks.
pub(super) fn accumulate(acc: &mut Option<tch::Tensor>, x: tch::Tensor) {
    match acc {
        Some(a) => {
            let _ = a.g_add_(&x);
        }
        None => *acc = Some(x),
    }
}

impl DapeMlp {
    /// The backward pass of one block from its output gradient `g` `[batch, H, pairs]`: the
    /// hidden activations are recomputed from the block's inputs (the node keeps none).
    fn backward(
        &self,
        a: &tch::Tensor,
        m: Option<&tch::Tensor>,
        g: &tch::Tensor,
        wants: DapeWants,
        out: &mut DapeGrads,
    ) {
        let z = self.pre_activation(a, m);
        let sum_02 = |t: &tch::Tensor| t.sum_dim_intlist([0i64, 2].as_slice(), false, None);
        if wants.w2 {
            // dW2 = Σ_batch act · gᵀ, `[D, H]`.
            let act = self.activate(&z);
            let dw2 = act
                .bmm(&g.transpose(1, 2))
                .sum_dim_intlist([0i64].as_slice(), false, None);
            accumulate(&mut out.w2, dw2);
        }
        if wants.b2 {
            accumulate(&mut out.b2, sum_02(g));
        }
        let first = wants.logits || wants.bias || wants.w1 || wants.b1;
        if !first {
            return;
        }
        // δ = (W2 g) ⊙ LeakyReLU'(z), `[batch, D, pairs]`.
        let delta = z.leaky_relu_backward(&weight_times(&self.w2.tensor, g), self.slope, false);
        drop(z);
        let (wa, wb) = self.first_layer();
        if wants.b1 {
            accumulate(&mut out.b1, sum_02(&delta));
        }
        // A shared map's products run over the batch's sum of δ, `[D, pairs]`.
        let delta_sum = m
            .filter(|m| shared_map(m))
            .map(|_| delta.sum_dim_intlist([0i64].as_slice(), false, None));
        let sum_0 = |t: tch::Tensor| t.sum_dim_intlist([0i64].as_slice(), false, None);
        if wants.w1 {
            // dW1 = Σ_batch [a ‖ m] · δᵀ, `[C, D]`.
            let da = sum_0(a.bmm(&delta.transpose(1, 2)));
            let dw1 = match (m, &delta_sum) {
                (Some(m), Some(ds)) => {
                    tch::Tensor::cat(&[da, m.squeeze_dim(0).mm(&ds.transpose(0, 1))], 0)
                }
                (Some(m), None) => tch::Tensor::cat(&[da, sum_0(m.bmm(&delta.transpose(1, 2)))], 0),
                (None, _) => da,
            };
            accumulate(&mut out.w1, dw1);
        }
        if wants.logits {
            let mut da = weight_times(&wa.transpose(0, 1), &delta);
            let _ = da.g_add_(g);
            out.logits.push(da);
        }
        if wants.bias && m.is_some() {
            // d m = W_Bᵀ δ + g, summed over the batch for a shared map.
            let db = match &delta_sum {
                Some(ds) => {
                    let mut db = wb.transpose(0, 1).mm(ds).unsqueeze(0);
                    let _ = db.g_add_(&g.sum_dim_intlist([0i64].as_slice(), true, None));
                    db
                }
                None => {
                    let mut db = weight_times(&wb.transpose(0, 1), &delta);
                    let _ = db.g_add_(g);
                    db
                }
            };
            out.bias.push(db);
        }
    }
}

/// What a DAPE node keeps: its inputs (the logits and the bias map themselves, shared), the
/// MLP's weights, and the rows per block.
#[derive(Clone, Debug)]
struct DapeState {
    logits: TchTensor,
    bias: Option<TchTensor>,
    mlp: DapeMlp,
    rows: i64,
}

/// Runs `each(r0, n)` over blocks of at most `rows` of `lq` query rows.
pub(super) fn row_blocks(lq: i64, rows: i64, mut each: impl FnMut(i64, i64)) {
    let mut r0 = 0;
    while r0 < lq {
        let n = rows.min(lq - r0);
        each(r0, n);
        r0 += n;
    }
}

/// Rows `r0..r0 + n` of `t` `[·, H, lq, lk]`, flattened to `[·, H, n · lk]`.
fn block_of(t: &tch::Tensor, r0: i64, n: i64) -> tch::Tensor {
    let s = t.size();
    t.narrow(2, r0, n).reshape([s[0], s[1], n * s[3]])
}

/// The forward pass of a DAPE node over blocks of `rows` query rows.
fn dape_forward(mlp: &DapeMlp, a: &tch::Tensor, m: Option<&tch::Tensor>, rows: i64) -> tch::Tensor {
    let s = a.size();
    let mut parts = Vec::new();
    row_blocks(s[2], rows, |r0, n| {
        let out = mlp.forward(&block_of(a, r0, n), m.map(|m| block_of(m, r0, n)).as_ref());
        parts.push(out.reshape([s[0], s[1], n, s[3]]));
    });
    match parts.len() {
        1 => parts.pop().expect("one block"),
        _ => tch::Tensor::cat(&parts, 2),
    }
}

#[derive(Debug)]
struct DapeBackward;

impl Backward<Tb, 6> for DapeBackward {
    type State = DapeState;

    fn backward(self, ops: Ops<Self::State, 6>, grads: &mut Gradients, _: &mut Checkpointer) {
        let g = grads.consume::<Tb>(&ops.node).tensor;
        let s = &ops.state;
        let [p_logits, p_bias, p_w1, p_b1, p_w2, p_b2] =
            ops.parents.each_ref().map(|p| p.as_ref().map(|n| n.id));
        let wants = DapeWants {
            logits: p_logits.is_some(),
            bias: p_bias.is_some() && s.bias.is_some(),
            w1: p_w1.is_some(),
            b1: p_b1.is_some() && s.mlp.b1.is_some(),
            w2: p_w2.is_some(),
            b2: p_b2.is_some() && s.mlp.b2.is_some(),
        };
        let (a, m) = (&s.logits.tensor, s.bias.as_ref().map(|m| &m.tensor));
        let size = a.size();
        let mut out = DapeGrads::default();
        row_blocks(size[2], s.rows, |r0, n| {
            s.mlp.backward(
                &block_of(a, r0, n),
                m.map(|m| block_of(m, r0, n)).as_ref(),
                &block_of(&g, r0, n),
                wants,
                &mut out,
            );
        });
        let rows_of = |parts: Vec<tch::Tensor>, batch: i64| {
            let parts: Vec<_> = parts
                .into_iter()
                .map(|p| {
                    let n = p.size()[2] / size[3];
                    p.reshape([batch, size[1], n, size[3]])
                })
                .collect();
            match parts.len() {
                1 => parts.into_iter().next().expect("one block"),
                _ => tch::Tensor::cat(&parts, 2),
            }
        };
        let mut put = |parent: Option<NodeId>, t: Option<tch::Tensor>| {
            if let (Some(id), Some(t)) = (parent, t) {
                grads.register::<Tb>(id, TchTensor::new(t));
            }
        };
        put(p_logits, wants.logits.then(|| rows_of(out.logits, size[0])));
        let maps = m.map_or(1, |m| m.size()[0]);
        put(p_bias, wants.bias.then(|| rows_of(out.bias, maps)));
        put(p_w1, out.w1);
        put(p_b1, out.b1);
        put(p_w2, out.w2);
        put(p_b2, out.b2);
    }
}

/// DAPE V1 (`logits + bias + f([logits ‖ bias])`) on LibTorch, for logits `[batch, H, lq, lk]`
/// and a bias map `[1, H, lq, lk]` shared by the batch, `[batch, H, lq, lk]` one per sequence
/// (forgetting attention's, for DAPE-FoX), or none (DAPE over NoPE), over blocks of query rows
/// whose hidden tensor `[batch, D, rows · lk]` stays under `budget` elements.
///
/// Each block is three batched matrix products and PyTorch's LeakyReLU kernel, the
/// batch-independent half of the first layer formed once. Under autodiff the whole correction
/// is one graph node that keeps only its inputs: its backward pass recomputes each block's
/// pre-activations and runs the five products of the gradients (Burn's tensor path keeps the
/// `[batch, D, pairs]` hidden tensors of every block, and runs a dozen nodes each way).
/// `None` on any other backend, or for shapes this node does not take (the tensor path then
/// runs).
#[allow(clippy::too_many_arguments)]
pub(crate) fn dape_v1<B: Backend>(
    logits: Tensor<B, 4>,
    bias: Option<Tensor<B, 4>>,
    w1: Tensor<B, 2>,
    b1: Option<Tensor<B, 1>>,
    w2: Tensor<B, 2>,
    b2: Option<Tensor<B, 1>>,
    slope: f64,
    budget: usize,
) -> Option<Tensor<B, 4>> {
    let [batch, h, lq, lk] = logits.dims();
    let [c, d] = w1.dims();
    let fits = bias
        .as_ref()
        .is_none_or(|m| m.dims() == [1, h, lq, lk] || m.dims() == [batch, h, lq, lk])
        && c == h * (1 + usize::from(bias.is_some()))
        && w2.dims() == [d, h]
        && b1.as_ref().is_none_or(|b| b.dims() == [d])
        && b2.as_ref().is_none_or(|b| b.dims() == [h]);
    if !applies_any::<B>() || !fits || batch * h * lq * lk == 0 {
        return None;
    }
    let rows = (budget / (batch * d * lk).max(1)).max(1) as i64;
    if applies::<B>() {
        let raw =
            |t: Tensor<B, 4>| cast::<_, Tensor<Tb, 4>>(t).map(|t| t.into_primitive().tensor());
        let mlp = DapeMlp {
            w1: cast::<_, Tensor<Tb, 2>>(w1)?.into_primitive().tensor(),
            b1: cast_opt::<_, Tensor<Tb, 1>>(b1)?.map(|b| b.into_primitive().tensor()),
            w2: cast::<_, Tensor<Tb, 2>>(w2)?.into_primitive().tensor(),
            b2: cast_opt::<_, Tensor<Tb, 1>>(b2)?.map(|b| b.into_primitive().tensor()),
            slope,
        };
        let a = raw(logits)?;
        let m = match bias {
            Some(m) => Some(raw(m)?),
            None => None,
        };
        let out = dape_forward(&mlp, &a.tensor, m.as_ref().map(|m| &m.tensor), rows);
        let out = Tensor::<Tb, 4>::from_primitive(TensorPrimitive::Float(TchTensor::new(out)));
        return cast(out);
    }
    let parents = Parents::new(logits, bias, [w1, w2], [b1, b2])?;
    let ([w1, w2], [b1, b2]) = parents.weights();
    let mlp = DapeMlp {
        w1,
        b1,
        w2,
        b2,
        slope,
    };
    let (a, m) = parents.inputs();
    let out = dape_forward(&mlp, &a.tensor, m.as_ref().map(|m| &m.tensor), rows);
    let state = DapeState {
        logits: a,
        bias: m,
        mlp,
        rows,
    };
    parents.record(DapeBackward, state, out)
}
