//! Stick-breaking attention's weights on ndarray: per row, one pass outward from the query
//! forward, and a backward pass that recomputes the row's weights (nothing but the logits is
//! kept for it).
//!
//! For one stick whose keys break in the order `k_1, k_2, …` (nearest first), with
//! `σ_m = σ(z_{k_m})` and `A_m = σ_m Π_{n<m} (1 − σ_n)`, the gradient of a loss with
//! `G_m = ∂L/∂A_m` is
//!
//! ```text
//! ∂L/∂z_{k_m} = G_m A_m (1 − σ_m) − σ_m Σ_{n>m} G_n A_n
//! ```
//!
//! (every farther key's weight carries the factor `1 − σ_m`), a running sum from the far end.
//! The weights come from the forward pass's output, which the graph keeps anyway (the product
//! with V needs it), with `σ = 1 / (1 + e^{−z})`; only where a key sits on two sticks at once
//! (the query's own key of a bidirectional row with `attend_current`) are the row's weights
//! recomputed per stick.
//! `ln(1 + e^{−|z|})`, shared by `softplus` and `log σ`, is computed by the series of
//! `2·atanh(u / (2 + u))` (with `u = e^{−|z|}` in (0, 1], `u / (2 + u) ≤ 1/3`), plain arithmetic
//! that vectorizes, accurate to a few f32 ulps.

use std::ops::Range;

use burn::prelude::*;
use rayon::prelude::*;

use super::node::{record_unary_lazy, UnaryGrad};
use super::simd::{exp, vectorized};
use super::{row_major_values, to_nd, Ad, Nd};
use crate::kernel::cast;
use crate::kernel::stick_breaking::Sticks;

/// `ln(1 + e^{−|z|})`: `2·atanh(s)` with `s = u / (2 + u)`, `u = e^{−|z|}`, to `s¹³`.
#[inline(always)]
fn log1p_exp_neg_abs(z: f32) -> f32 {
    let u = exp(-z.abs());
    let s = u / (2.0 + u);
    let s2 = s * s;
    let p = 1.0 / 13.0;
    let p = p * s2 + 1.0 / 11.0;
    let p = p * s2 + 1.0 / 9.0;
    let p = p * s2 + 1.0 / 7.0;
    let p = p * s2 + 1.0 / 5.0;
    let p = p * s2 + 1.0 / 3.0;
    let p = p * s2 + 1.0;
    2.0 * s * p
}

vectorized! {
    /// `take = log σ(z)` and `keep = log(1 − σ(z)) = −softplus(z)`, elementwise.
    fn log_take_keep(z: &[f32], take: &mut [f32], keep: &mut [f32]) {
        for ((&z, t), k) in z.iter().zip(take.iter_mut()).zip(keep.iter_mut()) {
            let l = log1p_exp_neg_abs(z);
            *t = z.min(0.0) - l;
            *k = -(z.max(0.0) + l);
        }
    }
}

vectorized! {
    /// `x ← e^x`, elementwise.
    fn exp_in_place(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = exp(*v);
        }
    }
}

/// Below this magnitude a weight or a logit's gradient is set to 0. A stick's far weights decay
/// geometrically (`(1 − σ)^d`), and their products with the output's gradient fall through the
/// subnormal range, where every multiply of the GEMMs that read them takes a microcode assist on
/// x86 (the stick-breaking node's backward pass ran at a fraction of its speed). A weight under
/// 1e-30 moves no output by more than 1e-30 of a value.
const TINY: f32 = 1e-30;

vectorized! {
    /// `x ← 0` where `|x| < TINY`, elementwise.
    fn flush_tiny(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = if v.abs() < TINY { 0.0 } else { *v };
        }
    }
}

/// The keys of row `row`'s sticks: the earlier ones (broken downwards) and, bidirectional,
/// the later ones (broken upwards).
fn stick_ranges(row: usize, rows: usize, keys: usize, s: Sticks) -> [Range<usize>; 2] {
    let i = s.query_start + row % rows;
    let own = usize::from(s.attend_current);
    let down = 0..(i + own).min(keys);
    let up = if s.causal {
        0..0
    } else {
        (i + 1 - own).min(keys)..keys
    };
    [down, up]
}

