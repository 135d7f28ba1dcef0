//! SIMD vectors of f32 lanes for the attention tile kernel (`attention_tile.rs`): AVX-512 (16
//! lanes), AVX2 + FMA (8 lanes) and a portable array the compiler may vectorise. Besides
//! arithmetic they load 16-bit KV elements and widen them in registers: f16 with the F16C /
//! AVX-512 conversion instructions, bf16 by a 16-bit shift (bf16 is the top half of an f32).
//!
//! Invariant: a SIMD implementation runs only on a CPU with its instruction set (see
//! `attention_tile`'s dispatch, which follows `isa::Isa` and checks F16C for the AVX2 f16 path).
//! Element-wise operations give the same bits on every implementation; only the lane count and
//! so the order of `reduce_add` differ between them.

/// `ln 2` split for Cody–Waite range reduction, and the rounding constant, as in `fast_math`.
const LOG2_E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const ROUND: f32 = 12_582_912.0;

/// A register of `WIDTH` f32 lanes. Methods are `unsafe`: they may run only on a CPU with the
/// implementation's instruction set, and loads and stores need `WIDTH` valid elements.
pub(crate) trait Vector: Copy {
    /// Lanes per register.
    const WIDTH: usize;
    /// Key vectors per attention tile (one softmax update): 2 where registers allow it (the
    /// per-tile max, rescale and exps then cost half as much per key), else 1. At most 2.
    const KEY_VECTORS: usize = 1;
    unsafe fn splat(x: f32) -> Self;
    unsafe fn load(p: *const f32) -> Self;
    /// Loads `WIDTH` IEEE halves and widens them.
    unsafe fn load_f16(p: *const u16) -> Self;
    /// Loads `WIDTH` bfloat16 values and widens them.
    unsafe fn load_bf16(p: *const u16) -> Self;
    unsafe fn store(self, p: *mut f32);
    unsafe fn add(a: Self, b: Self) -> Self;
    unsafe fn sub(a: Self, b: Self) -> Self;
    unsafe fn mul(a: Self, b: Self) -> Self;
    /// `a * b + c`, rounded once.
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self;
    unsafe fn max(a: Self, b: Self) -> Self;
    unsafe fn min(a: Self, b: Self) -> Self;
    /// The largest lane (exact: independent of the order).
    unsafe fn reduce_max(self) -> f32;
    /// The sum of the lanes, in the implementation's fixed order.
    unsafe fn reduce_add(self) -> f32;
    /// Lanes `0, 1, 2, …`.
    unsafe fn iota() -> Self;
    /// Per lane: `a` where `x <= limit`, else `b`.
    unsafe fn select_le(x: Self, limit: Self, a: Self, b: Self) -> Self;
    /// `2^n` for lanes holding integers in `[-126, 127]`.
    unsafe fn pow2i(n: Self) -> Self;

