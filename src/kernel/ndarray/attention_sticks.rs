//! Stick-breaking attention's tile in the attention node ([`AttentionViews`] with `sticks`):
//! the rows of a (batch, head) in blocks of [`ROW_BLOCK`], each block's keys cut where its
//! sticks end.
//!
//! For rows `r0..r1` (queries `i = query_start + r`), the keys are `0..end` with
//! `end = min(keys, query_start + r1 − 1 + attend_current)` under the causal mask (every key
//! past that is off every stick of the block) and all keys otherwise. Per block:
//!
//! ```text
//! forward:   Z = scale · Q_b K_{:end}ᵀ + bias_b,  A = sticks(Z),  O_b = A V_{:end}
//! backward:  Z, A recomputed;  dV_{:end} += Aᵀ dO_b;  dA = dO_b V_{:end}ᵀ;
//!            dZ = sticks'(Z, A, dA) (the scan from each stick's far end);
//!            dbias_b = dZ;  dQ_b = scale · dZ K_{:end};  dK_{:end} += scale · dZᵀ Q_b
//! ```
//!
//! A block's logits, weights and their gradients (`ROW_BLOCK × end` each) stay in cache, and
//! the products skip the causal upper triangle above the block's last row: about half the
//! work of full `rows × keys` tiles on a causal square.

use ndarray::s;

use super::attention::AttentionViews;
use super::gemm::{gemm, gemm_new, gemm_scaled, gemm_scaled_add, view2, Mat};
use super::stick_breaking::{grad_rows, weights_rows};
use crate::kernel::stick_breaking::Sticks;

/// Query rows per block: 64 rows of 8192 keys are 2 MiB of logits, and at training lengths
/// (≤ 1024 keys) a block's three buffers stay within 1 MiB.
const ROW_BLOCK: usize = 64;

/// The blocks of `rows` query rows: `(r0, r1, end)`, `end` the block's last key (exclusive)
/// and the block's sticks (their first query at `query_start + r0`).
fn blocks(
    rows: usize,
    keys: usize,
    sticks: Sticks,
) -> impl Iterator<Item = (usize, usize, usize, Sticks)> {
    (0..rows).step_by(ROW_BLOCK).map(move |r0| {
        let r1 = (r0 + ROW_BLOCK).min(rows);
        let end = if sticks.causal {
            (sticks.query_start + r1 - 1 + usize::from(sticks.attend_current)).min(keys)
        } else {
            keys
        };
        let block = Sticks {
            query_start: sticks.query_start + r0,
            ..sticks
        };
        (r0, r1, end, block)
    })
}

impl AttentionViews<'_> {
    /// The logits (with the bias) and the weights of rows `r0..r1` over keys `0..end`, of
    /// batch row `bi` and head `hi`: `[r1 − r0, end]` each, row-major.
    fn sticks_block(
        &self,
        bi: usize,
        hi: usize,
        (r0, r1, end): (usize, usize, usize),
        sticks: Sticks,
    ) -> (Vec<f32>, Vec<f32>) {
        let q = view2(self.q.slice(s![bi, hi, r0..r1, ..]));
        let k = view2(self.k.slice(s![bi, hi, 0..end, ..]));
        let mut z = gemm_new(self.scale, &q, &k.t());
        if let Some(t) = &self.bias {
            let bb = if t.dim().0 == 1 { 0 } else { bi };
            let bias = t.slice(s![bb, hi, r0..r1, 0..end]);
            for (row, b) in z.chunks_exact_mut(end.max(1)).zip(bias.rows()) {
                for (x, &b) in row.iter_mut().zip(b.iter()) {
                    *x += b;
                }
            }
        }
        let a = weights_rows(&z, r1 - r0, end, sticks);
        (z, a)
    }

    /// Head `hi`'s output for every batch row, `[batch, rows, d_v]` row-major.
    pub(super) fn sticks_head_out(&self, hi: usize, sticks: Sticks) -> Vec<f32> {
        let (b, _, rows, keys, _, dv) = self.dims();
        let mut out = vec![0.0f32; b * rows * dv];
        for bi in 0..b {
            for (r0, r1, end, block) in blocks(rows, keys, sticks) {
                let (_, a) = self.sticks_block(bi, hi, (r0, r1, end), block);
                let a = Mat::row_major(std::borrow::Cow::Owned(a), r1 - r0, end);
                let v = view2(self.v.slice(s![bi, hi, 0..end, ..]));
                let at = (bi * rows + r0) * dv;
                gemm(&a, &v, 0.0, &mut out[at..at + (r1 - r0) * dv]);
            }
        }
        out
    }

    /// Head `hi`'s gradients of q, k and v of every batch row (`[batch, .., ..]`, row-major)
    /// and the bias's (`[1 or batch, rows, keys]`, when wanted), from the output's gradient
    /// `g` `[batch, rows, heads, d_v]`.
    pub(super) fn sticks_head_grads(
        &self,
        hi: usize,
        sticks: Sticks,
        g: ndarray::ArrayView4<'_, f32>,
        bias_grad: bool,
    ) -> [Vec<f32>; 4] {
        let (b, _, rows, keys, dh, dv) = self.dims();
        let bias_batch = self.bias.as_ref().map_or(1, |t| t.dim().0);
        let mut dq = vec![0.0f32; b * rows * dh];
        let mut dk = vec![0.0f32; b * keys * dh];
        let mut dv_ = vec![0.0f32; b * keys * dv];
        let mut dbias = if bias_grad {
            vec![0.0f32; bias_batch * rows * keys]
        } else {
            Vec::new()
        };
        for bi in 0..b {
            for (r0, r1, end, block) in blocks(rows, keys, sticks) {
                let n = r1 - r0;
                let (z, a) = self.sticks_block(bi, hi, (r0, r1, end), block);
                let og = view2(g.slice(s![bi, r0..r1, hi, ..]));
                let q = view2(self.q.slice(s![bi, hi, r0..r1, ..]));
                let k = view2(self.k.slice(s![bi, hi, 0..end, ..]));
                let v = view2(self.v.slice(s![bi, hi, 0..end, ..]));
                let am = Mat::row_major(std::borrow::Cow::Borrowed(&a), n, end);
                // dV_{:end} += Aᵀ · dO_b
                let at = bi * keys * dv;
                gemm(&am.t(), &og, 1.0, &mut dv_[at..at + end * dv]);
                // dA = dO_b · V_{:end}ᵀ, then dZ through the sticks.
                let da = gemm_new(1.0, &og, &v.t());
                let dz = grad_rows(&z, &a, &da, n, end, block);
                if bias_grad {
                    let base = if bias_batch == 1 { 0 } else { bi * rows * keys };
                    for (r, row) in dz.chunks_exact(end.max(1)).enumerate() {
                        let at = base + (r0 + r) * keys;
                        for (acc, &x) in dbias[at..at + end].iter_mut().zip(row) {
                            *acc += x;
                        }
                    }
                }
                let dzm = Mat::row_major(std::borrow::Cow::Owned(dz), n, end);
                // dQ_b = scale · dZ · K_{:end};  dK_{:end} += scale · dZᵀ · Q_b
                let at = (bi * rows + r0) * dh;
                gemm_scaled(self.scale, &dzm, &k, &mut dq[at..at + n * dh]);
                let at = bi * keys * dh;
                gemm_scaled_add(self.scale, &dzm.t(), &q, &mut dk[at..at + end * dh]);
            }
        }
        [dq, dk, dv_, dbias]
    }
}