/// Row `z`'s log-weights on the stick over `keys` (broken downwards or upwards), written into
/// `keep` (which held `log(1 − σ)`); `take` holds `log σ`.
fn scan_log_weights(take: &[f32], keep: &mut [f32], keys: Range<usize>, down: bool) {
    let mut nearer = 0.0f32;
    let mut step = |j: usize| {
        let k = keep[j];
        keep[j] = take[j] + nearer;
        nearer += k;
    };
    if down {
        keys.rev().for_each(&mut step);
    } else {
        keys.for_each(&mut step);
    }
}

/// Scratch rows of one worker: `log σ` and `log(1 − σ)` (then the weights).
struct Scratch {
    take: Vec<f32>,
    keep: Vec<f32>,
}

impl Scratch {
    fn new(keys: usize) -> Self {
        Self {
            take: vec![0.0; keys],
            keep: vec![0.0; keys],
        }
    }

    /// The weights of the stick over `range` into `keep[range]`, and with `sigma` also `σ`
    /// into `take[range]` (else `take` keeps `log σ`).
    fn weights(&mut self, z: &[f32], range: Range<usize>, down: bool, sigma: bool) {
        let r = range.clone();
        log_take_keep(
            &z[r.clone()],
            &mut self.take[r.clone()],
            &mut self.keep[r.clone()],
        );
        scan_log_weights(&self.take, &mut self.keep, range, down);
        exp_in_place(&mut self.keep[r.clone()]);
        if sigma {
            exp_in_place(&mut self.take[r]);
        }
    }
}

/// The weights of row `row` (of `rows`, so that its query is `query_start + row % rows`) from
/// its logits `z`, added into `out` (zero on entry).
fn forward_row(
    scratch: &mut Scratch,
    row: usize,
    rows: usize,
    z: &[f32],
    out: &mut [f32],
    sticks: Sticks,
) {
    let keys = z.len();
    let weight = if sticks.causal { 1.0 } else { 0.5 };
    for (n, range) in stick_ranges(row, rows, keys, sticks)
        .into_iter()
        .enumerate()
    {
        scratch.weights(z, range.clone(), n == 0, false);
        for j in range {
            out[j] += weight * scratch.keep[j];
        }
    }
    flush_tiny(out);
}

/// The weights of every row: `[.., rows, keys]` row-major.
fn forward(z: &[f32], [_, _, rows, keys]: [usize; 4], sticks: Sticks) -> Vec<f32> {
    let mut out = vec![0.0f32; z.len()];
    out.par_chunks_mut(keys)
        .zip(z.par_chunks(keys))
        .enumerate()
        .for_each_init(
            || Scratch::new(keys),
            |scratch, (row, (out, z))| forward_row(scratch, row, rows, z, out, sticks),
        );
    out
}

/// The weights of the `[rows, keys]` logits `z` of one (batch, head), row by row on this
/// thread (the fused attention node's tile; its caller runs heads in parallel).
pub(super) fn weights_rows(z: &[f32], rows: usize, keys: usize, sticks: Sticks) -> Vec<f32> {
    let mut out = vec![0.0f32; z.len()];
    let mut scratch = Scratch::new(keys);
    for (row, (z, out)) in z
        .chunks_exact(keys.max(1))
        .zip(out.chunks_exact_mut(keys.max(1)))
        .enumerate()
    {
        forward_row(&mut scratch, row, rows, z, out, sticks);
    }
    out
}

vectorized! {
    /// `σ(z)` into `sigma` and `G·A` into `ga`, elementwise, from the saved weights `a`.
    fn sigma_and_ga(z: &[f32], a: &[f32], g: &[f32], sigma: &mut [f32], ga: &mut [f32]) {
        for ((((&z, &a), &g), s), p) in z.iter().zip(a).zip(g).zip(sigma.iter_mut()).zip(ga.iter_mut()) {
            *s = 1.0 / (1.0 + exp(-z));
            *p = g * a;
        }
    }
}

