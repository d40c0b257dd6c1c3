//! Vectorized arithmetic shared by the kernels: `exp` and the normal CDF `Φ` as plain
//! arithmetic that the compiler vectorizes, the `vectorized!` macro that compiles a loop for
//! AVX-512, AVX2 and the baseline and picks one at run time, and row reductions over sixteen
//! running lanes.

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;

/// `e^x` in f32 by Cephes' `expf` scheme: `x = k ln 2 + r` with `k` rounded to nearest
/// (the 1.5·2²³ trick, not `round`, which is a libm call on baseline x86-64) and `ln 2` in
/// two parts, a degree-5 polynomial for `e^r`, and `2^k` built from its bits. Within a few
/// ulps of the true value; 0 below -88 (`-inf` included) and `inf` from about 88.4 (the true
/// overflow is at 88.72); NaN stays NaN. Plain arithmetic and a select, so that a loop of it
/// vectorizes: glibc's `expf` is one call per element.
#[inline(always)]
pub(in crate::kernel) fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-88.0, 88.0);
    let t = xc * LOG2_E + ROUND;
    let k = t - ROUND;
    let r = xc - k * LN2_HI - k * LN2_LO;
    let p = 1.987_569_1e-4f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // `k` sits in the low bits of `t`'s mantissa: `2^k` from integer arithmetic on the
    // bits (an `as i32` cast saturates lane by lane and does not vectorize).
    let k_bits = t.to_bits().wrapping_sub(ROUND.to_bits());
    let scale = f32::from_bits(k_bits.wrapping_add(127) << 23);
    if x < -88.0 {
        0.0
    } else {
        y * scale
    }
}

/// `Φ(x) = (1 + erf(x / √2)) / 2` in f32, from `erfc(z)` for `z = |x| / √2` by the
/// Chebyshev fit of Numerical Recipes (`erfcc`, fractional error under 1.2e-7 for every
/// `z`): `Φ(x) = erfc(z) / 2` for negative `x` (no cancellation in the tail) and
/// `1 − erfc(z) / 2` otherwise. One `exp` and no branch but a select, so that it runs at the
/// speed of the elementwise pass ([`exp`]); libm's `erff` branches on the input's range. Plain
/// multiply-adds: `mul_add` is a call to `fmaf` unless the build targets FMA.
#[inline(always)]
pub(in crate::kernel) fn phi(x: f32) -> f32 {
    let z = x.abs() * FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + 0.5 * z);
    let p = 0.170_872_77f32;
    let p = p * t + -0.822_152_23;
    let p = p * t + 1.488_515_9;
    let p = p * t + -1.135_204;
    let p = p * t + 0.278_868_07;
    let p = p * t + -0.186_288_06;
    let p = p * t + 0.096_784_18;
    let p = p * t + 0.374_091_96;
    let p = p * t + 1.000_023_7;
    let p = p * t + -1.265_512_2;
    let half_erfc = 0.5 * t * exp(p - z * z);
    if x < 0.0 {
        half_erfc
    } else {
        1.0 - half_erfc
    }
}

/// Defines `fn name(args) -> ret` whose body is compiled three times, for AVX-512, for AVX2
/// and as built (SSE2 on baseline x86-64), and runs the widest that the CPU has (detected at
/// run time). The elementwise loops of the kernels are plain arithmetic that the compiler
/// vectorizes to the width it may use. A function, not a closure, so that the body is
/// always inlined into the wide copies (a closure passed to a `#[target_feature]` function
/// can stay a call of its own, compiled narrow).
macro_rules! vectorized {
    ($(#[$attr:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$attr])*
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn plain($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    plain($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    plain($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F (checked just above), and with it AVX2
                    // and FMA.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has AVX2 and FMA (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            plain($($arg),*)
        }
    };
}
pub(super) use vectorized;

/// The sum of `x` over sixteen running sums (so that it vectorizes: one running sum is a
/// chain of dependent adds).
#[inline(always)]
pub(crate) fn lane_sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The largest of `x` (`-inf` when empty) over sixteen running maxima.
#[inline(always)]
pub(super) fn lane_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    acc.iter().copied().fold(tail, f32::max)
}

/// `Σ (x − mean)²` over sixteen running sums.
#[inline(always)]
pub(super) fn lane_sum_sq_dev(x: &[f32], mean: f32) -> f32 {
    let mut acc = [0.0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail: f32 = chunks
        .remainder()
        .iter()
        .map(|&v| (v - mean) * (v - mean))
        .sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += (v - mean) * (v - mean);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `Σ x ⊙ y` over sixteen running sums.
#[inline(always)]
pub(super) fn lane_dot(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let (cx, cy) = (x.chunks_exact(16), y.chunks_exact(16));
    let tail: f32 = cx
        .remainder()
        .iter()
        .zip(cy.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for (a16, b16) in cx.zip(cy) {
        for ((a, &u), &v) in acc.iter_mut().zip(a16).zip(b16) {
            *a += u * v;
        }
    }
    acc.iter().sum::<f32>() + tail
}
