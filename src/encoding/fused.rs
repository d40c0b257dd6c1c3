//! Fused CPU kernels for DAPE's correction on the ndarray backend.
//!
//! DAPE's `f` is two skinny matrix products and an activation over every (query, key) pair. As
//! separate tensor operations each is a pass over `D × pairs` floats (`D` = 32), bound by memory
//! bandwidth on the CPU, and under autodiff each also keeps its activations for the backward
//! pass. Here one pass over a row of keys does all of it with the hidden vector in registers:
//! for a block of 16 keys it gathers the `C` input channels, forms the `D` hidden values,
//! applies LeakyReLU and the second layer, and writes `logits + bias + f`. Query rows run in
//! parallel (rayon); keys a causal row may not attend to are skipped (they are masked
//! afterwards, so only their finite `logits + bias` is written). The inner loops are compiled
//! twice, for AVX2 + FMA (picked at run time when the CPU has them) and for the baseline target.
//!
//! * [`dape_v1`] and [`dape_v2`] (both convolutions of a row in one pass) run for
//!   `NdArray<f32>`, checked by type: evaluation, validation and decoding.
//! * [`dape_v1_autodiff`] runs for `Autodiff<NdArray<f32>>` (training): DAPE V1 is recorded as
//!   one graph node whose backward pass, [`dape_v1_backward`], recomputes the hidden layer row by
//!   row and returns the gradients of the logits, the bias map and both layers. It runs each
//!   query row (all batch elements at once) as five matrix products over the row's (batch
//!   element, key) pairs, through the `gemm` crate: a per-pair loop cannot keep the weight
//!   gradients' sums in registers. [`dape_v2_autodiff`] does the same for DAPE V2: its
//!   backward pass, [`dape_v2_backward`], runs each `1 × k` convolution as one product over
//!   `k` key-shifted copies of its input.
//! * The bias map is `[1, H, rows, keys]` (a base bias shared by the batch) or `[batch, H, rows,
//!   keys]` (forgetting attention's, one per sequence: `dape_fox`).
//!
//! Every other backend (WGPU, LibTorch) keeps the tensor path. Sums run in another order than
//! the tensor path's, so results agree to float32 rounding, not bit for bit; the unit tests in
//! `dape.rs` check values and gradients against the tensor path.

// The lane loops index several fixed-size arrays in step (`acc[l] += w · x[l]`); written with
// an index they are what LLVM vectorises, and zipped iterators would hide nothing but that.
#![allow(clippy::needless_range_loop)]

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::NoCheckpointing};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::autodiff::NodeId;
use burn::prelude::*;
use burn::tensor::ops::{FloatTensor, FloatTensorOps};
use burn::tensor::{TensorData, TensorPrimitive};
use rayon::prelude::*;

use super::Span;
pub(crate) use crate::kernel::{applies, applies_autodiff, host};
use crate::kernel::{cast, cast_opt, finish_node, gemm, lane_sum, row_major_values, Ad, Mat, Nd};

/// Keys per block: two AVX registers of `f32`.
const LANES: usize = 16;

/// The weights of DAPE's `f = Linear(C → D) → LeakyReLU → Linear(D → H)`, on the host, in the
/// layouts the kernels read contiguously.
#[derive(Clone, Debug)]
pub(crate) struct Mlp {
    /// Input channels `C` (`2H` with a base bias, `H` without).
    c: usize,
    /// Hidden width `D`.
    d: usize,
    /// Heads `H` (outputs).
    h: usize,
    /// First layer, `[D, C]` (row `d`: the weights into hidden unit `d`).
    w1: Vec<f32>,
    /// First layer transposed, `[C, D]` (Burn's `Linear` layout).
    w1t: Vec<f32>,
    /// First bias, `[D]`.
    b1: Vec<f32>,
    /// Second layer, `[H, D]`.
    w2: Vec<f32>,
    /// Second layer transposed, `[D, H]` (Burn's `Linear` layout).
    w2t: Vec<f32>,
    /// Second bias, `[H]`.
    b2: Vec<f32>,
    /// LeakyReLU slope.
    slope: f32,
}

impl Mlp {
    /// From Burn's `Linear` layouts: `w1: [C, D]`, `w2: [D, H]`; missing biases are zero.
    pub(crate) fn new(
        [c, d, h]: [usize; 3],
        w1t: Vec<f32>,
        b1: Option<Vec<f32>>,
        w2t: Vec<f32>,
        b2: Option<Vec<f32>>,
        slope: f32,
    ) -> Self {
        Self {
            c,
            d,
            h,
            w1: transpose(&w1t, c, d),
            w1t,
            b1: b1.unwrap_or_else(|| vec![0.0; d]),
            w2: transpose(&w2t, d, h),
            w2t,
            b2: b2.unwrap_or_else(|| vec![0.0; h]),
            slope,
        }
    }
}

/// `[rows, cols]` → `[cols, rows]`.
fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = x[r * cols + c];
        }
    }
    out
}

/// Reads an optional layer bias (`Some(None)` when the layer has none; `None` when not `f32`).
pub(crate) fn host_bias<B: Backend>(
    bias: &Option<burn::module::Param<Tensor<B, 1>>>,
) -> Option<Option<Vec<f32>>> {
    match bias {
        Some(b) => host(b.val()).map(Some),
        None => Some(None),
    }
}

/// Runs a fused kernel `kernel(logits, bias map, dims)` on the host values of `logits` and of
/// the base bias's map over `span`, and returns its result as a tensor on the logits' device.
/// `None` (the caller then takes the tensor path) when a tensor is not `f32` or the bias map is
/// not `[1, H, rows, keys]`.
pub(crate) fn run_fused<B: Backend>(
    logits: &Tensor<B, 4>,
    bias: Option<&super::AdditiveBias<B>>,
    span: &Span,
    kernel: impl FnOnce(Vec<f32>, Option<&[f32]>, [usize; 4]) -> Vec<f32>,
) -> Option<Tensor<B, 4>> {
    let device = logits.device();
    let dims = logits.dims();
    let [_, h, lq, lk] = dims;
    let map = match bias {
        Some(bias) => {
            let m = bias.forward(span, &device);
            if m.dims() != [1, h, lq, lk] {
                return None;
            }
            Some(host(m)?)
        }
        None => None,
    };
    let out = kernel(host(logits.clone())?, map.as_deref(), dims);
    Some(Tensor::from_data(TensorData::new(out, dims), &device))
}

/// Splits `[planes, lq, lk]` values into one group per query row: group `i` holds row `i` of
/// every plane, in plane order. Groups are disjoint, so rows can be processed in parallel.
fn rows_by_query(data: &mut [f32], lq: usize, lk: usize) -> Vec<Vec<&mut [f32]>> {
    let planes = data.len() / (lq * lk).max(1);
    let mut groups: Vec<Vec<&mut [f32]>> = (0..lq).map(|_| Vec::with_capacity(planes)).collect();
    if lk == 0 {
        return groups;
    }
    for plane in data.chunks_mut(lq * lk) {
        for (i, row) in plane.chunks_mut(lk).enumerate() {
            groups[i].push(row);
        }
    }
    groups
}

/// Row `i` of every plane of a bias map `[1 or batch, H, lq, lk]`, in plane order.
fn bias_rows(bias: Option<&[f32]>, i: usize, lq: usize, lk: usize) -> Vec<&[f32]> {
    match bias {
        Some(m) if lq * lk > 0 => (0..m.len() / (lq * lk))
            .map(|p| &m[(p * lq + i) * lk..][..lk])
            .collect(),
        _ => Vec::new(),
    }
}

