//! DAPE V1's forward kernel, [`dape_v1`]: `logits + bias + f([logits ‖ bias])` with
//! `f = Linear(C → D) → LeakyReLU → Linear(D → H)`, one pass over each row of keys.
//!
//! For a block of [`LANES`] keys it gathers the `C` input channels (`H` logits, then `H` bias
//! values; `C = H` over NoPE), forms the `D` hidden values and the `H` outputs with the hidden
//! vector in registers, and writes `logits + bias + f`. Keys a causal row cannot see get
//! `logits + bias` only (they are masked afterwards). The reference it must equal is the tensor
//! path, `Dape::forward_tensor_path` (`dape/tensor_path.rs`).

use super::bias_fits;
use super::distance_half::{dape_v1_by_distance, DistanceHalf};
use super::rows::{batch_rows, each_row};
use super::simd::{madd, simd_entry, LANES};
use crate::encoding::Span;

/// The weights of DAPE's `f = Linear(C → D) → LeakyReLU → Linear(D → H)`, on the host, in the
/// layouts the kernels read contiguously.
#[derive(Clone, Debug)]
pub(crate) struct Mlp {
    /// Input channels `C` (`2H` with a base bias, `H` without).
    pub(super) c: usize,
    /// Hidden width `D`.
    pub(super) d: usize,
    /// Heads `H` (outputs).
    pub(super) h: usize,
    /// First layer, `[D, C]` (row `d`: the weights into hidden unit `d`).
    pub(super) w1: Vec<f32>,
    /// First layer transposed, `[C, D]` (Burn's `Linear` layout).
    pub(super) w1t: Vec<f32>,
    /// First bias, `[D]`.
    pub(super) b1: Vec<f32>,
    /// Second layer, `[H, D]`.
    pub(super) w2: Vec<f32>,
    /// Second layer transposed, `[D, H]` (Burn's `Linear` layout).
    pub(super) w2t: Vec<f32>,
    /// Second bias, `[H]`.
    pub(super) b2: Vec<f32>,
    /// LeakyReLU slope.
    pub(super) slope: f32,
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
pub(super) fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = x[r * cols + c];
        }
    }
    out
}

/// `logits + bias + f([logits ‖ bias])` for `logits: [batch, H, rows, keys]` and `bias`
/// `[1, H, rows, keys]` (shared by the batch) or `[batch, H, rows, keys]` (one per sequence:
/// forgetting attention's), or `logits + f(logits)` over NoPE when `None`. Keys after a causal
/// row's position get `logits + bias` only.
pub(crate) fn dape_v1(
    logits: Vec<f32>,
    bias: Option<&[f32]>,
    dims: [usize; 4],
    span: &Span,
    mlp: &Mlp,
) -> Vec<f32> {
    dape_v1_rows(logits, bias, dims, span, mlp, None)
}

/// [`dape_v1`], or with `distance` its bias and the bias's half of its first layer by distance
/// ([`DistanceHalf`]; `bias` is then not read): over a causal `span` whose rows and keys sit at
/// their token indices, and only the keys each row sees are written (the tile masks the rest).
pub(crate) fn dape_v1_rows(
    mut logits: Vec<f32>,
    bias: Option<&[f32]>,
    [b, h, lq, lk]: [usize; 4],
    span: &Span,
    mlp: &Mlp,
    distance: Option<&DistanceHalf>,
) -> Vec<f32> {
    debug_assert_eq!(logits.len(), b * h * lq * lk);
    debug_assert!(bias.is_none_or(|m| bias_fits(m.len(), [b, h, lq, lk])));
    debug_assert_eq!(mlp.h, h);
    if let Some(table) = distance {
        dape_v1_by_distance(&mut logits, [b, h, lq, lk], span, mlp, table);
        return logits;
    }
    debug_assert_eq!(mlp.c, if bias.is_some() { 2 * h } else { h });
    each_row(
        &mut logits,
        [lq, lk],
        bias,
        span,
        || Scratch::new(mlp),
        |s, _, planes, bias, visible| {
            // A map shared by two or more batch elements goes through its half of the first
            // layer once per query row, not once per batch element.
            let shared = bias.len() == h && planes.len() > h;
            if shared {
                bias_half_simd(mlp, bias, visible, s);
            }
            for (bi, heads) in planes.chunks_mut(h).enumerate() {
                forward_row_simd(mlp, heads, batch_rows(bias, h, bi), visible, shared, s);
            }
        },
    );
    logits
}

