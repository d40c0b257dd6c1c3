//! What the fused kernels' inner loops share: blocks of [`LANES`] keys, a multiply-add that is
//! fused exactly when the target has FMA, and `simd_entry!`, which compiles a kernel three times
//! (for AVX-512, for AVX2 + FMA, each picked at run time when the CPU has it, and for the
//! baseline target).

/// Keys per block: one AVX-512 register of `f32`, or two AVX registers.
pub(super) const LANES: usize = 16;

/// Defines `$name(args)`, which runs `$kernel::<true>` compiled for AVX-512 (a block of keys in
/// one register) or for AVX2 + FMA when the CPU has them, and `$kernel::<false>` (baseline
/// target, no fused multiply-add) otherwise. Both vector forms make the same fused
/// multiply-adds lane by lane, so they give the same bits. The
/// kernel is `#[inline(always)]`, so it is compiled into the `#[target_feature]` function itself;
/// calling it through a closure would not be.
macro_rules! simd_entry {
    ($(#[$doc:meta])* $vis:vis fn $name:ident = $kernel:ident($($arg:ident: $ty:ty),* $(,)?)) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                fn wide($($arg: $ty),*) {
                    $kernel::<true>($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F (checked just above), and with it AVX2
                    // and FMA.
                    unsafe { wide($($arg),*) };
                    return;
                }
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
pub(super) use simd_entry;

/// `acc + w · x`, fused when the target has FMA (a separate multiply and add otherwise, since
/// `mul_add` without hardware FMA is a slow library call).
#[inline(always)]
pub(super) fn madd<const FMA: bool>(acc: f32, w: f32, x: f32) -> f32 {
    if FMA {
        w.mul_add(x, acc)
    } else {
        acc + w * x
    }
}