/// The `H` rows of batch element `bi` among the rows of a bias map `[1 or batch, H, ..]` (the
/// only ones when the map is shared by the batch); empty without a bias.
fn batch_rows<T>(rows: &[T], h: usize, bi: usize) -> &[T] {
    if rows.is_empty() || h == 0 {
        return rows;
    }
    let maps = rows.len() / h;
    &rows[(bi % maps) * h..][..h]
}

/// Index of the bias row that plane `plane` (batch element `plane / H`, head `plane % H`) of the
/// logits reads among `rows` bias rows (`H` for a shared map, `batch · H` for one per sequence).
fn bias_plane(plane: usize, h: usize, rows: usize) -> usize {
    let maps = (rows / h.max(1)).max(1);
    (plane / h.max(1) % maps) * h + plane % h.max(1)
}

/// Whether a bias map of `len` values fits logits `[batch, H, lq, lk]`: `[1, H, lq, lk]` (shared
/// by the batch) or `[batch, H, lq, lk]` (one per sequence).
pub(crate) fn bias_fits(len: usize, [b, h, lq, lk]: [usize; 4]) -> bool {
    let plane = h * lq * lk;
    len == plane || len == b * plane
}

/// Keys `0..visible` of row `i` can be attended to; the rest are masked afterwards.
fn visible_keys(span: &Span, i: usize, lk: usize) -> usize {
    if span.causal {
        (span.query_start + i + 1).min(lk)
    } else {
        lk
    }
}

/// `logits + bias + f([logits ‖ bias])` for `logits: [batch, H, rows, keys]` and `bias`
/// `[1, H, rows, keys]` (shared by the batch) or `[batch, H, rows, keys]` (one per sequence:
/// forgetting attention's), or `logits + f(logits)` over NoPE when `None`. Keys after a causal
/// row's position get `logits + bias` only.
pub(crate) fn dape_v1(
    mut logits: Vec<f32>,
    bias: Option<&[f32]>,
    [b, h, lq, lk]: [usize; 4],
    span: &Span,
    mlp: &Mlp,
) -> Vec<f32> {
    debug_assert_eq!(logits.len(), b * h * lq * lk);
    debug_assert!(bias.is_none_or(|m| bias_fits(m.len(), [b, h, lq, lk])));
    debug_assert_eq!(mlp.h, h);
    debug_assert_eq!(mlp.c, if bias.is_some() { 2 * h } else { h });
    each_row(
        &mut logits,
        [h, lq, lk],
        bias,
        span,
        || Scratch::new(mlp),
        |s, heads, bias, visible| forward_row_simd(mlp, heads, bias, visible, s),
    );
    logits
}

/// Runs `row(scratch, heads, bias rows, visible keys)` for every query row of every batch
/// element of `logits: [batch, H, rows, keys]`, in parallel over query rows, with one
/// `init()` scratch per worker; `heads[hh]` is head `hh`'s row, updated in place, and the bias
/// rows are the batch element's (`bias` is `[1 or batch, H, rows, keys]`).
fn each_row<S>(
    logits: &mut [f32],
    [h, lq, lk]: [usize; 3],
    bias: Option<&[f32]>,
    span: &Span,
    init: impl Fn() -> S + Send + Sync,
    row: impl Fn(&mut S, &mut [&mut [f32]], &[&[f32]], usize) + Send + Sync,
) {
    rows_by_query(logits, lq, lk)
        .into_par_iter()
        .enumerate()
        .for_each_init(init, |scratch, (i, mut planes)| {
            let bias = bias_rows(bias, i, lq, lk);
            let visible = visible_keys(span, i, lk);
            for (bi, heads) in planes.chunks_mut(h).enumerate() {
                row(scratch, heads, batch_rows(&bias, h, bi), visible);
            }
        });
}

