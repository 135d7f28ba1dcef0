//! Horizontal sums of 512-bit f32 accumulators, many at once, in one fixed order (and of
//! 256-bit ones, one at a time, for the AVX2 kernels).
//!
//! A matmul tile ends with one accumulator register per output element; summing each one's 16
//! lanes separately (`_mm512_reduce_add_ps`) costs about as much as the dot products themselves
//! when rows are short (k = 768). Summing 16 registers together as a transpose-and-add tree
//! needs 45 instructions for 16 results. Every function here adds a register's lanes in the
//! same order — within each 128-bit quarter `(l0 + l2) + (l1 + l3)`, then the quarters
//! `(q0 + q1) + (q2 + q3)` — so a result does not depend on which function, or which tile
//! shape, produced it: the kernels stay batch-invariant.

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use crate::kernels::cpu::row_split::Columns;

    /// `[x.q0, x.q2, y.q0, y.q2]` and `[x.q1, x.q3, y.q1, y.q3]` (128-bit quarters).
    const EVEN_QUARTERS: i32 = 0b10_00_10_00;
    const ODD_QUARTERS: i32 = 0b11_01_11_01;

    /// Pairs: per quarter `[x02, y02, x13, y13]`, where `x02` is `x.l0 + x.l2` of that quarter.
    #[inline(always)]
    unsafe fn pairs(x: __m512, y: __m512) -> __m512 {
        // SAFETY: the caller enabled AVX-512 F.
        unsafe { _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y)) }
    }

    /// Fours from two `pairs` results: per quarter the four registers' quarter sums.
    #[inline(always)]
    unsafe fn fours(x: __m512, y: __m512) -> __m512 {
        // SAFETY: the caller enabled AVX-512 F.
        unsafe {
            let (x, y) = (_mm512_castps_pd(x), _mm512_castps_pd(y));
            _mm512_add_ps(
                _mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)),
            )
        }
    }

    /// Quarter sums by halves: `[x.q0 + x.q1, x.q2 + x.q3, y.q0 + y.q1, y.q2 + y.q3]`.
    #[inline(always)]
    unsafe fn halves(x: __m512, y: __m512) -> __m512 {
        // SAFETY: the caller enabled AVX-512 F.
        unsafe {
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<EVEN_QUARTERS>(x, y),
                _mm512_shuffle_f32x4::<ODD_QUARTERS>(x, y),
            )
        }
    }

    /// Lane `i` of the result is the sum of `acc[i]`'s lanes.
    #[inline(always)]
    pub(crate) unsafe fn sum16(acc: &[__m512; 16]) -> __m512 {
        // SAFETY: the caller enabled AVX-512 F.
        unsafe {
            let p: [__m512; 8] = std::array::from_fn(|i| pairs(acc[2 * i], acc[2 * i + 1]));
            let f: [__m512; 4] = std::array::from_fn(|i| fours(p[2 * i], p[2 * i + 1]));
            // Each first-level `halves` holds, per register, (q0 + q1) and (q2 + q3).
            halves(halves(f[0], f[1]), halves(f[2], f[3]))
        }
    }

    /// Lane `i` of the result is the sum of `acc[i]`'s lanes.
    #[inline(always)]
    pub(crate) unsafe fn sum8(acc: &[__m512; 8]) -> __m256 {
        // SAFETY: the caller enabled AVX-512 F.
        unsafe {
            let p: [__m512; 4] = std::array::from_fn(|i| pairs(acc[2 * i], acc[2 * i + 1]));
            let h = halves(fours(p[0], p[1]), fours(p[2], p[3]));
            _mm512_castps512_ps256(halves(h, h))
        }
    }

    /// The sum of `v`'s lanes, in the same order as [`sum16`] and [`sum8`].
    #[inline(always)]
    pub(crate) unsafe fn sum1(v: __m512) -> f32 {
        let mut l = [0f32; 16];
        // SAFETY: `l` holds 16 floats; the caller enabled AVX-512 F.
        unsafe { _mm512_storeu_ps(l.as_mut_ptr(), v) };
        let q: [f32; 4] = std::array::from_fn(|i| {
            let l = &l[4 * i..];
            (l[0] + l[2]) + (l[1] + l[3])
        });
        (q[0] + q[1]) + (q[2] + q[3])
    }

    /// The sum of a 256-bit register's lanes, in one fixed order:
    /// `((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))` (the AVX2 kernels' tiles).
    #[inline(always)]
    pub(crate) unsafe fn sum_avx2(v: __m256) -> f32 {
        // SAFETY: the caller enabled AVX.
        unsafe {
            let half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
            _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)))
        }
    }

    /// Writes a tile's sums: `acc[r][c]` is output `(c0 + c, r0 + r)`. The 8 × 1 and 4 × 4
    /// tiles are summed together; other shapes one register at a time, in the same order.
    // `r` and `c` index the accumulator grid and the output alike.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    pub(crate) unsafe fn store_tile<const RA: usize, const RB: usize>(
        acc: &[[__m512; RB]; RA],
        out: Columns<'_>,
        r0: usize,
        c0: usize,
    ) {
        // SAFETY: the caller enabled AVX-512 F; `Columns::at` checks every range written.
        unsafe {
            if RA == 8 && RB == 1 {
                let regs: [__m512; 8] = std::array::from_fn(|r| acc[r][0]);
                _mm256_storeu_ps(out.at(c0, r0, 8), sum8(&regs));
            } else if RA == 4 && RB == 4 {
                // Register 4c + r, so that each quarter of the sums is one activation row.
                let regs: [__m512; 16] = std::array::from_fn(|i| acc[i % 4][i / 4]);
                let mut sums = [0f32; 16];
                _mm512_storeu_ps(sums.as_mut_ptr(), sum16(&regs));
                for c in 0..4 {
                    std::ptr::copy_nonoverlapping(sums[4 * c..].as_ptr(), out.at(c0 + c, r0, 4), 4);
                }
            } else {
                for r in 0..RA {
                    for c in 0..RB {
                        out.set(c0 + c, r0 + r, sum1(acc[r][c]));
                    }
                }
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn values(seed: u32) -> [f32; 16] {
            // Magnitudes far apart, so a different addition order changes the bits.
            std::array::from_fn(|i| {
                let v = (((i as u32).wrapping_mul(2654435761) ^ seed.wrapping_mul(40503)) % 1000)
                    as f32;
                (v - 500.0) * [1e-7, 1.0, 3e3, 0.1][i % 4]
            })
        }

        #[test]
        fn every_width_adds_in_the_same_order() {
            if !is_x86_feature_detected!("avx512f") {
                return;
            }
            // SAFETY: AVX-512 F was detected; every pointer reads 16 floats it owns.
            unsafe {
                let regs: [__m512; 16] =
                    std::array::from_fn(|i| _mm512_loadu_ps(values(i as u32).as_ptr()));
                let mut got16 = [0f32; 16];
                _mm512_storeu_ps(got16.as_mut_ptr(), sum16(&regs));
                let mut got8 = [0f32; 8];
                let first8: [__m512; 8] = std::array::from_fn(|i| regs[i]);
                _mm256_storeu_ps(got8.as_mut_ptr(), sum8(&first8));
                for i in 0..16 {
                    let one = sum1(regs[i]);
                    assert_eq!(got16[i].to_bits(), one.to_bits(), "sum16 lane {i}");
                    if i < 8 {
                        assert_eq!(got8[i].to_bits(), one.to_bits(), "sum8 lane {i}");
                    }
                    let exact: f64 = values(i as u32).iter().map(|&v| v as f64).sum();
                    assert!((one as f64 - exact).abs() <= 1e-3 * (1.0 + exact.abs()));
                }
            }
        }
    }
}
