//! PaTH's logits, blockwise: products of Householder-like transforms between each query and
//! key, never formed per pair.
//!
//! With `H_t = I − β_t w_t w_tᵀ` (`w_t` unit, `β_t ∈ (0, 2)`), the causal logit of query `i` and
//! key `j ≤ i` is `A_ij = q_iᵀ H_i H_{i−1} ⋯ H_{j+1} k_j` (no transform on the diagonal). The
//! tokens are cut into blocks of `C` (the last padded with `β = 0`, where `H = I`); inside a
//! block, the product of its transforms has the compact WY form of the UT transform
//! (Joffrain et al., 2006), as in fla's PaTH kernels:
//!
//! ```text
//! Wβ = diag(β) W                 [C, d]   the block's directions, scaled
//! T  = (I + tril₋₁(Wβ Wᵀ))⁻¹     [C, C]   tril₋₁: strictly below the diagonal
//! U  = T Wβ                      [C, d]
//! S  = T tril₋₁(Wβ Kᵀ)           [C, C]
//! Â  = Q Kᵀ − tril₀(Q Wᵀ) S      [C, C]   the block's own logits (valid on and below the diagonal)
//! Q̂  = Q − tril₀(Q Wᵀ) U         [C, d]   row i: q_iᵀ H_i ⋯ H_first      (to the block's start)
//! K̂  = K − Sᵀ W                  [C, d]   row j: H_last ⋯ H_{j+1} k_j    (to the block's end)
//! M  = I − Wᵀ U                  [d, d]   the whole block: qᵀ H_last ⋯ H_first = qᵀ M
//! ```
//!
//! A query block `I` then meets key block `J < I` as `Q̂_I M_{I−1} ⋯ M_{J+1} K̂_Jᵀ`. One sweep
//! forward computes them all ([`Blocks::block_rows`]): it holds the keys of the blocks before
//! `I` carried to `I`'s start (`K̂_J M_{J+1}ᵀ ⋯ M_{I−1}ᵀ`), takes `Q̂_I` against them, then carries
//! them through `M_I` and appends `K̂_I`. The cost is `O(L² d + L² d² / C)` in `2n` products
//! over all the keys so far, and the memory `O(L d)` beside one block's logits. Keys from
//! before the segment (a KV cache) are held already transformed to the segment's start and
//! start the sweep; at its end the carried keys are every key brought to the segment's end
//! (`k ← H_t k` for each new token `t`, [`Blocks::carry_keys`]), which is what decoding needs.
//!
//! `T` is the inverse of a unit lower-triangular matrix, [`unit_lower_inverse`]: forward
//! substitution in one graph node on ndarray, block doubling in `log₂ C` batched steps of
//! Burn's ops elsewhere.

use burn::prelude::*;

use crate::kernel::{batched_matmul, unit_lower_inverse};

/// The default number of tokens per block (fla's kernels use 64 too).
pub const DEFAULT_BLOCK: usize = 64;

/// One segment of tokens, cut into blocks and reduced to what the sweep needs: one tensor
/// `[g, 1, ·, ·]` per block (`g = batch·heads`; `n` blocks of `C` tokens, the last padded),
/// split once so that the sweep's `O(n²)` products read them without slicing again (each slice
/// would cost its backward pass a zero-filled copy of the whole).
#[derive(Clone, Debug)]
pub struct Blocks<B: Backend> {
    block: usize,
    len: usize,
    /// `Q̂` of each block `[g, 1, C, d]`.
    q_hat: Vec<Tensor<B, 4>>,
    /// `K̂` of each block `[g, 1, C, d]`.
    k_hat: Vec<Tensor<B, 4>>,
    /// `Â` of each block `[g, 1, C, C]`.
    local: Vec<Tensor<B, 4>>,
    /// `M` of each block `[g, 1, d, d]`.
    through: Vec<Tensor<B, 4>>,
}

/// The `n` blocks of `t: [g, n, ·, ·]`, each `[g, 1, ·, ·]`.
fn per_block<B: Backend>(t: Tensor<B, 4>) -> Vec<Tensor<B, 4>> {
    let n = t.dims()[1];
    if n == 1 {
        vec![t]
    } else {
        t.chunk(n, 1)
    }
}