/// Defines `$name(args)`, which runs `$kernel::<true>` compiled for AVX2 + FMA when the CPU
/// has them and `$kernel::<false>` (baseline target, no fused multiply-add) otherwise. The
/// kernel is `#[inline(always)]`, so it is compiled into the `#[target_feature]` function itself;
/// calling it through a closure would not be.
macro_rules! simd_entry {
    ($(#[$doc:meta])* fn $name:ident = $kernel:ident($($arg:ident: $ty:ty),* $(,)?)) => {
        $(#[$doc])*
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                fn fast($($arg: $ty),*) {
                    $kernel::<true>($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features `fast` is compiled for (checked above).
                    unsafe { fast($($arg),*) };
                    return;
                }
            }
            $kernel::<false>($($arg),*)
        }
    };
}

simd_entry! {
    /// [`forward_row`] for this CPU.
    fn forward_row_simd = forward_row(
        mlp: &Mlp,
        heads: &mut [&mut [f32]],
        bias: &[&[f32]],
        visible: usize,
        s: &mut Scratch,
    )
}

simd_entry! {
    /// [`v2_row`] for this CPU.
    fn v2_row_simd = v2_row(
        convs: &KeyConvs,
        heads: &mut [&mut [f32]],
        rows: &V2Row,
        x: &mut [f32],
        hidden: &mut [f32],
        block: &mut [[f32; LANES]],
    )
}

/// Per-thread working memory, `[channels][LANES]` each.
struct Scratch {
    /// Gathered inputs, `C`.
    x: Vec<[f32; LANES]>,
    /// Pre-activation hidden values, `D`.
    z: Vec<[f32; LANES]>,
    /// Hidden values after LeakyReLU, `D`.
    hidden: Vec<[f32; LANES]>,
    /// Second-layer outputs, `H`.
    out: Vec<[f32; LANES]>,
}

impl Scratch {
    fn new(mlp: &Mlp) -> Self {
        Self {
            x: vec![[0.0; LANES]; mlp.c],
            z: vec![[0.0; LANES]; mlp.d],
            hidden: vec![[0.0; LANES]; mlp.d],
            out: vec![[0.0; LANES]; mlp.h],
        }
    }
}

/// `acc + w · x`, fused when the target has FMA (a separate multiply and add otherwise, since
/// `mul_add` without hardware FMA is a slow library call).
#[inline(always)]
fn madd<const FMA: bool>(acc: f32, w: f32, x: f32) -> f32 {
    if FMA {
        w.mul_add(x, acc)
    } else {
        acc + w * x
    }
}

/// `out[k] = bias[k] + Σ_c weight[k, c] · input[c]`, lane by lane; `weight: [out.len(), input.len()]`.
#[inline(always)]
fn layer<const FMA: bool>(
    out: &mut [[f32; LANES]],
    weight: &[f32],
    bias: &[f32],
    input: &[[f32; LANES]],
) {
    let n = input.len();
    for (k, o) in out.iter_mut().enumerate() {
        let mut acc = [bias.get(k).copied().unwrap_or(0.0); LANES];
        for (&w, x) in weight[k * n..(k + 1) * n].iter().zip(input) {
            for l in 0..LANES {
                acc[l] = madd::<FMA>(acc[l], w, x[l]);
            }
        }
        *o = acc;
    }
}

/// Copies keys `j0 .. j0 + n` of `rows` into the first `n` lanes of `dst`, zeroing the rest.
#[inline(always)]
fn gather(
    dst: &mut [[f32; LANES]],
    rows: impl Iterator<Item = impl AsRef<[f32]>>,
    j0: usize,
    n: usize,
) {
    for (lane, row) in dst.iter_mut().zip(rows) {
        lane[..n].copy_from_slice(&row.as_ref()[j0..j0 + n]);
        lane[n..].fill(0.0);
    }
}

/// The first layer and LeakyReLU for the gathered block `x`: fills `z` and `hidden`.
#[inline(always)]
fn hidden_layer<const FMA: bool>(mlp: &Mlp, s: &mut Scratch) {
    layer::<FMA>(&mut s.z, &mlp.w1, &mlp.b1, &s.x);
    for (hd, z) in s.hidden.iter_mut().zip(&s.z) {
        for l in 0..LANES {
            hd[l] = if z[l] >= 0.0 { z[l] } else { z[l] * mlp.slope };
        }
    }
}

/// One query row of one batch element: `heads[hh]` holds head `hh`'s logits over the keys and
/// receives `logits + bias + f`.
#[inline(always)]
fn forward_row<const FMA: bool>(
    mlp: &Mlp,
    heads: &mut [&mut [f32]],
    bias: &[&[f32]],
    visible: usize,
    s: &mut Scratch,
) {
    let h = mlp.h;
    let lk = heads.first().map_or(0, |r| r.len());
    for j0 in (0..visible).step_by(LANES) {
        let n = LANES.min(visible - j0);
        gather(&mut s.x[..h], heads.iter().map(|r| &r[..]), j0, n);
        gather(&mut s.x[h..], bias.iter(), j0, n);
        hidden_layer::<FMA>(mlp, s);
        layer::<FMA>(&mut s.out, &mlp.w2, &mlp.b2, &s.hidden);
        for (hh, (dst, f)) in heads.iter_mut().zip(&s.out).enumerate() {
            let dst = &mut dst[j0..j0 + n];
            match bias.get(hh) {
                Some(bias) => {
                    for ((o, &bv), &f) in dst.iter_mut().zip(&bias[j0..j0 + n]).zip(f) {
                        *o += bv + f;
                    }
                }
                None => {
                    for (o, &f) in dst.iter_mut().zip(f) {
                        *o += f;
                    }
                }
            }
        }
    }
    // Future keys: masked by the caller; keep them finite.
    if visible < lk {
        for (dst, bias) in heads.iter_mut().zip(bias) {
            for (o, &bv) in dst[visible..].iter_mut().zip(&bias[visible..]) {
                *o += bv;
            }
        }
    }
}

/// Gradients of [`dape_v1`] for the output gradient `grad: [batch, H, rows, keys]`.
#[derive(Debug)]
pub(crate) struct V1Grads {
    /// `[batch, H, rows, keys]`.
    pub logits: Vec<f32>,
    /// The bias map's shape: `[1, H, rows, keys]` (summed over the batch) for a shared map,
    /// `[batch, H, rows, keys]` for one per sequence; `None` without a bias.
    pub bias: Option<Vec<f32>>,
    /// `[C, D]`, Burn's `Linear` layout.
    pub w1t: Vec<f32>,
    /// `[D]`.
    pub b1: Vec<f32>,
    /// `[D, H]`, Burn's `Linear` layout.
    pub w2t: Vec<f32>,
    /// `[H]`.
    pub b2: Vec<f32>,
}

/// One task's weight-gradient sums, in the kernels' layouts.
struct WeightGrads {
    /// `[D, C]`.
    w1: Vec<f32>,
    /// `[D]`.
    b1: Vec<f32>,
    /// `[H, D]`.
    w2: Vec<f32>,
    /// `[H]`.
    b2: Vec<f32>,
}

impl WeightGrads {
    fn new(mlp: &Mlp) -> Self {
        Self::zeros([mlp.d * mlp.c, mlp.d, mlp.h * mlp.d, mlp.h])
    }

    /// Zero sums of `[w1, b1, w2, b2]` values.
    fn zeros([w1, b1, w2, b2]: [usize; 4]) -> Self {
        Self {
            w1: vec![0.0; w1],
            b1: vec![0.0; b1],
            w2: vec![0.0; w2],
            b2: vec![0.0; b2],
        }
    }

    fn add(mut self, other: Self) -> Self {
        for (a, b) in [
            (&mut self.w1, &other.w1),
            (&mut self.b1, &other.b1),
            (&mut self.w2, &other.w2),
            (&mut self.b2, &other.b2),
        ] {
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
        }
        self
    }
}

/// The backward pass of [`dape_v1`] (the hidden layer is recomputed, not stored).
pub(crate) fn dape_v1_backward(
    logits: &[f32],
    bias: Option<&[f32]>,
    grad: &[f32],
    [b, h, lq, lk]: [usize; 4],
    span: &Span,
    mlp: &Mlp,
) -> V1Grads {
    let mut d_logits = vec![0.0f32; b * h * lq * lk];
    let mut d_bias = bias.map(|m| vec![0.0f32; m.len()]);
    let sums = backward_by_rows(
        BackwardInputs {
            logits,
            bias,
            grad,
            dims: [b, h, lq, lk],
            span,
        },
        (&mut d_logits, d_bias.as_deref_mut()),
        || WeightGrads::new(mlp),
        |rows, da, db, cols: &mut Columns, acc| backward_row(mlp, rows, da, db, cols, acc),
    );
    V1Grads {
        logits: d_logits,
        bias: d_bias,
        w1t: transpose(&sums.w1, mlp.d, mlp.c),
        b1: sums.b1,
        w2t: transpose(&sums.w2, mlp.h, mlp.d),
        b2: sums.b2,
    }
}

/// What a fused DAPE node's backward pass reads: its inputs and the output gradient, all
/// row-major, with the logits' dims and the span.
struct BackwardInputs<'a> {
    logits: &'a [f32],
    /// `[1 or batch, H, rows, keys]`.
    bias: Option<&'a [f32]>,
    grad: &'a [f32],
    dims: [usize; 4],
    span: &'a Span,
}

/// Runs `row(rows, d logits rows, d bias rows, scratch, sums)` for every query row of a fused
/// DAPE node's backward pass, in parallel over fixed groups of rows, writing the input
/// gradients into `d_logits` (`[batch, H, rows, keys]`) and `d_bias` (the bias map's shape), and
/// returns the weight gradients summed over the groups in order.
fn backward_by_rows<S: Default>(
    inputs: BackwardInputs,
    (d_logits, d_bias): (&mut [f32], Option<&mut [f32]>),
    zero: impl Fn() -> WeightGrads + Sync,
    row: impl Fn(&BackwardRow, &mut [&mut [f32]], &mut [&mut [f32]], &mut S, &mut WeightGrads) + Sync,
) -> WeightGrads {
    let BackwardInputs {
        logits,
        bias,
        grad,
        dims: [b, h, lq, lk],
        span,
    } = inputs;
    let da_rows = rows_by_query(d_logits, lq, lk);
    let db_rows: Vec<Vec<&mut [f32]>> = match d_bias {
        Some(db) => rows_by_query(db, lq, lk),
        None => (0..lq).map(|_| Vec::new()).collect(),
    };
    // Weight gradients are summed per fixed group of rows and then over the groups in order,
    // so that the result does not depend on how rayon schedules the groups: training stays
    // deterministic for a seed.
    let mut groups: Vec<Vec<BackwardTask>> = Vec::with_capacity(lq.div_ceil(ROWS_PER_GROUP));
    for (i, (da, db)) in da_rows.into_iter().zip(db_rows).enumerate() {
        if i % ROWS_PER_GROUP == 0 {
            groups.push(Vec::with_capacity(ROWS_PER_GROUP));
        }
        if let Some(group) = groups.last_mut() {
            group.push((i, da, db));
        }
    }
    let partial: Vec<WeightGrads> = groups
        .into_par_iter()
        .map(|group| {
            let (mut scratch, mut acc) = (S::default(), zero());
            for (i, mut da, mut db) in group {
                let at = |p: usize| (p * lq + i) * lk..(p * lq + i + 1) * lk;
                let a: Vec<&[f32]> = (0..b * h).map(|p| &logits[at(p)]).collect();
                let g: Vec<&[f32]> = (0..b * h).map(|p| &grad[at(p)]).collect();
                let rows = BackwardRow {
                    a: &a,
                    bias: &bias_rows(bias, i, lq, lk),
                    g: &g,
                    visible: visible_keys(span, i, lk),
                };
                row(&rows, &mut da, &mut db, &mut scratch, &mut acc);
            }
            acc
        })
        .collect();
    partial.into_iter().fold(zero(), WeightGrads::add)
}

