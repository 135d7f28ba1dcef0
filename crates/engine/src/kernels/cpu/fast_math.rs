//! Vectorisable approximations of `exp` and `erf` for the CPU hot loops (attention softmax,
//! GELU). libm's scalar calls cost a few nanoseconds each and keep the loops around them from
//! vectorising; these are branch-free polynomials, written so that the compiler vectorises them
//! for whatever instruction set the caller is compiled for (see `isa::with_isa`).
//! Accuracy: a few ulp for `exp` on the softmax range, < 1e-6 absolute for `erf` (f32 arithmetic
//! on top of the formula's 1.5e-7).

const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split into a part exact in f32 and the rest (Cody–Waite), so `x − n·ln 2` stays exact.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Adding and subtracting 1.5 · 2²³ rounds an f32 of magnitude < 2²² to the nearest integer.
const ROUND: f32 = 12_582_912.0;

/// `e^x`, for finite `x`; inputs below −87 give ≈ 1e-38 instead of a subnormal or zero.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2_E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    // Minimax polynomial for e^r on [−ln2/2, ln2/2] (Cephes expf).
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * (r * r) + r + 1.0;
    // 2^n built from its exponent bits; n ∈ [−126, 127] after the clamp.
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `erf(x)`: Abramowitz & Stegun 7.1.26 (absolute error ≤ 1.5e-7), odd-extended.
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = ((((1.061_405_4 * t - 1.453_152_1) * t + 1.421_413_8) * t - 0.284_496_74) * t
        + 0.254_829_6)
        * t;
    let y = 1.0 - poly * exp(-a * a);
    y.copysign(x)
}

/// Exact-erf GELU, `x · Φ(x) = x/2 · (1 + erf(x/√2))`, as MPT's `nn.GELU()` computes it.
#[inline(always)]
pub(crate) fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulp_on_the_softmax_range() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) < 1e-37 && exp(-1000.0) >= 0.0);
    }

    #[test]
    fn erf_and_gelu_match_the_definitions() {
        let mut worst = 0f64;
        for i in 0..=100_000 {
            let x = -8.0 + 16.0 * i as f32 / 100_000.0;
            let xd = x as f64;
            // std has no erf: the f64 reference below is computed from its series.
            let want_erf = libm_erf(xd);
            worst = worst.max((erf(x) as f64 - want_erf).abs());
            let want_gelu = 0.5 * xd * (1.0 + libm_erf(xd / std::f64::consts::SQRT_2));
            assert!(
                (gelu(x) as f64 - want_gelu).abs() <= 2e-6 * (1.0 + want_gelu.abs()),
                "gelu({x}) = {} vs {want_gelu}",
                gelu(x)
            );
        }
        assert!(worst < 1e-6, "worst absolute erf error {worst}");
        assert!(erf(0.0).abs() < 1e-7);
        assert_eq!(gelu(0.0), 0.0);
        assert!(erf(-0.5) < 0.0 && (erf(-0.5) + erf(0.5)).abs() < 1e-7);
    }

    /// erf in f64 by its Taylor series (|x| ≤ 3) or the continued fraction of erfc (|x| > 3).
    fn libm_erf(x: f64) -> f64 {
        let a = x.abs();
        let v = if a <= 3.0 {
            let (mut term, mut sum, mut n) = (a, a, 0.0);
            while term.abs() > 1e-17 * sum.abs() {
                n += 1.0;
                term *= -a * a / n;
                sum += term / (2.0 * n + 1.0);
            }
            2.0 / std::f64::consts::PI.sqrt() * sum
        } else {
            // erfc(a) = exp(−a²)/√π · 1/(a + 1/2/(a + 1/(a + 3/2/(a + ...))))
            let mut f = a;
            for k in (1..60).rev() {
                f = a + (k as f64 / 2.0) / f;
            }
            1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / f
        };
        v.copysign(x)
    }
}