/// `[rows, cols]` of ones where `col <= row − shift` (`shift = 0`: on and below the diagonal;
/// 1: strictly below), as a float mask.
fn lower_mask<B: Backend>(size: usize, shift: i64, device: &B::Device) -> Tensor<B, 2> {
    let rows = Tensor::<B, 1, Int>::arange(0..size as i64, device).reshape([size, 1]);
    let cols = Tensor::<B, 1, Int>::arange(0..size as i64, device).reshape([1, size]);
    (cols + shift)
        .expand([size, size])
        .lower_equal(rows.expand([size, size]))
        .float()
}

/// `[g, n, C, C]` mask broadcast from `[C, C]`.
fn mask4<B: Backend>(mask: &Tensor<B, 2>) -> Tensor<B, 4> {
    mask.clone().unsqueeze::<4>()
}

impl<B: Backend> Blocks<B> {
    /// The blocks of one segment: queries and keys `q, k: [g, l, d]`, unit directions
    /// `w: [g, l, d]` and strengths `beta: [g, l]`, in blocks of `block` tokens (rounded up to a
    /// power of two, and down to the segment's length).
    pub fn new(
        q: Tensor<B, 3>,
        k: Tensor<B, 3>,
        w: Tensor<B, 3>,
        beta: Tensor<B, 2>,
        block: usize,
    ) -> Self {
        let [g, len, d] = q.dims();
        let device = q.device();
        let block = block.max(1).min(len.max(1)).next_power_of_two();
        let n = len.div_ceil(block);
        let padded = n * block;
        let pad3 = |t: Tensor<B, 3>| -> Tensor<B, 4> {
            let t = if padded > len {
                Tensor::cat(vec![t, Tensor::zeros([g, padded - len, d], &device)], 1)
            } else {
                t
            };
            t.reshape([g, n, block, d])
        };
        let beta = if padded > len {
            Tensor::cat(vec![beta, Tensor::zeros([g, padded - len], &device)], 1)
        } else {
            beta
        };
        let (q, k, w) = (pad3(q), pad3(k), pad3(w));
        let w_beta = w.clone() * beta.reshape([g, n, block, 1]);
        let strict = mask4(&lower_mask::<B>(block, 1, &device));
        let on_and_below = mask4(&lower_mask::<B>(block, 0, &device));
        let w_t = w.clone().swap_dims(2, 3);
        let k_t = k.clone().swap_dims(2, 3);
        let t = unit_lower_inverse(batched_matmul(w_beta.clone(), w_t.clone()) * strict.clone());
        let u = batched_matmul(t.clone(), w_beta.clone());
        let s = batched_matmul(t, batched_matmul(w_beta, k_t.clone()) * strict);
        let qw = batched_matmul(q.clone(), w_t.clone()) * on_and_below;
        let local = batched_matmul(q.clone(), k_t) - batched_matmul(qw.clone(), s.clone());
        let q_hat = q - batched_matmul(qw, u.clone());
        // `k` stays alive across this subtraction on purpose: LibTorch under burn 0.21 gives a
        // transposed view (`k_t` above, which the products keep for their gradients) its own
        // ownership count, so a `k` consumed here would be overwritten in place, and with it
        // the saved `k_t` (the gradients, not the values, would come out wrong; fixed upstream
        // in burn-tch after 0.21, tracel-ai/burn#5376).
        let k_hat = k.clone() - batched_matmul(s.swap_dims(2, 3), w);
        drop(k);
        let eye = Tensor::<B, 2>::eye(d, &device).unsqueeze::<4>();
        let through = eye - batched_matmul(w_t, u);
        Self {
            block,
            len,
            q_hat: per_block(q_hat),
            k_hat: per_block(k_hat),
            local: per_block(local),
            through: per_block(through),
        }
    }

    /// Number of tokens in the segment.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the segment is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens per block `C` (the requested size rounded to a power of two, at most the
    /// segment's length rounded up).
    pub fn block_size(&self) -> usize {
        self.block
    }

    /// Number of blocks `n`.
    pub fn count(&self) -> usize {
        self.q_hat.len()
    }

    /// The keys up to the end of query block `i`: `before` (the keys before the block, carried
    /// to its start, `[g, 1, P + i·C, d]`; `None`: none) and the block's own `K̂_i` after them.
    fn keys_through(&self, i: usize, before: Option<Tensor<B, 4>>) -> Tensor<B, 4> {
        let own = self.k_hat[i].clone();
        match before {
            Some(k) => Tensor::cat(vec![k, own], 2),
            None => own,
        }
    }