/// Query rows whose weight gradients one task sums before the fixed-order sum over tasks.
const ROWS_PER_GROUP: usize = 8;

/// One query row of the backward pass: its index, its `d logits` rows (every batch element's
/// heads) and its `d bias` rows.
type BackwardTask<'a> = (usize, Vec<&'a mut [f32]>, Vec<&'a mut [f32]>);

/// The read-only rows of one query row of the backward pass.
struct BackwardRow<'a> {
    /// The logits' rows, one per (batch element, head) plane in plane order.
    a: &'a [&'a [f32]],
    /// The bias map's rows, one per plane of `[1 or batch, H]` (empty without a base bias).
    bias: &'a [&'a [f32]],
    /// The output gradient's rows, like `a`.
    g: &'a [&'a [f32]],
    /// Keys `0..visible` can be attended to.
    visible: usize,
}

/// A task's working memory for one query row: one column per (batch element, visible key) pair,
/// channel-major (`[channels, pairs]`, row-major), so that gathering a row of keys is one copy.
#[derive(Default)]
struct Columns {
    /// The MLP's inputs, `[C, N]`.
    x: Vec<f32>,
    /// The output gradient, `[H, N]`.
    g: Vec<f32>,
    /// Pre-activations, `[D, N]`.
    z: Vec<f32>,
    /// Hidden values after LeakyReLU, `[D, N]`.
    hidden: Vec<f32>,
    /// The gradient at the pre-activations, `[D, N]`.
    delta: Vec<f32>,
    /// The gradient at the inputs, `[C, N]`.
    dx: Vec<f32>,
}

/// One query row of the backward pass, every batch element at once, as five matrix products
/// over the row's `N = batch × visible` pairs (DAPE's layers are far too narrow for a per-pair
/// loop to keep its weight-gradient sums in registers; as products they are `[D, N] · [N, C]`):
/// writes `d logits` into `da`, adds `d bias` into `db` (each batch element's into its map's
/// rows: summed over the batch for a shared map) and the weight gradients into `acc`.
fn backward_row(
    mlp: &Mlp,
    rows: &BackwardRow,
    da: &mut [&mut [f32]],
    db: &mut [&mut [f32]],
    cols: &mut Columns,
    acc: &mut WeightGrads,
) {
    use std::borrow::Cow::Borrowed;
    let (c, d, h) = (mlp.c, mlp.d, mlp.h);
    let b = rows.a.len() / h.max(1);
    let vis = rows.visible;
    let n = b * vis;
    if n > 0 {
        let Columns {
            x,
            g,
            z,
            hidden,
            delta,
            dx,
        } = cols;
        for (buf, channels) in [
            (&mut *x, c),
            (g, h),
            (z, d),
            (hidden, d),
            (delta, d),
            (dx, c),
        ] {
            buf.resize(channels * n, 0.0);
        }
        // Column `bi · vis + j` is key `j` of batch element `bi`.
        for bi in 0..b {
            let bias = batch_rows(rows.bias, h, bi);
            for hh in 0..h {
                let (plane, at) = (bi * h + hh, hh * n + bi * vis);
                x[at..at + vis].copy_from_slice(&rows.a[plane][..vis]);
                g[at..at + vis].copy_from_slice(&rows.g[plane][..vis]);
                if let Some(bias) = bias.get(hh) {
                    x[(h + hh) * n + bi * vis..][..vis].copy_from_slice(&bias[..vis]);
                }
            }
        }
        fn mat(v: &[f32], r: usize, n: usize) -> Mat<'_> {
            Mat::row_major(std::borrow::Cow::Borrowed(&v[..r * n]), r, n)
        }
        // z = W1 x + b1; hidden = LeakyReLU(z).
        for (row, &bias) in z.chunks_exact_mut(n).zip(&mlp.b1) {
            row.fill(bias);
        }
        let w1 = Mat::row_major(Borrowed(&mlp.w1), d, c);
        gemm(&w1, &mat(x, c, n), 1.0, z);
        for (hd, &zv) in hidden.iter_mut().zip(z.iter()) {
            *hd = if zv >= 0.0 { zv } else { zv * mlp.slope };
        }
        // dW2 += g · hiddenᵀ, db2 += Σ g.
        gemm(&mat(g, h, n), &mat(hidden, d, n).t(), 1.0, &mut acc.w2);
        for (s, row) in acc.b2.iter_mut().zip(g.chunks_exact(n)) {
            *s += lane_sum(row);
        }
        // δ = (W2ᵀ g) ⊙ LeakyReLU'(z).
        gemm(
            &Mat::row_major(Borrowed(&mlp.w2t), d, h),
            &mat(g, h, n),
            0.0,
            delta,
        );
        for (dl, &zv) in delta.iter_mut().zip(z.iter()) {
            if zv < 0.0 {
                *dl *= mlp.slope;
            }
        }
        // dW1 += δ · xᵀ, db1 += Σ δ.
        gemm(&mat(delta, d, n), &mat(x, c, n).t(), 1.0, &mut acc.w1);
        for (s, row) in acc.b1.iter_mut().zip(delta.chunks_exact(n)) {
            *s += lane_sum(row);
        }
        // dx = W1ᵀ δ: the logits' and the bias's halves; the identity paths add g.
        let w1t = Mat::row_major(Borrowed(&mlp.w1t), c, d);
        gemm(&w1t, &mat(delta, d, n), 0.0, dx);
        for bi in 0..b {
            for hh in 0..h {
                let (at, gv) = (hh * n + bi * vis, &g[hh * n + bi * vis..][..vis]);
                for ((o, &gl), &dl) in da[bi * h + hh][..vis].iter_mut().zip(gv).zip(&dx[at..]) {
                    *o = gl + dl;
                }
                let n_bias = db.len();
                if let Some(db) = db.get_mut(bias_plane(bi * h + hh, h, n_bias)) {
                    let dxb = &dx[(h + hh) * n + bi * vis..][..vis];
                    for ((o, &gl), &dl) in db[..vis].iter_mut().zip(gv).zip(dxb) {
                        *o += gl + dl;
                    }
                }
            }
        }
    }
    future_key_grads(rows, da, db, h);
}

