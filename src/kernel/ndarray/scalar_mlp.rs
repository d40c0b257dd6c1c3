//! FIRE's bias as a piecewise-linear function of its scalar input: `out[0, h, r, c] =
//! g_h(table[|rows[r] − cols[c]|] / normaliser[r])`, `[1, heads, rows, cols]`, where `g` is the
//! MLP `1 → width → heads` through a piecewise-linear activation. Between two consecutive kinks
//! (`x = −b1[k] / w1[k]`) every hidden unit keeps its sign, so `g_h(x) = a[s][h] · x + c[s][h]`
//! on piece `s`; the pieces' slopes and intercepts are summed in `f64` once per call.

use burn::prelude::*;
use rayon::prelude::*;

use super::{host, to_nd};
use crate::kernel::cast;
use crate::kernel::ScalarMlp;

/// The pieces of `g`: the sorted kinks, and per piece (one more than the kinks) the slope and
/// the intercept of every head, `[pieces, heads]` each.
struct Pieces {
    kinks: Vec<f32>,
    slope: Vec<f32>,
    intercept: Vec<f32>,
    heads: usize,
}

impl Pieces {
    /// The pieces of `Σ_k w2[k, h] · act(w1[k] x + b1[k]) + b2[h]` (`w2` `[width, heads]`
    /// row-major), `act(z) = z` above zero and `leak · z` below.
    fn new(w1: &[f32], b1: &[f32], w2: &[f32], b2: &[f32], leak: f32) -> Self {
        let heads = b2.len();
        let mut kinks: Vec<f32> = w1
            .iter()
            .zip(b1)
            .filter(|(w, _)| **w != 0.0)
            .map(|(w, b)| -b / w)
            .filter(|x| x.is_finite())
            .collect();
        kinks.sort_by(f32::total_cmp);
        kinks.dedup();
        // A point inside each piece decides which units are above zero there.
        let inside = |s: usize| -> f64 {
            match (s.checked_sub(1).map(|i| kinks[i]), kinks.get(s)) {
                (None, None) => 0.0,
                (None, Some(&hi)) => f64::from(hi) - 1.0,
                (Some(lo), None) => f64::from(lo) + 1.0,
                (Some(lo), Some(&hi)) => 0.5 * (f64::from(lo) + f64::from(hi)),
            }
        };
        let pieces = kinks.len() + 1;
        let (mut slope, mut intercept) =
            (vec![0.0f32; pieces * heads], vec![0.0f32; pieces * heads]);
        for s in 0..pieces {
            let x = inside(s);
            let mut a = vec![0.0f64; heads];
            let mut c: Vec<f64> = b2.iter().map(|&v| f64::from(v)).collect();
            for (k, (&w, &b)) in w1.iter().zip(b1).enumerate() {
                let pre = f64::from(w) * x + f64::from(b);
                let gain = if pre > 0.0 { 1.0 } else { f64::from(leak) };
                for h in 0..heads {
                    let out = f64::from(w2[k * heads + h]) * gain;
                    a[h] += out * f64::from(w);
                    c[h] += out * f64::from(b);
                }
            }
            for h in 0..heads {
                slope[s * heads + h] = a[h] as f32;
                intercept[s * heads + h] = c[h] as f32;
            }
        }
        Self {
            kinks,
            slope,
            intercept,
            heads,
        }
    }

    /// The piece that holds `x` (at a kink either side gives the same value).
    #[inline(always)]
    fn piece(&self, x: f32) -> usize {
        self.kinks.partition_point(|&k| k < x)
    }
}

/// [`crate::kernel::scalar_mlp_bias`] on `NdArray<f32>`: one task per row finds each pair's
/// input and piece, then one task per (head, row) writes the head's values.
pub(in crate::kernel) fn scalar_mlp_bias_nd<B: Backend>(
    mlp: ScalarMlp<B>,
    table: Tensor<B, 1>,
    normaliser: Tensor<B, 1>,
    rows: &[i64],
    cols: &[i64],
) -> Option<Tensor<B, 4>> {
    let (table, normaliser) = (host(table)?, host(normaliser)?);
    let (w1, w2) = (host(mlp.w1)?, host(mlp.w2)?);
    let width = w1.len();
    let heads = w2.len() / width.max(1);
    let b1 = match mlp.b1 {
        Some(b) => host(b)?,
        None => vec![0.0; width],
    };
    let b2 = match mlp.b2 {
        Some(b) => host(b)?,
        None => vec![0.0; heads],
    };
    let (lq, lk) = (rows.len(), cols.len());
    let reach = rows
        .iter()
        .flat_map(|&p| [cols.first(), cols.last()].map(|c| c.map(|&c| (p - c).unsigned_abs())))
        .flatten()
        .max()
        .unwrap_or(0) as usize;
    let cols_sorted = cols.windows(2).all(|w| w[0] <= w[1]);
    if width == 0
        || w2.len() != width * heads
        || b1.len() != width
        || b2.len() != heads
        || normaliser.len() != lq
        || (lk > 0 && reach >= table.len())
        || !cols_sorted
    {
        return None;
    }
    let pieces = Pieces::new(&w1, &b1, &w2, &b2, mlp.slope);
    // Each pair's input and piece, row by row.
    let mut inputs = vec![(0.0f32, 0u32); lq * lk];
    inputs
        .par_chunks_mut(lk.max(1))
        .enumerate()
        .for_each(|(r, row)| {
            let (p, n) = (rows[r], normaliser[r]);
            for (slot, &c) in row.iter_mut().zip(cols) {
                let x = table[(p - c).unsigned_abs() as usize] / n;
                *slot = (x, pieces.piece(x) as u32);
            }
        });
    let mut out = vec![0.0f32; heads * lq * lk];
    out.par_chunks_mut(lk.max(1))
        .enumerate()
        .for_each(|(task, dst)| {
            let (h, r) = (task / lq, task % lq);
            let src = &inputs[r * lk..(r + 1) * lk];
            for (o, &(x, s)) in dst.iter_mut().zip(src) {
                let at = s as usize * pieces.heads + h;
                *o = pieces.slope[at].mul_add(x, pieces.intercept[at]);
            }
        });
    cast(to_nd(out, [1, heads, lq, lk], &Default::default()))
}