/// `∂L/∂z` of row `row` (see [`forward_row`]) from its logits `z`, weights `out` and
/// `g = ∂L/∂A`, added into `dz` (zero on entry; see the module docs).
#[allow(clippy::too_many_arguments)]
fn backward_row(
    scratch: &mut Scratch,
    row: usize,
    rows: usize,
    z: &[f32],
    out: &[f32],
    g: &[f32],
    dz: &mut [f32],
    sticks: Sticks,
) {
    let keys = z.len();
    let weight = if sticks.causal { 1.0 } else { 0.5 };
    // The query's own key on both sticks: its saved weight mixes the two, so recompute.
    let recompute = !sticks.causal && sticks.attend_current;
    for (n, range) in stick_ranges(row, rows, keys, sticks)
        .into_iter()
        .enumerate()
    {
        let down = n == 0;
        let r = range.clone();
        if recompute {
            scratch.weights(z, r.clone(), down, true);
            for j in r {
                scratch.keep[j] *= weight * g[j];
            }
        } else {
            sigma_and_ga(
                &z[r.clone()],
                &out[r.clone()],
                &g[r.clone()],
                &mut scratch.take[r.clone()],
                &mut scratch.keep[r],
            );
        }
        let (ga, sigma) = (&scratch.keep, &scratch.take);
        let mut farther = 0.0f32;
        let mut step = |j: usize| {
            let ga = ga[j];
            dz[j] += ga * (1.0 - sigma[j]) - sigma[j] * farther;
            farther += ga;
        };
        // From the far end towards the query.
        if down {
            range.for_each(&mut step);
        } else {
            range.rev().for_each(&mut step);
        }
    }
    flush_tiny(dz);
}

/// `∂L/∂z` of every row from `g = ∂L/∂A` and the forward pass's weights `out` (see the module
/// docs).
fn backward(
    z: &[f32],
    out: &[f32],
    g: &[f32],
    [_, _, rows, keys]: [usize; 4],
    sticks: Sticks,
) -> Vec<f32> {
    let mut dz = vec![0.0f32; z.len()];
    dz.par_chunks_mut(keys)
        .zip(
            z.par_chunks(keys)
                .zip(g.par_chunks(keys).zip(out.par_chunks(keys))),
        )
        .enumerate()
        .for_each_init(
            || Scratch::new(keys),
            |scratch, (row, (dz, (z, (g, out))))| {
                backward_row(scratch, row, rows, z, out, g, dz, sticks)
            },
        );
    dz
}

/// [`backward`] of the `[rows, keys]` tile of one (batch, head), on this thread: `∂L/∂z`
/// from the logits `z`, the weights `a` and `g = ∂L/∂A`.
pub(super) fn grad_rows(
    z: &[f32],
    a: &[f32],
    g: &[f32],
    rows: usize,
    keys: usize,
    sticks: Sticks,
) -> Vec<f32> {
    let mut dz = vec![0.0f32; z.len()];
    let mut scratch = Scratch::new(keys);
    let k = keys.max(1);
    for (row, (dz, ((z, a), g))) in dz
        .chunks_exact_mut(k)
        .zip(
            z.chunks_exact(k)
                .zip(a.chunks_exact(k))
                .zip(g.chunks_exact(k)),
        )
        .enumerate()
    {
        backward_row(&mut scratch, row, rows, z, a, g, dz, sticks);
    }
    dz
}

pub(in crate::kernel) fn stick_breaking_nd<B: Backend>(
    x: Tensor<B, 4>,
    sticks: Sticks,
) -> Option<Tensor<B, 4>> {
    let x: Tensor<Nd, 4> = cast(x)?;
    let (dims, device) = (x.dims(), x.device());
    let w = forward(
        &row_major_values(&x.into_primitive().tensor())?,
        dims,
        sticks,
    );
    cast(to_nd(w, dims, &device))
}

/// The backward pass: the logits and the weights (both shared with the graph, not copies).
#[derive(Debug)]
struct StickBreakingGrad {
    z: burn_ndarray::NdArrayTensor,
    out: burn_ndarray::NdArrayTensor,
    dims: [usize; 4],
    sticks: Sticks,
}

impl UnaryGrad for StickBreakingGrad {
    fn input_grad(&self, grad: &[f32]) -> Vec<f32> {
        let z = row_major_values(&self.z).expect("the logits are f32");
        let out = row_major_values(&self.out).expect("the weights are f32");
        backward(&z, &out, grad, self.dims, self.sticks)
    }
}

pub(in crate::kernel) fn stick_breaking_autodiff<B: Backend>(
    x: Tensor<B, 4>,
    sticks: Sticks,
) -> Option<Tensor<B, 4>> {
    let x: Tensor<Ad, 4> = cast(x)?;
    let dims = x.dims();
    let input = x.clone().inner().into_primitive().tensor();
    let z = row_major_values(&input)?.into_owned();
    let w = forward(&z, dims, sticks);
    cast(record_unary_lazy(x, move |tracked| {
        let saved = tracked.then_some(move |out| {
            Box::new(StickBreakingGrad {
                z: input,
                out,
                dims,
                sticks,
            }) as Box<dyn UnaryGrad>
        });
        (w, saved)
    }))
}