/// The gradients at the keys a causal row cannot see (from `rows.visible` on), where a fused
/// DAPE node's output is `logits + bias`: `g` into `d logits`, added into `d bias`.
fn future_key_grads(rows: &BackwardRow, da: &mut [&mut [f32]], db: &mut [&mut [f32]], h: usize) {
    let (vis, n_bias) = (rows.visible, db.len());
    for (plane, da) in da.iter_mut().enumerate() {
        let g = &rows.g[plane][vis..];
        da[vis..].copy_from_slice(g);
        if let Some(db) = db.get_mut(bias_plane(plane, h, n_bias)) {
            for (o, &gv) in db[vis..].iter_mut().zip(g) {
                *o += gv;
            }
        }
    }
}

/// DAPE V1's fused operation on `Autodiff<NdArray<f32>>`: the forward pass of [`dape_v1`],
/// recorded as one node whose backward is [`dape_v1_backward`]. The backward state holds host
/// copies of the logits and the bias map (not the `[batch, D, pairs]` hidden activations of the
/// tensor path). The bias map is `[1, H, rows, keys]` or `[batch, H, rows, keys]`. `B` must be
/// `Autodiff<NdArray<f32>>` ([`applies_autodiff`]); `None` when a tensor is not `f32` or the
/// map has another shape.
#[allow(clippy::too_many_arguments)]
pub(crate) fn dape_v1_autodiff<B: Backend>(
    logits: Tensor<B, 4>,
    bias: Option<Tensor<B, 4>>,
    w1t: Tensor<B, 2>,
    b1: Option<Tensor<B, 1>>,
    w2t: Tensor<B, 2>,
    b2: Option<Tensor<B, 1>>,
    span: &Span,
    slope: f32,
) -> Option<Tensor<B, 4>> {
    let logits: Tensor<Ad, 4> = cast(logits)?;
    let bias: Option<Tensor<Ad, 4>> = cast_opt(bias)?;
    let (w1t, w2t): (Tensor<Ad, 2>, Tensor<Ad, 2>) = (cast(w1t)?, cast(w2t)?);
    let b1: Option<Tensor<Ad, 1>> = cast_opt(b1)?;
    let b2: Option<Tensor<Ad, 1>> = cast_opt(b2)?;
    let device = logits.device();
    let dims = logits.dims();
    let [_, h, _, _] = dims;
    let [c, d] = w1t.dims();
    if !map_fits(&bias, dims) {
        return None;
    }
    let mlp = Mlp::new(
        [c, d, h],
        host(w1t.clone().inner())?,
        host_opt(&b1)?,
        host(w2t.clone().inner())?,
        host_opt(&b2)?,
        slope,
    );
    let (a_saved, bias_saved, out) =
        forward_saved(&logits, &bias, |a, m| dape_v1(a, m, dims, span, &mlp))?;

    let state = Arc::new(V1State {
        logits: a_saved,
        bias: bias_saved,
        dims,
        span: span.clone(),
        mlp,
    });
    let parents = [
        Some(prim(logits)),
        bias.map(prim),
        Some(prim(w1t)),
        b1.map(prim),
        Some(prim(w2t)),
        b2.map(prim),
    ];
    cast(record_dape_node(V1Backward, parents, state, out, &device))
}

/// Whether a fused node's bias map fits logits `dims`: `[1, H, rows, keys]` or `[batch, H, rows,
/// keys]` (or absent).
fn map_fits(bias: &Option<Tensor<Ad, 4>>, dims: [usize; 4]) -> bool {
    let [_, h, lq, lk] = dims;
    bias.as_ref()
        .is_none_or(|m| m.dims() == [1, h, lq, lk] || m.dims() == dims)
}

/// The forward pass of a fused node: `kernel(logits, bias map)` on the host values, and the
/// inputs that the backward pass keeps (the tensors themselves, shared, not copied). `None` when
/// a tensor is not `f32`.
#[allow(clippy::type_complexity)]
fn forward_saved(
    logits: &Tensor<Ad, 4>,
    bias: &Option<Tensor<Ad, 4>>,
    kernel: impl FnOnce(Vec<f32>, Option<&[f32]>) -> Vec<f32>,
) -> Option<(
    burn_ndarray::NdArrayTensor,
    Option<burn_ndarray::NdArrayTensor>,
    FloatTensor<Nd>,
)> {
    let dims = logits.dims();
    let a_saved = logits.clone().inner().into_primitive().tensor();
    let bias_saved = bias
        .as_ref()
        .map(|m| m.clone().inner().into_primitive().tensor());
    let bias_values = match &bias_saved {
        Some(m) => Some(row_major_values(m)?),
        None => None,
    };
    let out = kernel(
        row_major_values(&a_saved)?.into_owned(),
        bias_values.as_deref(),
    );
    drop(bias_values);
    let out = Tensor::<Nd, 4>::from_data(TensorData::new(out, dims), &logits.device())
        .into_primitive()
        .tensor();
    Some((a_saved, bias_saved, out))
}

/// The autodiff primitive of a tensor.
fn prim<const D: usize>(t: Tensor<Ad, D>) -> FloatTensor<Ad> {
    t.into_primitive().tensor()
}

/// Records a fused DAPE node over its six parents (logits, bias map, first layer's weight and
/// bias, second layer's weight and bias; a constant stands in for an absent one and never
/// requires a gradient) with its backward pass and state, and returns the output tensor.
fn record_dape_node<BW: Backward<Nd, 6>>(
    backward: BW,
    parents: [Option<FloatTensor<Ad>>; 6],
    state: BW::State,
    out: FloatTensor<Nd>,
    device: &burn_ndarray::NdArrayDevice,
) -> Tensor<Ad, 4> {
    let nodes = parents.map(|p| {
        p.unwrap_or_else(|| prim(Tensor::<Ad, 1>::zeros([1], device)))
            .node
    });
    let out = finish_node(
        backward
            .prepare::<NoCheckpointing>(nodes)
            .compute_bound()
            .stateful(),
        state,
        out,
    );
    Tensor::<Ad, 4>::from_primitive(TensorPrimitive::Float(out))
}

/// Host values of an optional `f32` layer bias: `Some(None)` when absent, `None` when not `f32`.
fn host_opt(b: &Option<Tensor<Ad, 1>>) -> Option<Option<Vec<f32>>> {
    match b {
        Some(b) => host(b.clone().inner()).map(Some),
        None => Some(None),
    }
}

/// What the backward pass of [`dape_v1_autodiff`] needs, on the host.
#[derive(Debug)]
struct V1State {
    /// The logits (`f32`, checked in the forward pass).
    logits: burn_ndarray::NdArrayTensor,
    /// The base bias's map (`f32`).
    bias: Option<burn_ndarray::NdArrayTensor>,
    dims: [usize; 4],
    span: Span,
    mlp: Mlp,
}

#[derive(Debug)]
struct V1Backward;

impl Backward<Nd, 6> for V1Backward {
    type State = Arc<V1State>;

    fn backward(self, ops: Ops<Self::State, 6>, grads: &mut Gradients, _: &mut Checkpointer) {
        let st = Arc::clone(&ops.state);
        let Mlp { c, d, h, .. } = st.mlp;
        node_backward(
            ops,
            grads,
            &st.logits,
            st.bias.as_ref(),
            |logits, bias, grad| {
                let g = dape_v1_backward(logits, bias, grad, st.dims, &st.span, &st.mlp);
                [
                    (g.logits, st.dims.to_vec()),
                    (g.bias.unwrap_or_default(), bias_shape(bias, st.dims)),
                    (g.w1t, vec![c, d]),
                    (g.b1, vec![d]),
                    (g.w2t, vec![d, h]),
                    (g.b2, vec![h]),
                ]
            },
        );
    }
}