    /// `e^x` per lane, the formula of `fast_math::exp` (same bits lane by lane).
    #[inline(always)]
    unsafe fn exp(x: Self) -> Self {
        // SAFETY: forwarded from the caller.
        unsafe {
            let s = |c: f32| Self::splat(c);
            let x = Self::min(Self::max(x, s(-87.0)), s(88.0));
            let n = Self::sub(Self::add(Self::mul(x, s(LOG2_E)), s(ROUND)), s(ROUND));
            let r = Self::sub(
                Self::sub(x, Self::mul(n, s(LN2_HI))),
                Self::mul(n, s(LN2_LO)),
            );
            let mut p = s(1.987_569_1e-4);
            for c in [
                1.398_199_9e-3,
                8.333_452e-3,
                4.166_579_6e-2,
                1.666_666_5e-1,
                0.5,
            ] {
                p = Self::add(Self::mul(p, r), s(c));
            }
            let y = Self::add(Self::add(Self::mul(p, Self::mul(r, r)), r), s(1.0));
            Self::mul(y, Self::pow2i(n))
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::Vector;
    use std::arch::x86_64::*;

    /// 16 lanes of AVX-512.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx512(__m512);

    impl Vector for Avx512 {
        const WIDTH: usize = 16;
        const KEY_VECTORS: usize = 2;
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn splat(x: f32) -> Self {
            Self(_mm512_set1_ps(x))
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: the caller passes 16 readable floats.
            Self(unsafe { _mm512_loadu_ps(p) })
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load_f16(p: *const u16) -> Self {
            // SAFETY: the caller passes 16 readable halves.
            Self(_mm512_cvtph_ps(unsafe { _mm256_loadu_si256(p.cast()) }))
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load_bf16(p: *const u16) -> Self {
            // SAFETY: the caller passes 16 readable bfloat16 values.
            let raw = unsafe { _mm256_loadu_si256(p.cast()) };
            Self(_mm512_castsi512_ps(_mm512_slli_epi32::<16>(
                _mm512_cvtepu16_epi32(raw),
            )))
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn store(self, p: *mut f32) {
            // SAFETY: the caller passes room for 16 floats.
            unsafe { _mm512_storeu_ps(p, self.0) }
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn add(a: Self, b: Self) -> Self {
            Self(_mm512_add_ps(a.0, b.0))
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn sub(a: Self, b: Self) -> Self {
            Self(_mm512_sub_ps(a.0, b.0))
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn mul(a: Self, b: Self) -> Self {
            Self(_mm512_mul_ps(a.0, b.0))
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self {
            Self(_mm512_fmadd_ps(a.0, b.0, c.0))
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn max(a: Self, b: Self) -> Self {
            Self(_mm512_max_ps(a.0, b.0))
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn min(a: Self, b: Self) -> Self {
            Self(_mm512_min_ps(a.0, b.0))
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn reduce_max(self) -> f32 {
            _mm512_reduce_max_ps(self.0)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn reduce_add(self) -> f32 {
            _mm512_reduce_add_ps(self.0)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn iota() -> Self {
            Self(_mm512_setr_ps(
                0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0,
                15.0,
            ))
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn select_le(x: Self, limit: Self, a: Self, b: Self) -> Self {
            let keep = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(x.0, limit.0);
            Self(_mm512_mask_blend_ps(keep, b.0, a.0))
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn pow2i(n: Self) -> Self {
            let e = _mm512_add_epi32(_mm512_cvtps_epi32(n.0), _mm512_set1_epi32(127));
            Self(_mm512_castsi512_ps(_mm512_slli_epi32::<23>(e)))
        }
    }

    /// 8 lanes of AVX2 with FMA (and F16C for `load_f16`).
    #[derive(Clone, Copy)]
    pub(crate) struct Avx2(__m256);

    impl Vector for Avx2 {
        const WIDTH: usize = 8;
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn splat(x: f32) -> Self {
            Self(_mm256_set1_ps(x))
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: the caller passes 8 readable floats.
            Self(unsafe { _mm256_loadu_ps(p) })
        }
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn load_f16(p: *const u16) -> Self {
            // SAFETY: the caller passes 8 readable halves (and checked F16C).
            Self(_mm256_cvtph_ps(unsafe { _mm_loadu_si128(p.cast()) }))
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn load_bf16(p: *const u16) -> Self {
            // SAFETY: the caller passes 8 readable bfloat16 values.
            let raw = unsafe { _mm_loadu_si128(p.cast()) };
            Self(_mm256_castsi256_ps(_mm256_slli_epi32::<16>(
                _mm256_cvtepu16_epi32(raw),
            )))
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn store(self, p: *mut f32) {
            // SAFETY: the caller passes room for 8 floats.
            unsafe { _mm256_storeu_ps(p, self.0) }
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn add(a: Self, b: Self) -> Self {
            Self(_mm256_add_ps(a.0, b.0))
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn sub(a: Self, b: Self) -> Self {
            Self(_mm256_sub_ps(a.0, b.0))
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn mul(a: Self, b: Self) -> Self {
            Self(_mm256_mul_ps(a.0, b.0))
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self {
            Self(_mm256_fmadd_ps(a.0, b.0, c.0))
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn max(a: Self, b: Self) -> Self {
            Self(_mm256_max_ps(a.0, b.0))
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn min(a: Self, b: Self) -> Self {
            Self(_mm256_min_ps(a.0, b.0))
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn reduce_max(self) -> f32 {
            let half = _mm_max_ps(
                _mm256_castps256_ps128(self.0),
                _mm256_extractf128_ps(self.0, 1),
            );
            let pair = _mm_max_ps(half, _mm_movehl_ps(half, half));
            _mm_cvtss_f32(_mm_max_ss(pair, _mm_shuffle_ps(pair, pair, 1)))
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn reduce_add(self) -> f32 {
            let half = _mm_add_ps(
                _mm256_castps256_ps128(self.0),
                _mm256_extractf128_ps(self.0, 1),
            );
            let pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
            _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)))
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn iota() -> Self {
            Self(_mm256_setr_ps(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0))
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn select_le(x: Self, limit: Self, a: Self, b: Self) -> Self {
            let keep = _mm256_cmp_ps::<_CMP_LE_OQ>(x.0, limit.0);
            Self(_mm256_blendv_ps(b.0, a.0, keep))
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn pow2i(n: Self) -> Self {
            let e = _mm256_add_epi32(_mm256_cvtps_epi32(n.0), _mm256_set1_epi32(127));
            Self(_mm256_castsi256_ps(_mm256_slli_epi32::<23>(e)))
        }
    }
}

/// 16 lanes in a plain array: the fallback on any CPU.
#[derive(Clone, Copy)]
pub(crate) struct Portable([f32; 16]);

impl Portable {
    #[inline(always)]
    fn map(self, f: impl Fn(f32) -> f32) -> Self {
        Self(self.0.map(f))
    }
    #[inline(always)]
    fn zip(a: Self, b: Self, f: impl Fn(f32, f32) -> f32) -> Self {
        Self(std::array::from_fn(|i| f(a.0[i], b.0[i])))
    }
}

impl Vector for Portable {
    const WIDTH: usize = 16;
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        Self([x; 16])
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller passes 16 readable floats.
        Self(std::array::from_fn(|i| unsafe { *p.add(i) }))
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> Self {
        // SAFETY: the caller passes 16 readable halves.
        Self(std::array::from_fn(|i| {
            half::f16::from_bits(unsafe { *p.add(i) }).to_f32()
        }))
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> Self {
        // SAFETY: the caller passes 16 readable bfloat16 values.
        Self(std::array::from_fn(|i| {
            f32::from_bits(u32::from(unsafe { *p.add(i) }) << 16)
        }))
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        for (i, x) in self.0.into_iter().enumerate() {
            // SAFETY: the caller passes room for 16 floats.
            unsafe { *p.add(i) = x };
        }
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        Self::zip(a, b, |x, y| x + y)
    }
    #[inline(always)]
    unsafe fn sub(a: Self, b: Self) -> Self {
        Self::zip(a, b, |x, y| x - y)
    }
    #[inline(always)]
    unsafe fn mul(a: Self, b: Self) -> Self {
        Self::zip(a, b, |x, y| x * y)
    }
    #[inline(always)]
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self {
        Self(std::array::from_fn(|i| a.0[i].mul_add(b.0[i], c.0[i])))
    }
    #[inline(always)]
    unsafe fn max(a: Self, b: Self) -> Self {
        Self::zip(a, b, f32::max)
    }
    #[inline(always)]
    unsafe fn min(a: Self, b: Self) -> Self {
        Self::zip(a, b, f32::min)
    }
    #[inline(always)]
    unsafe fn reduce_max(self) -> f32 {
        self.0.into_iter().fold(f32::NEG_INFINITY, f32::max)
    }
    #[inline(always)]
    unsafe fn reduce_add(self) -> f32 {
        // Pairwise, like the SIMD implementations: fewer dependent adds.
        let mut v = self.0;
        let mut n = 16;
        while n > 1 {
            n /= 2;
            for i in 0..n {
                v[i] += v[i + n];
            }
        }
        v[0]
    }
    #[inline(always)]
    unsafe fn iota() -> Self {
        Self(std::array::from_fn(|i| i as f32))
    }
    #[inline(always)]
    unsafe fn select_le(x: Self, limit: Self, a: Self, b: Self) -> Self {
        Self(std::array::from_fn(|i| {
            if x.0[i] <= limit.0[i] { a.0[i] } else { b.0[i] }
        }))
    }
    #[inline(always)]
    unsafe fn pow2i(n: Self) -> Self {
        n.map(|e| f32::from_bits(((e as i32 + 127) as u32) << 23))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::fast_math;

    /// Runs the same checks on every implementation this CPU supports.
    fn check<V: Vector>() {
        // SAFETY: callers only instantiate implementations this CPU supports.
        unsafe {
            let w = V::WIDTH;
            let xs: Vec<f32> = (0..w).map(|i| -80.0 + 11.3 * i as f32).collect();
            let mut out = vec![0f32; w];
            V::exp(V::load(xs.as_ptr())).store(out.as_mut_ptr());
            for (x, y) in xs.iter().zip(&out) {
                assert_eq!(*y, fast_math::exp(*x), "exp({x})");
            }
            let halves: Vec<u16> = xs
                .iter()
                .map(|&x| half::f16::from_f32(x).to_bits())
                .collect();
            V::load_f16(halves.as_ptr()).store(out.as_mut_ptr());
            for (h, y) in halves.iter().zip(&out) {
                assert_eq!(*y, half::f16::from_bits(*h).to_f32());
            }
            let brains: Vec<u16> = xs
                .iter()
                .map(|&x| half::bf16::from_f32(x).to_bits())
                .collect();
            V::load_bf16(brains.as_ptr()).store(out.as_mut_ptr());
            for (h, y) in brains.iter().zip(&out) {
                assert_eq!(*y, half::bf16::from_bits(*h).to_f32());
            }
            let v = V::load(xs.as_ptr());
            assert_eq!(v.reduce_max(), xs.iter().cloned().fold(f32::MIN, f32::max));
            let sum: f32 = xs.iter().sum();
            assert!((v.reduce_add() - sum).abs() < 1e-3);
            let picked = V::select_le(V::iota(), V::splat(2.0), V::splat(1.0), V::splat(0.0));
            picked.store(out.as_mut_ptr());
            assert_eq!(out.iter().sum::<f32>(), 3.0);
        }
    }

    #[test]
    fn every_supported_vector_type_converts_and_computes_alike() {
        check::<Portable>();
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                check::<x86::Avx2>();
            }
            if is_x86_feature_detected!("avx512f") {
                check::<x86::Avx512>();
            }
        }
    }
}
