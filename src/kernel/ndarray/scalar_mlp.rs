//! FIRE's bias as a piecewise-linear function of its scalar input: `out[0, h, r, c] =
//! g_h(table[|rows[r] − cols[c]|] / normaliser[r])`, `[1, heads, rows, cols]`, where `g` is the
//! MLP `1 → width → heads` through a piecewise-linear activation. Between two consecutive kinks
//! (`x = −b1[k] / w1[k]`) every hidden unit keeps its sign, so `g_h(x) = a[s][h] · x + c[s][h]`
//! on piece `s`; the pieces' slopes and intercepts are summed in `f64` once per call.
//!
//! Under autodiff the bias is one graph node over the table, the normalisers and the MLP's four
//! tensors. Its backward pass sums the bias's gradient `G` per piece and head (`Σ G` and
//! `Σ G x`), from which the MLP's gradients follow piece by piece, and gives each pair's
//! `∂x = Σ_h G_h a[s][h]` to the table (`/ n_r`) and the normaliser (`−x / n_r`).

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::prelude::*;
use burn::tensor::ops::FloatTensorOps;
use burn::tensor::{TensorData, TensorPrimitive};
use rayon::prelude::*;

use super::node::{backward_for_parents, finish_node};
use super::{host, host_grad, host_primitive, to_nd, Ad, Nd};
use crate::kernel::cast;
use crate::kernel::ScalarMlp;

/// The pieces of `g`: the sorted kinks, and per piece (one more than the kinks) the slope and
/// the intercept of every head, `[pieces, heads]` each.
#[derive(Debug)]
struct Pieces {
    kinks: Vec<f32>,
    slope: Vec<f32>,
    intercept: Vec<f32>,
    /// Each hidden unit's slope on each piece (1 or the leak), `[pieces, width]`.
    gains: Vec<f64>,
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
        let mut gains = vec![0.0f64; pieces * w1.len()];
        for s in 0..pieces {
            let x = inside(s);
            let mut a = vec![0.0f64; heads];
            let mut c: Vec<f64> = b2.iter().map(|&v| f64::from(v)).collect();
            for (k, (&w, &b)) in w1.iter().zip(b1).enumerate() {
                let pre = f64::from(w) * x + f64::from(b);
                let gain = if pre > 0.0 { 1.0 } else { f64::from(leak) };
                gains[s * w1.len() + k] = gain;
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
            gains,
            heads,
        }
    }

    /// The piece that holds `x` (at a kink either side gives the same value).
    #[inline(always)]
    fn piece(&self, x: f32) -> usize {
        self.kinks.partition_point(|&k| k < x)
    }
}

/// The host values of one call: the table, the normalisers, the MLP and the positions.
#[derive(Debug)]
struct Inputs {
    table: Vec<f32>,
    normaliser: Vec<f32>,
    w1: Vec<f32>,
    b1: Vec<f32>,
    w2: Vec<f32>,
    rows: Vec<i64>,
    cols: Vec<i64>,
    pieces: Pieces,
}

impl Inputs {
    /// Checks the shapes and forms the pieces; `None` when a distance reaches past the table,
    /// the normalisers are not one per row, the columns are not sorted, or a shape is off.
    #[allow(clippy::too_many_arguments)]
    fn new(
        table: Vec<f32>,
        normaliser: Vec<f32>,
        [w1, b1, w2, b2]: [Vec<f32>; 4],
        slope: f32,
        rows: &[i64],
        cols: &[i64],
    ) -> Option<Self> {
        let width = w1.len();
        let heads = b2.len();
        let reach = rows
            .iter()
            .flat_map(|&p| [cols.first(), cols.last()].map(|c| c.map(|&c| (p - c).unsigned_abs())))
            .flatten()
            .max()
            .unwrap_or(0) as usize;
        let cols_sorted = cols.windows(2).all(|w| w[0] <= w[1]);
        if width == 0
            || heads == 0
            || w2.len() != width * heads
            || b1.len() != width
            || normaliser.len() != rows.len()
            || (!cols.is_empty() && reach >= table.len())
            || !cols_sorted
        {
            return None;
        }
        let pieces = Pieces::new(&w1, &b1, &w2, &b2, slope);
        Some(Self {
            table,
            normaliser,
            w1,
            b1,
            w2,
            rows: rows.to_vec(),
            cols: cols.to_vec(),
            pieces,
        })
    }

    /// Row `r`'s inputs `x` and pieces, one per column.
    fn row(&self, r: usize, dst: &mut [(f32, u32)]) {
        let (p, n) = (self.rows[r], self.normaliser[r]);
        for (slot, &c) in dst.iter_mut().zip(&self.cols) {
            let x = self.table[(p - c).unsigned_abs() as usize] / n;
            *slot = (x, self.pieces.piece(x) as u32);
        }
    }

