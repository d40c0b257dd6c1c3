//! The vectorized `exp` and `Φ` against the standard library.

use crate::kernel::ndarray::{exp, phi};

/// The kernels' `exp` against f64's: a few ulps across the range where f32 is normal, 1 at
/// 0, 0 for `-inf` and below -88, NaN for NaN.
#[test]
fn exp_is_within_a_few_ulps() {
    for i in -8700..=8800 {
        let x = i as f32 / 100.0;
        let want = f64::from(x).exp();
        let got = f64::from(exp(x));
        let error = (got - want).abs() / want;
        assert!(
            error < 4.0 * f64::from(f32::EPSILON),
            "exp({x}) = {got}, not {want}"
        );
    }
    assert_eq!(exp(0.0), 1.0);
    assert_eq!(exp(f32::NEG_INFINITY), 0.0);
    assert_eq!(exp(-1000.0), 0.0);
    assert!(exp(f32::NAN).is_nan());
}

/// The normal CDF of the GELU kernel against libm's f64 `erfc`: relative error within a
/// few f32 roundings of the exponent from -9 (Φ ≈ 1e-19) to 8, the far negative tail
/// included (where `1 + erf` would cancel), and under 2e-6 from -4.
#[test]
fn phi_is_the_normal_cdf() {
    let mut worst = 0.0f64;
    for i in -900..=800 {
        let x = i as f32 / 100.0;
        let want = 0.5 * libm::erfc(-f64::from(x) / std::f64::consts::SQRT_2);
        let got = f64::from(phi(x));
        let error = (got - want).abs() / want;
        assert!(
            x < -4.0 || error < 2e-6,
            "x = {x}: relative error {error:e}"
        );
        worst = worst.max(error);
    }
    assert!(worst < 1e-5, "relative error {worst:e}");
}