/// The shape of a bias map of `bias.len()` values over logits `dims`: `[1 or batch, H, rows,
/// keys]` (empty without a bias).
fn bias_shape(bias: Option<&[f32]>, [_, h, lq, lk]: [usize; 4]) -> Vec<usize> {
    bias.map_or_else(Vec::new, |m| {
        vec![m.len() / (h * lq * lk).max(1), h, lq, lk]
    })
}

/// The backward pass of a fused DAPE node: reads its saved inputs and the output gradient,
/// computes the six gradients `(values, shape)` in the parents' order (logits, bias map, the
/// layers' weights and biases) with `compute(logits, bias, grad)`, and registers those of
/// tracked parents.
fn node_backward<S>(
    ops: Ops<S, 6>,
    grads: &mut Gradients,
    logits: &burn_ndarray::NdArrayTensor,
    bias: Option<&burn_ndarray::NdArrayTensor>,
    compute: impl FnOnce(&[f32], Option<&[f32]>, &[f32]) -> [(Vec<f32>, Vec<usize>); 6],
) {
    let grad = grads.consume::<Nd>(&ops.node);
    let grad = row_major_values(&grad).expect("the gradient of an f32 output is f32");
    let logits = row_major_values(logits).expect("f32 logits (checked forward)");
    let bias = bias.map(|m| row_major_values(m).expect("an f32 bias map (checked forward)"));
    let values = compute(&logits, bias.as_deref(), &grad);
    let device = Default::default();
    for (parent, (v, shape)) in ops.parents.into_iter().zip(values) {
        if let Some(node) = parent {
            let id: NodeId = node.id;
            let t = Nd::float_from_data(TensorData::new(v, shape), &device);
            grads.register::<Nd>(id, t);
        }
    }
}

/// The weights of DAPE V2's `f = Conv(1 × k, C → D) → LeakyReLU → Conv(1 × k, D → H)` along the
/// key axis, on the host, in `Conv2d`'s layouts.
#[derive(Clone, Debug)]
pub(crate) struct KeyConvs {
    /// Input channels `C`, hidden channels `D`, heads `H`, kernel width `k`.
    pub dims: [usize; 4],
    /// `[D, C, k]`.
    pub w1: Vec<f32>,
    /// `[D]`.
    pub b1: Vec<f32>,
    /// `[H, D, k]`.
    pub w2: Vec<f32>,
    /// `[H]`.
    pub b2: Vec<f32>,
    /// LeakyReLU slope.
    pub slope: f32,
    /// Zero the hidden channels at future keys (see `DapeV2Config::mask_future_hidden`).
    pub mask_future_hidden: bool,
}

/// DAPE V2's `logits + bias + f(tril([logits ‖ bias]))` for `logits: [batch, H, rows, keys]`
/// and `bias: [1, H, rows, keys]` (or over NoPE when `None`): both convolutions along a row's
/// keys in one pass over the row, with zero padding `k / 2` on both sides as `Conv2d`'s.
/// Keys after a causal row's position get `logits + bias` only.
pub(crate) fn dape_v2(
    mut logits: Vec<f32>,
    bias: Option<&[f32]>,
    [b, h, lq, lk]: [usize; 4],
    span: &Span,
    convs: &KeyConvs,
) -> Vec<f32> {
    let [c, d, _, k] = convs.dims;
    debug_assert_eq!(logits.len(), b * h * lq * lk);
    debug_assert_eq!(c, if bias.is_some() { 2 * h } else { h });
    // Padded rows: `k / 2` zeros before the keys, and room after them for the padding and for
    // whole blocks of lanes.
    let width = lk + k + LANES;
    let init = || {
        let block = vec![[0.0f32; LANES]; d.max(h)];
        (vec![0.0f32; c * width], vec![0.0f32; d * width], block)
    };
    each_row(
        &mut logits,
        [h, lq, lk],
        bias,
        span,
        init,
        |(x, hidden, block), heads, bias, visible| {
            let rows = V2Row {
                bias,
                visible,
                width,
            };
            v2_row_simd(convs, heads, &rows, x, hidden, block)
        },
    );
    logits
}

/// The shared inputs of one query row of [`dape_v2`].
struct V2Row<'a> {
    bias: &'a [&'a [f32]],
    visible: usize,
    width: usize,
}

/// `out[o][j] += Σ_ch Σ_t w[o, ch, t] · input[ch][j + t]` for `j` in `0..n` (`n ≤ LANES`), the
/// padded `input` rows being `width` long; `out` starts at `bias[o]`.
#[inline(always)]
fn key_conv_block<const FMA: bool>(
    out: &mut [[f32; LANES]],
    w: &[f32],
    bias: &[f32],
    input: &[f32],
    [channels, k, width, j0]: [usize; 4],
) {
    for (o, acc_out) in out.iter_mut().enumerate() {
        let mut acc = [bias[o]; LANES];
        for ch in 0..channels {
            let row = &input[ch * width..(ch + 1) * width];
            for t in 0..k {
                let wv = w[(o * channels + ch) * k + t];
                let src: &[f32; LANES] = row[j0 + t..j0 + t + LANES]
                    .try_into()
                    .expect("padded rows hold whole blocks");
                for l in 0..LANES {
                    acc[l] = madd::<FMA>(acc[l], wv, src[l]);
                }
            }
        }
        *acc_out = acc;
    }
}

/// One query row of one batch element of [`dape_v2`]; `x: [C, width]` and
/// `hidden: [D, width]` are the padded working rows, `block` holds `max(D, H)` lanes.
#[inline(always)]
fn v2_row<const FMA: bool>(
    convs: &KeyConvs,
    heads: &mut [&mut [f32]],
    rows: &V2Row,
    x: &mut [f32],
    hidden: &mut [f32],
    block: &mut [[f32; LANES]],
) {
    let [c, d, h, k] = convs.dims;
    let (half, width, visible) = (k / 2, rows.width, rows.visible);
    let lk = heads.first().map_or(0, |r| r.len());
    // The inputs with future keys zeroed (`tril`), and the padding.
    x.fill(0.0);
    for ch in 0..c {
        let src = if ch < h {
            &heads[ch][..visible]
        } else {
            &rows.bias[ch - h][..visible]
        };
        x[ch * width + half..][..visible].copy_from_slice(src);
    }
    // Hidden channels at every key the second convolution reads for the visible keys: up to
    // `half` past them, unless future hidden values are masked to zero.
    let hidden_keys = if convs.mask_future_hidden {
        visible
    } else {
        (visible + half).min(lk)
    };
    hidden.fill(0.0);
    for j0 in (0..hidden_keys).step_by(LANES) {
        let n = LANES.min(hidden_keys - j0);
        key_conv_block::<FMA>(&mut block[..d], &convs.w1, &convs.b1, x, [c, k, width, j0]);
        for (ch, z) in block[..d].iter().enumerate() {
            let dst = &mut hidden[ch * width + half + j0..][..n];
            for (o, &z) in dst.iter_mut().zip(z) {
                *o = if z >= 0.0 { z } else { z * convs.slope };
            }
        }
    }
    for j0 in (0..visible).step_by(LANES) {
        let n = LANES.min(visible - j0);
        key_conv_block::<FMA>(
            &mut block[..h],
            &convs.w2,
            &convs.b2,
            hidden,
            [d, k, width, j0],
        );
        for (hh, f) in block[..h].iter().enumerate() {
            let dst = &mut heads[hh][j0..j0 + n];
            match rows.bias.get(hh) {
                Some(bias) => {
                    for ((o, &bv), &f) in dst.iter_mut().zip(&bias[j0..j0 + n]).zip(f) {
                        *o += bv + f;
                    }
                }
                None => {
                    for (o, &f) in dst.iter_mut().zip(f) {
                        *o += f;
                    }
                }
            }
        }
    }
    if visible < lk {
        for (dst, bias) in heads.iter_mut().zip(rows.bias) {
            for (o, &bv) in dst[visible..].iter_mut().zip(&bias[visible..]) {
                *o += bv;
            }
        }
    }
}

