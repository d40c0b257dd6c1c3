//! DAPE V2's forward kernel, [`dape_v2`]: `logits + bias + f(tril([logits ‖ bias]))` with
//! `f = Conv(1 × k, C → D) → LeakyReLU → Conv(1 × k, D → H)` along the key axis, both
//! convolutions in one pass over each row of keys.
//!
//! The row's `C` input channels are copied, with the keys a causal row cannot see zeroed and
//! `k / 2` zeros of padding on both sides (as `Conv2d`'s), into a working row; the first
//! convolution fills the hidden channels (at the keys the second one reads), the second
//! writes `logits + bias + f` for blocks of [`LANES`] keys. Future keys get `logits + bias`
//! only. The reference it must equal is `DapeV2::forward_tensor_path` (`dape/tensor_path.rs`).

use super::rows::{batch_rows, each_row};
use super::simd::{madd, simd_entry, LANES};
use crate::encoding::Span;

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
        [lq, lk],
        bias,
        span,
        init,
        |(x, hidden, block), _, planes, bias, visible| {
            for (bi, heads) in planes.chunks_mut(h).enumerate() {
                let rows = V2Row {
                    bias: batch_rows(bias, h, bi),
                    visible,
                    width,
                };
                v2_row_simd(convs, heads, &rows, x, hidden, block)
            }
        },
    );
    logits
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

/// The shared inputs of one query row of [`dape_v2`].
struct V2Row<'a> {
    bias: &'a [&'a [f32]],
    visible: usize,
    width: usize,
}

/// `out[o][j] += Σ_ch Σ_t w[o, ch, t] · input[ch][j + t]` for `j` in `0..n` (`n ≤ LANES`), the
/// padded `input` rows being `width` long; `out` starts at `bias[o]`. [`CHAINS`] outputs run side
/// by side (each one chain of dependent multiply-adds in `(ch, t)` order, so the bits do not
/// depend on it), sharing each shifted load of the input.
#[inline(always)]
fn key_conv_block<const FMA: bool>(
    out: &mut [[f32; LANES]],
    w: &[f32],
    bias: &[f32],
    input: &[f32],
    dims: [usize; 4],
) {
    let mut o0 = 0;
    while o0 + CHAINS <= out.len() {
        out[o0..o0 + CHAINS]
            .copy_from_slice(&conv_outputs::<FMA, CHAINS>(o0, w, bias, input, dims));
        o0 += CHAINS;
    }
    for o in o0..out.len() {
        out[o] = conv_outputs::<FMA, 1>(o, w, bias, input, dims)[0];
    }
}

/// Outputs `o0 .. o0 + N` of [`key_conv_block`], one accumulator each (in registers: `N` is a
/// constant).
#[inline(always)]
fn conv_outputs<const FMA: bool, const N: usize>(
    o0: usize,
    w: &[f32],
    bias: &[f32],
    input: &[f32],
    [channels, k, width, j0]: [usize; 4],
) -> [[f32; LANES]; N] {
    let taps = channels * k;
    let weights: [&[f32]; N] = std::array::from_fn(|i| &w[(o0 + i) * taps..][..taps]);
    let mut acc: [[f32; LANES]; N] = std::array::from_fn(|i| [bias[o0 + i]; LANES]);
    for ch in 0..channels {
        let row = &input[ch * width..(ch + 1) * width];
        for t in 0..k {
            let src: &[f32; LANES] = row[j0 + t..j0 + t + LANES]
                .try_into()
                .expect("padded rows hold whole blocks");
            for i in 0..N {
                let wv = weights[i][ch * k + t];
                for l in 0..LANES {
                    acc[i][l] = madd::<FMA>(acc[i][l], wv, src[l]);
                }
            }
        }
    }
    acc
}

/// Outputs that [`key_conv_block`] sums side by side: four chains cover the multiply-add's
/// latency (four cycles on current x86 cores) at one per cycle.
const CHAINS: usize = 4;

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