    /// The keys before query block `i + 1`, carried to its start, from `through`, the keys up to
    /// the end of block `i` ([`Self::keys_through`]): every key before block `i` goes through
    /// block `i`'s transforms (`k ← M_i k`); the block's own `K̂_i` are already there.
    fn carry_past(&self, i: usize, through: Tensor<B, 4>) -> Tensor<B, 4> {
        let [g, _, total, d] = through.dims();
        let c = self.block;
        if total == c {
            return through;
        }
        // All of them through `M_i` in one product, then the block's own keys put back in
        // place (cheaper than a copy of the rest to append them).
        batched_matmul(through, self.through[i].clone().swap_dims(2, 3))
            .slice_assign([0..g, 0..1, total - c..total, 0..d], self.k_hat[i].clone())
    }

    /// The logits of query block `i` `[g, 1, C, P + (i+1)·C]` over `through`, the keys up to the
    /// block's end ([`Self::keys_through`]): `Q̂_i` against all of them in one product, whose
    /// last `C` columns (`Q̂_i K̂_iᵀ`, the transforms of the whole block) are then replaced by
    /// the block's own logits `Â_i`, in place. Entries above the diagonal are not causal logits
    /// (mask them).
    fn block_row(&self, i: usize, through: &Tensor<B, 4>) -> Tensor<B, 4> {
        let c = self.block;
        let [g, _, total, _] = through.dims();
        if total == c {
            return self.local[i].clone();
        }
        batched_matmul(self.q_hat[i].clone(), through.clone().swap_dims(2, 3))
            .slice_assign([0..g, 0..1, 0..c, total - c..total], self.local[i].clone())
    }

    /// The causal logits of every query block in order, each `[g, rows, P + end]`, over the
    /// cached keys `cached: [g, P, d]` (transformed to the segment's start; `None`: none) and the
    /// segment's keys up to the block's last token: `rows` real tokens (fewer than `C` in a
    /// padded last block), `end = i·C + rows`. Entries of keys after a row are not logits: the
    /// causal mask removes them.
    ///
    /// One sweep forward: block `i`'s logits are `Q̂_i` against the keys carried to its start
    /// (its own block's entries replaced by `Â_i`), and those keys then go through `M_i` to the
    /// next block's start. Two products per block, each over all the keys so far, where carrying
    /// `Q̂_i` back to every earlier block would take two small products per block pair; no
    /// row is assembled by concatenation (a copy of the whole row per block, strided on
    /// ndarray).
    pub fn block_rows<'a>(
        &'a self,
        cached: Option<&Tensor<B, 3>>,
    ) -> impl Iterator<Item = Tensor<B, 3>> + 'a {
        let c = self.block;
        let mut before = cached.map(|k| k.clone().unsqueeze_dim::<4>(1));
        let past = before.as_ref().map_or(0, |k| k.dims()[2]);
        (0..self.count()).map(move |i| {
            let through = self.keys_through(i, before.take());
            let row = self.block_row(i, &through);
            if i + 1 < self.count() {
                before = Some(self.carry_past(i, through));
            }
            let rows = c.min(self.len - i * c);
            let [g, _, _, width] = row.dims();
            let row = row.reshape([g, c, width]);
            let wanted = past + i * c + rows;
            if rows == c && wanted == width {
                row
            } else {
                row.narrow(1, 0, rows).narrow(2, 0, wanted)
            }
        })
    }

    /// The causal logits `[g, rows, P + rows.end]` of the segment's query rows `rows` over the
    /// cached keys `cached: [g, P, d]` (transformed to the segment's start; `None`: none) and
    /// the segment's keys up to the last row. Entries of keys after a row are not logits: the
    /// causal mask removes them.
    pub fn logits(
        &self,
        rows: std::ops::Range<usize>,
        cached: Option<&Tensor<B, 3>>,
    ) -> Tensor<B, 3> {
        let c = self.block;
        let (first, last) = (rows.start / c, rows.end.div_ceil(c));
        let past = cached.map_or(0, |k| k.dims()[1]);
        let width = past + rows.end;
        let device = self.q_hat[0].device();
        let row_blocks: Vec<Tensor<B, 3>> = self
            .block_rows(cached)
            .take(last)
            .skip(first)
            .map(|row| {
                let [g, n, have] = row.dims();
                if have < width {
                    Tensor::cat(vec![row, Tensor::zeros([g, n, width - have], &device)], 2)
                } else {
                    row.narrow(2, 0, width)
                }
            })
            .collect();
        let all = Tensor::cat(row_blocks, 1);
        all.narrow(1, rows.start - first * c, rows.len())
    }

    /// Every key `[g, P + l, d]` transformed to the segment's end (`H_t` applied for each of its
    /// tokens after the key's own): the cached keys `cached: [g, P, d]` (at the segment's start)
    /// first, then the segment's. What a KV cache holds after the segment.
    pub fn carry_keys(&self, cached: Option<Tensor<B, 3>>) -> Tensor<B, 3> {
        let [g, _, c, d] = self.k_hat[0].dims();
        let n = self.count();
        let keys = (0..n).fold(cached.map(|k| k.unsqueeze_dim::<4>(1)), |before, j| {
            Some(self.carry_past(j, self.keys_through(j, before)))
        });
        let keys = keys.expect("a segment has at least one block");
        let total = keys.dims()[2];
        keys.reshape([g, total, d])
            .narrow(1, 0, total - (n * c - self.len))
    }
}