/// Gradients of [`dape_v2`] for the output gradient `grad: [batch, H, rows, keys]`.
#[derive(Debug)]
pub(crate) struct V2Grads {
    /// `[batch, H, rows, keys]`.
    pub logits: Vec<f32>,
    /// The bias map's shape (`[1, ..]` summed over the batch); `None` without a bias.
    pub bias: Option<Vec<f32>>,
    /// `[D, C, 1, k]`, `Conv2d`'s layout.
    pub w1: Vec<f32>,
    /// `[D]`.
    pub b1: Vec<f32>,
    /// `[H, D, 1, k]`.
    pub w2: Vec<f32>,
    /// `[H]`.
    pub b2: Vec<f32>,
}

/// The backward pass of [`dape_v2`] (the hidden channels are recomputed, not stored): each
/// query row, every batch element at once, as matrix products over the row's
/// `(batch element, key)` columns, each `1 × k` convolution being one product over its `k`
/// key-shifted copies of the input (`[out, in · k] · [in · k, columns]`).
pub(crate) fn dape_v2_backward(
    logits: &[f32],
    bias: Option<&[f32]>,
    grad: &[f32],
    dims: [usize; 4],
    span: &Span,
    convs: &KeyConvs,
) -> V2Grads {
    let [c, d, h, k] = convs.dims;
    let mut d_logits = vec![0.0f32; logits.len()];
    let mut d_bias = bias.map(|m| vec![0.0f32; m.len()]);
    let sums = backward_by_rows(
        BackwardInputs {
            logits,
            bias,
            grad,
            dims,
            span,
        },
        (&mut d_logits, d_bias.as_deref_mut()),
        || WeightGrads::zeros([d * c * k, d, h * d * k, h]),
        |rows, da, db, cols: &mut ConvColumns, acc| v2_backward_row(convs, rows, da, db, cols, acc),
    );
    V2Grads {
        logits: d_logits,
        bias: d_bias,
        w1: sums.w1,
        b1: sums.b1,
        w2: sums.w2,
        b2: sums.b2,
    }
}

/// A task's working memory for one query row of [`dape_v2_backward`], row-major
/// `[channels, columns]`: `N_h = batch × hidden keys` columns for the first convolution's
/// outputs, `N = batch × visible keys` for the second's.
#[derive(Default)]
struct ConvColumns {
    /// The inputs' `k` key-shifted copies, `[C · k, N_h]`.
    x: Vec<f32>,
    /// Pre-activations, `[D, N_h]`.
    z: Vec<f32>,
    /// Hidden values, `[D, N_h]`.
    hidden: Vec<f32>,
    /// The hidden values' `k` key-shifted copies, `[D · k, N]`.
    hx: Vec<f32>,
    /// The output gradient, `[H, N]`.
    g: Vec<f32>,
    /// The gradient at the hidden copies, `[D · k, N]`.
    dhx: Vec<f32>,
    /// The gradient at the pre-activations, `[D, N_h]`.
    delta: Vec<f32>,
    /// The gradient at the input copies, `[C · k, N_h]`.
    dx: Vec<f32>,
}

/// `dst[j] = src[j + t - half]` where that index lies in `src`, 0 elsewhere: one key-shifted
/// copy of a zero-padded row.
fn shifted(dst: &mut [f32], src: &[f32], t: usize, half: usize) {
    dst.fill(0.0);
    let from = half.saturating_sub(t);
    let to = dst.len().min((src.len() + half).saturating_sub(t));
    if from < to {
        dst[from..to].copy_from_slice(&src[from + t - half..to + t - half]);
    }
}

/// The adjoint of [`shifted`] summed over the `k` shifts: `dst[p] += Σ_t cols_t[p - t + half]`,
/// `cols_t` being the `t`-th row of `cols` (length `cols_t.len()`), where that index lies in it.
fn unshift_add(dst: &mut [f32], cols: &[&[f32]], half: usize) {
    for (t, col) in cols.iter().enumerate() {
        // p = j + t - half for j in 0..col.len().
        let from = half.saturating_sub(t);
        let to = col.len().min((dst.len() + half).saturating_sub(t));
        if from < to {
            let out = &mut dst[from + t - half..to + t - half];
            for (o, &v) in out.iter_mut().zip(&col[from..to]) {
                *o += v;
            }
        }
    }
}