    /// The bias `[heads, rows, cols]`: one task per row finds each pair's input and piece,
    /// then one task per (head, row) writes the head's values.
    fn values(&self) -> Vec<f32> {
        let (lq, lk, heads) = (self.rows.len(), self.cols.len(), self.pieces.heads);
        let mut inputs = vec![(0.0f32, 0u32); lq * lk];
        inputs
            .par_chunks_mut(lk.max(1))
            .enumerate()
            .for_each(|(r, row)| self.row(r, row));
        let mut out = vec![0.0f32; heads * lq * lk];
        out.par_chunks_mut(lk.max(1))
            .enumerate()
            .for_each(|(task, dst)| {
                let (h, r) = (task / lq, task % lq);
                for (o, &(x, s)) in dst.iter_mut().zip(&inputs[r * lk..(r + 1) * lk]) {
                    let at = s as usize * heads + h;
                    *o = self.pieces.slope[at].mul_add(x, self.pieces.intercept[at]);
                }
            });
        out
    }

    /// The gradients of the table `[n]`, the normalisers `[rows]`, `w1` `[width]`, `b1`
    /// `[width]`, `w2` `[width, heads]` and `b2` `[heads]` for the bias's gradient `g`
    /// (`[heads, rows, cols]`).
    fn grads(&self, g: &[f32]) -> [Vec<f32>; 6] {
        let (lq, lk, heads) = (self.rows.len(), self.cols.len(), self.pieces.heads);
        let width = self.w1.len();
        let pieces = self.pieces.kinks.len() + 1;
        let a = &self.pieces.slope;
        // Per group of rows: Σ G and Σ G x per piece and head, the table's gradient; each
        // row's normaliser gradient.
        let mut dn = vec![0.0f32; lq];
        let sums = dn
            .par_chunks_mut(16)
            .enumerate()
            .map(|(group, dn)| {
                let mut s0 = vec![0.0f64; pieces * heads];
                let mut s1 = vec![0.0f64; pieces * heads];
                let mut dtable = vec![0.0f64; self.table.len()];
                let mut row = vec![(0.0f32, 0u32); lk];
                let mut dx = vec![0.0f32; lk];
                for (i, dn_r) in dn.iter_mut().enumerate() {
                    let r = group * 16 + i;
                    self.row(r, &mut row);
                    dx.iter_mut().for_each(|v| *v = 0.0);
                    for h in 0..heads {
                        let gr = &g[(h * lq + r) * lk..][..lk];
                        for ((&(x, s), &gv), d) in row.iter().zip(gr).zip(dx.iter_mut()) {
                            let at = s as usize * heads + h;
                            s0[at] += f64::from(gv);
                            s1[at] += f64::from(gv) * f64::from(x);
                            *d += gv * a[at];
                        }
                    }
                    let (p, n) = (self.rows[r], self.normaliser[r]);
                    let mut acc = 0.0f64;
                    for ((&(x, _), &d), &c) in row.iter().zip(&dx).zip(&self.cols) {
                        dtable[(p - c).unsigned_abs() as usize] += f64::from(d / n);
                        acc -= f64::from(d) * f64::from(x) / f64::from(n);
                    }
                    *dn_r = acc as f32;
                }
                (s0, s1, dtable)
            })
            .reduce(
                || {
                    (
                        vec![0.0; pieces * heads],
                        vec![0.0; pieces * heads],
                        vec![0.0; self.table.len()],
                    )
                },
                |mut x, y| {
                    for (a, b) in [(&mut x.0, &y.0), (&mut x.1, &y.1), (&mut x.2, &y.2)] {
                        a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                    }
                    x
                },
            );
        let (s0, s1, dtable) = sums;
        let (mut dw1, mut db1) = (vec![0.0f64; width], vec![0.0f64; width]);
        let (mut dw2, mut db2) = (vec![0.0f64; width * heads], vec![0.0f64; heads]);
        for s in 0..pieces {
            for h in 0..heads {
                db2[h] += s0[s * heads + h];
            }
            for k in 0..width {
                let gain = self.pieces.gains[s * width + k];
                if gain == 0.0 {
                    continue;
                }
                let (w1, b1) = (f64::from(self.w1[k]), f64::from(self.b1[k]));
                for h in 0..heads {
                    let (g0, g1) = (s0[s * heads + h], s1[s * heads + h]);
                    let w2 = f64::from(self.w2[k * heads + h]);
                    dw2[k * heads + h] += gain * (w1 * g1 + b1 * g0);
                    dw1[k] += gain * w2 * g1;
                    db1[k] += gain * w2 * g0;
                }
            }
        }
        let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
        [f(dtable), dn, f(dw1), f(db1), f(dw2), f(db2)]
    }
}