/// Bidirectional PaTH logits `[g, l, l]` of one whole sequence: on and below the diagonal the
/// causal logits; above it, key `j > i` meets query `i` through the transforms of the tokens
/// after the query up to the key, `q_iᵀ H_{i+1} ⋯ H_j k_j` (the mirror image: the transforms of
/// the tokens in `(min(i, j), max(i, j)]`, the query's side first). That is the causal logit
/// with queries and keys exchanged, transposed.
pub fn bidirectional_logits<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    w: Tensor<B, 3>,
    beta: Tensor<B, 2>,
    block: usize,
) -> Tensor<B, 3> {
    let len = q.dims()[1];
    let device = q.device();
    let lower =
        Blocks::new(q.clone(), k.clone(), w.clone(), beta.clone(), block).logits(0..len, None);
    let upper = Blocks::new(k, q, w, beta, block)
        .logits(0..len, None)
        .swap_dims(1, 2);
    let below: Tensor<B, 3> = lower_mask::<B>(len, 0, &device).unsqueeze();
    lower * below.clone() + upper * (below.neg() + 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    type B = NdArray<f32>;

    /// Deterministic values in [-1, 1), from the crate's [`crate::util::Rng`].
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::util::Rng::new(seed);
        (0..n)
            .map(|_| ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
            .collect()
    }

    struct Case {
        g: usize,
        l: usize,
        d: usize,
        q: Vec<f32>,
        k: Vec<f32>,
        w: Vec<f32>,
        beta: Vec<f32>,
    }

    fn case(g: usize, l: usize, d: usize, seed: u64) -> Case {
        let mut w = values(g * l * d, seed + 2);
        for row in w.chunks_mut(d) {
            let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            row.iter_mut().for_each(|x| *x /= norm);
        }
        Case {
            g,
            l,
            d,
            q: values(g * l * d, seed),
            k: values(g * l * d, seed + 1),
            w,
            beta: values(g * l, seed + 3)
                .iter()
                .map(|b| 1.0 + b * 0.95)
                .collect(),
        }
    }

    fn t3(v: &[f32], shape: [usize; 3]) -> Tensor<B, 3> {
        Tensor::<B, 1>::from_floats(v, &Default::default()).reshape(shape)
    }

    impl Case {
        fn tensors(&self) -> [Tensor<B, 3>; 3] {
            let s = [self.g, self.l, self.d];
            [t3(&self.q, s), t3(&self.k, s), t3(&self.w, s)]
        }
        fn beta(&self) -> Tensor<B, 2> {
            Tensor::<B, 1>::from_floats(self.beta.as_slice(), &Default::default())
                .reshape([self.g, self.l])
        }
        /// `H_t v` for token `t` of group `g`.
        fn apply(&self, g: usize, t: usize, v: &mut [f32]) {
            let d = self.d;
            let w = &self.w[(g * self.l + t) * d..][..d];
            let dot: f32 = w.iter().zip(v.iter()).map(|(a, b)| a * b).sum();
            let b = self.beta[g * self.l + t];
            v.iter_mut().zip(w).for_each(|(x, wi)| *x -= b * dot * wi);
        }
        /// The logit of query `i` and key `j` by explicit products over the tokens in
        /// `(min, max]`, applied to the key from its side outward.
        fn naive(&self, g: usize, i: usize, j: usize) -> f32 {
            let d = self.d;
            let mut v = self.k[(g * self.l + j) * d..][..d].to_vec();
            if j <= i {
                (j + 1..=i).for_each(|t| self.apply(g, t, &mut v));
            } else {
                (i + 1..=j).rev().for_each(|t| self.apply(g, t, &mut v));
            }
            let q = &self.q[(g * self.l + i) * d..][..d];
            q.iter().zip(&v).map(|(a, b)| a * b).sum()
        }
    }

    fn close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                "{what}[{i}]: {x} vs {y}"
            );
        }
    }

    #[test]
    fn causal_logits_equal_explicit_products() {
        for (l, block) in [(1, 4), (5, 4), (8, 4), (13, 4), (13, 64), (9, 1)] {
            let c = case(3, l, 5, l as u64);
            let [q, k, w] = c.tensors();
            let got = Blocks::new(q, k, w, c.beta(), block).logits(0..l, None);
            let got: Vec<f32> = got.into_data().to_vec().unwrap();
            for g in 0..c.g {
                for i in 0..l {
                    for j in 0..=i {
                        let x = got[(g * l + i) * l + j];
                        let y = c.naive(g, i, j);
                        assert!(
                            (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                            "l {l} block {block}: ({g},{i},{j}) {x} vs {y}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn bidirectional_logits_equal_explicit_products() {
        let c = case(2, 11, 4, 7);
        let [q, k, w] = c.tensors();
        let got: Vec<f32> = bidirectional_logits(q, k, w, c.beta(), 4)
            .into_data()
            .to_vec()
            .unwrap();
        let want: Vec<f32> = (0..c.g)
            .flat_map(|g| (0..c.l).flat_map(move |i| (0..c.l).map(move |j| (g, i, j))))
            .map(|(g, i, j)| c.naive(g, i, j))
            .collect();
        close(&got, &want, "bidirectional");
    }

    /// A segment after a cache (keys carried to the cache's end) gives the rows of the whole
    /// sequence, and row ranges give the rows of the full range.
    #[test]
    fn cached_segments_and_row_ranges_equal_the_whole() {
        let (l, split, block) = (14, 5, 4);
        let c = case(2, l, 3, 11);
        let [q, k, w] = c.tensors();
        let beta = c.beta();
        let whole: Vec<f32> = Blocks::new(q.clone(), k.clone(), w.clone(), beta.clone(), block)
            .logits(0..l, None)
            .into_data()
            .to_vec()
            .unwrap();
        let head = |t: &Tensor<B, 3>, a: usize, n: usize| t.clone().narrow(1, a, n);
        let first = Blocks::new(
            head(&q, 0, split),
            head(&k, 0, split),
            head(&w, 0, split),
            beta.clone().narrow(1, 0, split),
            block,
        );
        let cached = first.carry_keys(None);
        let rest = l - split;
        let second = Blocks::new(
            head(&q, split, rest),
            head(&k, split, rest),
            head(&w, split, rest),
            beta.narrow(1, split, rest),
            block,
        );
        for rows in [0..rest, 2..7, 6..9] {
            let got: Vec<f32> = second
                .logits(rows.clone(), Some(&cached))
                .into_data()
                .to_vec()
                .unwrap();
            let keys = split + rows.end;
            let mut want = Vec::new();
            for g in 0..2 {
                for r in rows.clone() {
                    let i = split + r;
                    want.extend(&whole[(g * l + i) * l..][..keys]);
                }
            }
            // Only on and below the diagonal are logits.
            let mask = |idx: usize| {
                let j = idx % keys;
                let r = rows.start + (idx / keys) % rows.len();
                j <= split + r
            };
            let causal = |v: &[f32]| -> Vec<f32> {
                v.iter()
                    .enumerate()
                    .filter(|(i, _)| mask(*i))
                    .map(|(_, x)| *x)
                    .collect()
            };
            close(&causal(&got), &causal(&want), &format!("rows {rows:?}"));
        }
        // Carrying the keys of both segments equals carrying the whole sequence's.
        let all = Blocks::new(q, k, w, c.beta(), block).carry_keys(None);
        let both = second.carry_keys(Some(cached));
        close(
            &both.into_data().to_vec::<f32>().unwrap(),
            &all.into_data().to_vec::<f32>().unwrap(),
            "carried keys",
        );
    }
}