simd_entry! {
    /// [`forward_row`] for this CPU.
    fn forward_row_simd = forward_row(
        mlp: &Mlp,
        heads: &mut [&mut [f32]],
        bias: &[&[f32]],
        visible: usize,
        shared: bool,
        s: &mut Scratch,
    )
}

simd_entry! {
    /// [`bias_half`] for this CPU.
    fn bias_half_simd = bias_half(mlp: &Mlp, bias: &[&[f32]], visible: usize, s: &mut Scratch)
}

/// Per-thread working memory, `[channels][LANES]` each.
pub(super) struct Scratch {
    /// Gathered inputs, `C`.
    pub(super) x: Vec<[f32; LANES]>,
    /// Pre-activation hidden values, `D`.
    z: Vec<[f32; LANES]>,
    /// Hidden values after LeakyReLU, `D`.
    hidden: Vec<[f32; LANES]>,
    /// Second-layer outputs, `H`.
    out: Vec<[f32; LANES]>,
    /// The bias's half of the first layer with its bias, `b1 + W1[:, H..] · B`, for every block
    /// of the row's visible keys: `[blocks][D]`.
    pre: Vec<[f32; LANES]>,
}

impl Scratch {
    pub(super) fn new(mlp: &Mlp) -> Self {
        Self {
            x: vec![[0.0; LANES]; mlp.c],
            z: vec![[0.0; LANES]; mlp.d],
            hidden: vec![[0.0; LANES]; mlp.d],
            out: vec![[0.0; LANES]; mlp.h],
            pre: Vec::new(),
        }
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
    dense::<FMA>(out, weight, n, input, |k| {
        [bias.get(k).copied().unwrap_or(0.0); LANES]
    });
}

/// `out[k] = init(k) + Σ_c weight[k · stride + c] · input[c]`, lane by lane, [`CHAINS`] outputs
/// at a time: each output's sum is one chain of dependent multiply-adds (in `c` order, so the
/// bits do not depend on how many run together), and one chain alone would wait on the
/// multiply-add's latency at every step; several side by side keep the unit busy and share
/// each input's load.
#[inline(always)]
pub(super) fn dense<const FMA: bool>(
    out: &mut [[f32; LANES]],
    weight: &[f32],
    stride: usize,
    input: &[[f32; LANES]],
    init: impl Fn(usize) -> [f32; LANES],
) {
    let n = input.len();
    let mut k0 = 0;
    while k0 + CHAINS <= out.len() {
        let rows: [&[f32]; CHAINS] = std::array::from_fn(|i| &weight[(k0 + i) * stride..][..n]);
        let mut acc: [[f32; LANES]; CHAINS] = std::array::from_fn(|i| init(k0 + i));
        for (c, x) in input.iter().enumerate() {
            for i in 0..CHAINS {
                let w = rows[i][c];
                for l in 0..LANES {
                    acc[i][l] = madd::<FMA>(acc[i][l], w, x[l]);
                }
            }
        }
        out[k0..k0 + CHAINS].copy_from_slice(&acc);
        k0 += CHAINS;
    }
    for (k, o) in out.iter_mut().enumerate().skip(k0) {
        let mut acc = init(k);
        for (&w, x) in weight[k * stride..][..n].iter().zip(input) {
            for l in 0..LANES {
                acc[l] = madd::<FMA>(acc[l], w, x[l]);
            }
        }
        *o = acc;
    }
}

/// Outputs that [`dense`] sums side by side: four chains cover the multiply-add's latency (four
/// cycles on current x86 cores) at one per cycle.
pub(super) const CHAINS: usize = 4;

/// `hidden = LeakyReLU(z)`, lane by lane.
#[inline(always)]
fn leaky_relu_lanes(hidden: &mut [[f32; LANES]], z: &[[f32; LANES]], slope: f32) {
    for (hd, z) in hidden.iter_mut().zip(z) {
        for l in 0..LANES {
            hd[l] = if z[l] >= 0.0 { z[l] } else { z[l] * slope };
        }
    }
}

/// Copies keys `j0 .. j0 + n` of `rows` into the first `n` lanes of `dst`, zeroing the rest.
#[inline(always)]
pub(super) fn gather(
    dst: &mut [[f32; LANES]],
    rows: impl Iterator<Item = impl AsRef<[f32]>>,
    j0: usize,
    n: usize,
) {
    for (lane, row) in dst.iter_mut().zip(rows) {
        let row = row.as_ref();
        if n == LANES {
            // A whole block as one fixed-size copy: one vector load, not a call to `memmove`.
            *lane = <[f32; LANES]>::try_from(&row[j0..j0 + LANES]).expect("a block of lanes");
        } else {
            lane[..n].copy_from_slice(&row[j0..j0 + n]);
            lane[n..].fill(0.0);
        }
    }
}

/// The first layer from the bias's half in `s.pre` (block `blk`) plus the logits' half
/// `W1[:, ..H] · x[..H]`, and LeakyReLU: fills `z` and `hidden`.
#[inline(always)]
fn logits_half<const FMA: bool>(mlp: &Mlp, blk: usize, s: &mut Scratch) {
    let (c, d, h) = (mlp.c, mlp.d, mlp.h);
    let pre = &s.pre[blk * d..(blk + 1) * d];
    dense::<FMA>(&mut s.z, &mlp.w1, c, &s.x[..h], |k| pre[k]);
    leaky_relu_lanes(&mut s.hidden, &s.z, mlp.slope);
}

/// [`logits_half`] with the bias's half `init(k)` (with `b1`) from elsewhere (a table by
/// distance): fills `z` and `hidden`.
#[inline(always)]
pub(super) fn logits_half_over<const FMA: bool>(
    mlp: &Mlp,
    s: &mut Scratch,
    init: impl Fn(usize) -> [f32; LANES],
) {
    dense::<FMA>(&mut s.z, &mlp.w1, mlp.c, &s.x[..mlp.h], init);
    leaky_relu_lanes(&mut s.hidden, &s.z, mlp.slope);
}

/// The first layer and LeakyReLU for the gathered block `x`: fills `z` and `hidden`.
#[inline(always)]
fn hidden_layer<const FMA: bool>(mlp: &Mlp, s: &mut Scratch) {
    layer::<FMA>(&mut s.z, &mlp.w1, &mlp.b1, &s.x);
    leaky_relu_lanes(&mut s.hidden, &s.z, mlp.slope);
}

/// The second layer over `s.hidden` (keys `j0 .. j0 + n` of one query row), written as
/// `logits + bias + f` into `heads` (`logits + f` without a bias).
#[inline(always)]
pub(super) fn second_layer_into<const FMA: bool>(
    mlp: &Mlp,
    heads: &mut [&mut [f32]],
    bias: &[&[f32]],
    j0: usize,
    n: usize,
    s: &mut Scratch,
) {
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

/// `b1 + W1[:, H..] · B` for every block of the `visible` keys of one query row of a bias map
/// shared by the batch, into `s.pre` (`[blocks][D]`).
#[inline(always)]
fn bias_half<const FMA: bool>(mlp: &Mlp, bias: &[&[f32]], visible: usize, s: &mut Scratch) {
    let (c, d, h) = (mlp.c, mlp.d, mlp.h);
    s.pre.resize(visible.div_ceil(LANES) * d, [0.0; LANES]);
    for (blk, j0) in (0..visible).step_by(LANES).enumerate() {
        let n = LANES.min(visible - j0);
        gather(&mut s.x[h..], bias.iter(), j0, n);
        let pre = &mut s.pre[blk * d..(blk + 1) * d];
        dense::<FMA>(pre, &mlp.w1[h..], c, &s.x[h..], |k| [mlp.b1[k]; LANES]);
    }
}

/// One query row of one batch element: `heads[hh]` holds head `hh`'s logits over the keys and
/// receives `logits + bias + f`. With `shared`, the first layer starts from `s.pre` (the
/// bias's half, [`bias_half`]) and adds only the logits' half.
#[inline(always)]
fn forward_row<const FMA: bool>(
    mlp: &Mlp,
    heads: &mut [&mut [f32]],
    bias: &[&[f32]],
    visible: usize,
    shared: bool,
    s: &mut Scratch,
) {
    let h = mlp.h;
    let lk = heads.first().map_or(0, |r| r.len());
    for (blk, j0) in (0..visible).step_by(LANES).enumerate() {
        let n = LANES.min(visible - j0);
        gather(&mut s.x[..h], heads.iter().map(|r| &r[..]), j0, n);
        if shared {
            logits_half::<FMA>(mlp, blk, s);
        } else {
            gather(&mut s.x[h..], bias.iter(), j0, n);
            hidden_layer::<FMA>(mlp, s);
        }
        second_layer_into::<FMA>(mlp, heads, bias, j0, n, s);
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