/// The MLP's four tensors on the host (absent biases as zeros); `None` if one is not `f32`.
fn host_mlp<B: Backend>(mlp: ScalarMlp<B>) -> Option<[Vec<f32>; 4]> {
    let (w1, w2) = (host(mlp.w1)?, host(mlp.w2)?);
    let heads = w2.len() / w1.len().max(1);
    let b1 = match mlp.b1 {
        Some(b) => host(b)?,
        None => vec![0.0; w1.len()],
    };
    let b2 = match mlp.b2 {
        Some(b) => host(b)?,
        None => vec![0.0; heads],
    };
    Some([w1, b1, w2, b2])
}

/// [`crate::kernel::scalar_mlp_bias`] on `NdArray<f32>`.
pub(in crate::kernel) fn scalar_mlp_bias_nd<B: Backend>(
    mlp: ScalarMlp<B>,
    table: Tensor<B, 1>,
    normaliser: Tensor<B, 1>,
    rows: &[i64],
    cols: &[i64],
) -> Option<Tensor<B, 4>> {
    let slope = mlp.slope;
    let inputs = Inputs::new(
        host(table)?,
        host(normaliser)?,
        host_mlp(mlp)?,
        slope,
        rows,
        cols,
    )?;
    let dims = [1, inputs.pieces.heads, rows.len(), cols.len()];
    cast(to_nd(inputs.values(), dims, &Default::default()))
}

#[derive(Debug)]
struct ScalarMlpBackward<const N: usize>;

fn scalar_mlp_backward<const N: usize>(ops: Ops<Arc<Inputs>, N>, grads: &mut Gradients) {
    let grad = host_grad(grads.consume::<Nd>(&ops.node));
    let s = &ops.state;
    let (width, heads) = (s.w1.len(), s.pieces.heads);
    let shapes: [Vec<usize>; 6] = [
        vec![s.table.len()],
        vec![s.rows.len()],
        vec![1, width],
        vec![width],
        vec![width, heads],
        vec![heads],
    ];
    for ((parent, values), shape) in ops.parents.iter().zip(s.grads(&grad)).zip(shapes) {
        if let Some(parent) = parent {
            let t = Nd::float_from_data(TensorData::new(values, shape), &Default::default());
            grads.register::<Nd>(parent.id, t);
        }
    }
}

backward_for_parents!(ScalarMlpBackward, Arc<Inputs>, scalar_mlp_backward, [6]);

/// [`crate::kernel::scalar_mlp_bias`] on `Autodiff<NdArray<f32>>`: one node over the table,
/// the normalisers and the MLP's four tensors (both biases present; `None` otherwise).
pub(in crate::kernel) fn scalar_mlp_bias_autodiff<B: Backend>(
    mlp: ScalarMlp<B>,
    table: Tensor<B, 1>,
    normaliser: Tensor<B, 1>,
    rows: &[i64],
    cols: &[i64],
) -> Option<Tensor<B, 4>> {
    let prim = |t: Tensor<Ad, 1>| t.into_primitive().tensor();
    let prim2 = |t: Tensor<Ad, 2>| t.into_primitive().tensor();
    let table = prim(cast(table)?);
    let normaliser = prim(cast(normaliser)?);
    let (w1, w2) = (prim2(cast(mlp.w1)?), prim2(cast(mlp.w2)?));
    let (b1, b2) = (prim(cast(mlp.b1?)?), prim(cast(mlp.b2?)?));
    let values = [&w1, &b1, &w2, &b2].map(|t| host_primitive(t.primitive.clone()));
    let [Some(hw1), Some(hb1), Some(hw2), Some(hb2)] = values else {
        return None;
    };
    let inputs = Inputs::new(
        host_primitive(table.primitive.clone())?,
        host_primitive(normaliser.primitive.clone())?,
        [hw1, hb1, hw2, hb2],
        mlp.slope,
        rows,
        cols,
    )?;
    let dims = [1, inputs.pieces.heads, rows.len(), cols.len()];
    let out = to_nd(inputs.values(), dims, &Default::default())
        .into_primitive()
        .tensor();
    let parents = [
        table.node,
        normaliser.node,
        w1.node,
        b1.node,
        w2.node,
        b2.node,
    ];
    let out = finish_node(
        ScalarMlpBackward::<6>
            .prepare::<NoCheckpointing>(parents)
            .compute_bound()
            .stateful(),
        Arc::new(inputs),
        out,
    );
    cast(Tensor::<Ad, 4>::from_primitive(TensorPrimitive::Float(out)))
}