/// One query row of [`dape_v2_backward`], every batch element at once: writes `d logits` into
/// `da`, adds `d bias` into `db` (each batch element's into its map's rows) and the weight
/// gradients into `acc`.
fn v2_backward_row(
    convs: &KeyConvs,
    rows: &BackwardRow,
    da: &mut [&mut [f32]],
    db: &mut [&mut [f32]],
    cols: &mut ConvColumns,
    acc: &mut WeightGrads,
) {
    use std::borrow::Cow::Borrowed;
    let [c, d, h, k] = convs.dims;
    let half = k / 2;
    let b = rows.a.len() / h.max(1);
    let vis = rows.visible;
    let lk = rows.a.first().map_or(0, |r| r.len());
    // The hidden keys that the second convolution reads for the visible ones (as `v2_row`).
    let hk = if convs.mask_future_hidden {
        vis
    } else {
        (vis + half).min(lk)
    };
    let (nh, n) = (b * hk, b * vis);
    let n_bias = db.len();
    if n > 0 {
        let ConvColumns {
            x,
            z,
            hidden,
            hx,
            g,
            dhx,
            delta,
            dx,
        } = cols;
        for (buf, len) in [
            (&mut *x, c * k * nh),
            (z, d * nh),
            (hidden, d * nh),
            (hx, d * k * n),
            (g, h * n),
            (dhx, d * k * n),
            (delta, d * nh),
            (dx, c * k * nh),
        ] {
            buf.resize(len, 0.0);
        }
        fn mat(v: &[f32], r: usize, n: usize) -> Mat<'_> {
            Mat::row_major(std::borrow::Cow::Borrowed(&v[..r * n]), r, n)
        }
        // The input channels of batch element `bi` at the visible keys (future keys are zero).
        let input = |ch: usize, bi: usize| -> &[f32] {
            if ch < h {
                &rows.a[bi * h + ch][..vis]
            } else {
                &batch_rows(rows.bias, h, bi)[ch - h][..vis]
            }
        };
        for ch in 0..c {
            for t in 0..k {
                for bi in 0..b {
                    shifted(
                        &mut x[(ch * k + t) * nh + bi * hk..][..hk],
                        input(ch, bi),
                        t,
                        half,
                    );
                }
            }
        }
        // z = W1 x + b1; hidden = LeakyReLU(z).
        for (row, &bias) in z.chunks_exact_mut(nh).zip(&convs.b1) {
            row.fill(bias);
        }
        let w1 = Mat::row_major(Borrowed(&convs.w1), d, c * k);
        gemm(&w1, &mat(x, c * k, nh), 1.0, z);
        for (hd, &zv) in hidden.iter_mut().zip(z.iter()) {
            *hd = if zv >= 0.0 { zv } else { zv * convs.slope };
        }
        for dd in 0..d {
            for t in 0..k {
                for bi in 0..b {
                    let src = &hidden[dd * nh + bi * hk..][..hk];
                    shifted(&mut hx[(dd * k + t) * n + bi * vis..][..vis], src, t, half);
                }
            }
        }
        for bi in 0..b {
            for hh in 0..h {
                g[hh * n + bi * vis..][..vis].copy_from_slice(&rows.g[bi * h + hh][..vis]);
            }
        }
        // dW2 += g · hxᵀ, db2 += Σ g; d hx = W2ᵀ g.
        gemm(&mat(g, h, n), &mat(hx, d * k, n).t(), 1.0, &mut acc.w2);
        for (s, row) in acc.b2.iter_mut().zip(g.chunks_exact(n)) {
            *s += lane_sum(row);
        }
        let w2 = Mat::row_major(Borrowed(&convs.w2), h, d * k);
        gemm(&w2.t(), &mat(g, h, n), 0.0, dhx);
        // δ = (Σ over shifts of d hx) ⊙ LeakyReLU'(z).
        delta.fill(0.0);
        for dd in 0..d {
            for bi in 0..b {
                let shifts: Vec<&[f32]> = (0..k)
                    .map(|t| &dhx[(dd * k + t) * n + bi * vis..][..vis])
                    .collect();
                unshift_add(&mut delta[dd * nh + bi * hk..][..hk], &shifts, half);
            }
        }
        for (dl, &zv) in delta.iter_mut().zip(z.iter()) {
            if zv < 0.0 {
                *dl *= convs.slope;
            }
        }
        // dW1 += δ · xᵀ, db1 += Σ δ; d x = W1ᵀ δ.
        gemm(&mat(delta, d, nh), &mat(x, c * k, nh).t(), 1.0, &mut acc.w1);
        for (s, row) in acc.b1.iter_mut().zip(delta.chunks_exact(nh)) {
            *s += lane_sum(row);
        }
        gemm(&w1.t(), &mat(delta, d, nh), 0.0, dx);
        // The inputs' gradients at the visible keys: the identity paths' g plus the sum over
        // shifts of d x.
        let shifts = |ch: usize, bi: usize| -> Vec<&[f32]> {
            (0..k)
                .map(|t| &dx[(ch * k + t) * nh + bi * hk..][..hk])
                .collect()
        };
        for bi in 0..b {
            for hh in 0..h {
                let plane = bi * h + hh;
                let out = &mut da[plane][..vis];
                out.copy_from_slice(&rows.g[plane][..vis]);
                unshift_add(out, &shifts(hh, bi), half);
                if let Some(db) = db.get_mut(bias_plane(plane, h, n_bias)) {
                    let out = &mut db[..vis];
                    for (o, &gv) in out.iter_mut().zip(&rows.g[plane][..vis]) {
                        *o += gv;
                    }
                    unshift_add(out, &shifts(h + hh, bi), half);
                }
            }
        }
    }
    future_key_grads(rows, da, db, h);
}

/// DAPE V2's fused operation on `Autodiff<NdArray<f32>>`: the forward pass of [`dape_v2`],
/// recorded as one node whose backward is [`dape_v2_backward`]; the state keeps the logits and
/// the bias map, not the hidden channels. The convolutions' weights are `Conv2d`'s
/// (`[D, C, 1, k]`, `[H, D, 1, k]`). `B` must be `Autodiff<NdArray<f32>>`
/// ([`applies_autodiff`]); `None` when a tensor is not `f32` or the map is not `[1 or batch, H,
/// rows, keys]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn dape_v2_autodiff<B: Backend>(
    logits: Tensor<B, 4>,
    bias: Option<Tensor<B, 4>>,
    w1: Tensor<B, 4>,
    b1: Option<Tensor<B, 1>>,
    w2: Tensor<B, 4>,
    b2: Option<Tensor<B, 1>>,
    span: &Span,
    slope: f32,
    mask_future_hidden: bool,
) -> Option<Tensor<B, 4>> {
    let logits: Tensor<Ad, 4> = cast(logits)?;
    let bias: Option<Tensor<Ad, 4>> = cast_opt(bias)?;
    let (w1, w2): (Tensor<Ad, 4>, Tensor<Ad, 4>) = (cast(w1)?, cast(w2)?);
    let b1: Option<Tensor<Ad, 1>> = cast_opt(b1)?;
    let b2: Option<Tensor<Ad, 1>> = cast_opt(b2)?;
    let device = logits.device();
    let dims = logits.dims();
    let [_, h, _, _] = dims;
    let [d, c, _, k] = w1.dims();
    if !map_fits(&bias, dims) || w2.dims() != [h, d, 1, k] {
        return None;
    }
    let convs = KeyConvs {
        dims: [c, d, h, k],
        w1: host(w1.clone().inner())?,
        b1: host_opt(&b1)?.unwrap_or_else(|| vec![0.0; d]),
        w2: host(w2.clone().inner())?,
        b2: host_opt(&b2)?.unwrap_or_else(|| vec![0.0; h]),
        slope,
        mask_future_hidden,
    };
    let (a_saved, bias_saved, out) =
        forward_saved(&logits, &bias, |a, m| dape_v2(a, m, dims, span, &convs))?;
    let state = Arc::new(V2State {
        logits: a_saved,
        bias: bias_saved,
        dims,
        span: span.clone(),
        convs,
    });
    let parents = [
        Some(prim(logits)),
        bias.map(prim),
        Some(prim(w1)),
        b1.map(prim),
        Some(prim(w2)),
        b2.map(prim),
    ];
    cast(record_dape_node(V2Backward, parents, state, out, &device))
}

/// What the backward pass of [`dape_v2_autodiff`] needs, on the host.
#[derive(Debug)]
struct V2State {
    logits: burn_ndarray::NdArrayTensor,
    bias: Option<burn_ndarray::NdArrayTensor>,
    dims: [usize; 4],
    span: Span,
    convs: KeyConvs,
}

#[derive(Debug)]
struct V2Backward;

impl Backward<Nd, 6> for V2Backward {
    type State = Arc<V2State>;

    fn backward(self, ops: Ops<Self::State, 6>, grads: &mut Gradients, _: &mut Checkpointer) {
        let st = Arc::clone(&ops.state);
        let [c, d, h, k] = st.convs.dims;
        node_backward(
            ops,
            grads,
            &st.logits,
            st.bias.as_ref(),
            |logits, bias, grad| {
                let g = dape_v2_backward(logits, bias, grad, st.dims, &st.span, &st.convs);
                [
                    (g.logits, st.dims.to_vec()),
                    (g.bias.unwrap_or_default(), bias_shape(bias, st.dims)),
                    (g.w1, vec![d, c, 1, k]),
                    (g.b1, vec![d]),
                    (g.w2, vec![h, d, 1, k]),
                    (g.b2, vec![h]),
                ]
            },
        );
    }
}
