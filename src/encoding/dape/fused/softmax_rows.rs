//! The attention tile's softmax backward, one query row at a time, inside `f`'s backward rows
//! ([`SoftmaxRow::z_to_grad`]).
//!
//! The tile's backward pass does not form a block's `Z` before `f`'s backward pass: `f`'s
//! backward rows recompute `f`'s hidden values anyway, so each row forms `Z = S + B + f(..)`
//! from them (the second layer only) and turns it into the gradient of `Z` on the spot. This
//! works because `dP = dO Vᵀ` needs no probabilities: the tile forms it for the block first.
//! For one row of plane `p` (batch element, head) with row factor `c` (Scalable-Softmax's; 1
//! without):
//!
//! `P = softmax(c ⊙ Z)` over the visible keys (0 at the others), kept for `dV += Pᵀ dO`;
//! `δ = Σ_j P_j dP_j`; `dZ' = P ⊙ (dP − δ)`; `dc = Σ_j Z_j dZ'_j`; `dZ = c ⊙ dZ'` (0 at the keys
//! the row cannot see).
//!
//! `δ` equals FlashAttention's `rowsum(dO ⊙ O)`, but formed from this `P` it keeps `Σ_j dZ'_j`
//! at zero to rounding even though this `P` and the forward pass's differ in their last bits
//! (`Z` is summed in another order here): gradients that sum `dZ` along a row (a bias's, FoX's
//! gate's) cancel, and would otherwise keep that difference.

use crate::kernel::softmax_row_simd;

/// What every row of a block reads, row-major over the block's `planes = batch · H` planes and
/// `rb` rows: `dP = dO Vᵀ` `[planes, rb, keys]` and the row factors `[H, rb]` (shared by the
/// batch) or `None`.
pub(crate) struct SoftmaxInputs<'a> {
    pub dp: &'a [f32],
    pub factor: Option<&'a [f32]>,
    /// `[heads, rb, keys]`.
    pub dims: [usize; 3],
}

/// One query row's share of a block's softmax backward: the shared inputs and the row's own
/// outputs, its probabilities (one `[keys]` row per plane, written) and its `Σ_j Z_j dZ'_j` per
/// plane (written when the layer has row factors).
pub(crate) struct SoftmaxRow<'a> {
    pub(super) inputs: &'a SoftmaxInputs<'a>,
    /// The row's index in the block.
    pub(super) row: usize,
    pub(super) probs: Vec<&'a mut [f32]>,
    pub(super) dc: Vec<&'a mut [f32]>,
}

impl SoftmaxRow<'_> {
    /// Turns `z` (one `[keys]` row per plane, `Z` at keys `0..visible`) into the gradient of
    /// `Z` in place (0 at keys `visible..`), keeping the probabilities and the row factors'
    /// gradient sums.
    pub(crate) fn z_to_grad(&mut self, z: &mut [&mut [f32]], visible: usize) {
        let SoftmaxInputs {
            dp,
            factor,
            dims: [h, rb, keys],
        } = *self.inputs;
        for (plane, (zr, pr)) in z.iter_mut().zip(self.probs.iter_mut()).enumerate() {
            let at = plane * rb + self.row;
            let c = factor.map_or(1.0, |f| f[(plane % h) * rb + self.row]);
            pr[..visible].copy_from_slice(&zr[..visible]);
            if factor.is_some() {
                pr[..visible].iter_mut().for_each(|x| *x *= c);
            }
            softmax_row_simd(pr, visible);
            let dp = &dp[at * keys..][..keys];
            let d: f32 = pr[..visible].iter().zip(dp).map(|(p, g)| p * g).sum();
            let mut dc = 0.0f32;
            for ((g, &p), &dpv) in zr[..visible].iter_mut().zip(&pr[..]).zip(dp) {
                let dz = p * (dpv - d);
                dc += *g * dz;
                *g = c * dz;
            }
            zr[visible..].fill(0.0);
            if let Some(out) = self.dc.get_mut(plane) {
                out[0] = dc;
            }
        }
    }
}
