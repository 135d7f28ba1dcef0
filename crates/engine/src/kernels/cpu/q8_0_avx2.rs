//! The Q8_0 super-block product on AVX2 CPUs without AVX-512 VNNI (Zen 2/3, most of the
//! Intel parts before Ice Lake): the same interleaved layout as [`super::q8_0`], read 32 bytes
//! at a time. A 32-byte half of a 64-byte group holds 8 lanes of 4 bytes, lane `j` from block
//! `j`, so every lane again sums one block only.
//!
//! There is no unsigned-by-signed dot product with 32-bit sums here, and `vpmaddubsw` sums
//! pairs into saturating 16 bits: a stored weight (value + 128, up to 255) times an activation
//! (up to 127), twice, would overflow. So, as llama.cpp does, the weight is made signed again
//! (`xor 0x80`), its magnitude goes in the unsigned operand and its sign onto the activation:
//! `|w| · sign(w)·x` is at most 128 · 127 per product, 32 512 per pair, inside i16. The sums are
//! exact integers, so the result does not depend on the tile shape or the batch.
//!
//! Invariant: callers run these functions only after detecting AVX2, FMA and F16C.

use std::arch::x86_64::*;

use super::lane_sums::x86::sum_avx2;
use super::prefetch::{prefetch_l2_range, prefetch_l2_share};
use super::row_split::Columns;

/// Weights per Q8_0 block.
const QK: usize = 32;
/// Weights per interleaved super-block.
const SUPER: usize = 256;
/// How many decode tiles ahead the weights are prefetched.
const PREFETCH_TILES: usize = 4;
/// Weight rows of a decode tile (one activation row): 4 integer and 4 float accumulators
/// leave room in 16 registers for the operands.
const DECODE_ROWS: usize = 4;

/// A task's Q8_0 weight rows and the call's quantized activations, in the interleaved layout.
#[derive(Clone, Copy)]
pub(super) struct Operands<'a> {
    /// `k` bytes per weight row (value + 128 in the super-blocks).
    pub(super) w_qs: &'a [u8],
    /// `k / 32` f16 scales per weight row.
    pub(super) w_scales: &'a [half::f16],
    /// `k` i8 per activation row.
    pub(super) x_qs: &'a [i8],
    /// Per activation row `x_scale_stride` f32: 16 per super-block (lane `j` has block
    /// `j % 8`'s scale), then the tail blocks'.
    pub(super) x_scales: &'a [f32],
    pub(super) x_scale_stride: usize,
    /// Row length.
    pub(super) k: usize,
    /// Activation rows.
    pub(super) m: usize,
}

/// Super-block part of output `(c, r)` for the task's `rows` weight rows: 4 weight rows at a
/// time against one activation row (decode), else 2 × 4 tiles; leftovers with narrower ones.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn rows(op: Operands<'_>, rows: usize, out: Columns<'_>) {
    if op.k < SUPER || op.m == 0 {
        return;
    }
    assert!(
        op.w_qs.len() >= rows * op.k
            && op.w_scales.len() >= rows * (op.k / QK)
            && op.x_qs.len() >= op.m * op.k
            && op.x_scales.len() >= op.m * op.x_scale_stride
            && op.x_scale_stride >= 16 * (op.k / SUPER)
            && out.len() >= rows
    );
    let mut r = 0;
    // SAFETY (all calls): the features are enabled here; the assert above bounds every row.
    unsafe {
        if op.m == 1 {
            while r + DECODE_ROWS <= rows {
                tile::<DECODE_ROWS, 1>(op, r, 0, out);
                r += DECODE_ROWS;
            }
        }
        while r + 2 <= rows {
            cols::<2>(op, r, out);
            r += 2;
        }
        while r < rows {
            cols::<1>(op, r, out);
            r += 1;
        }
    }
}

/// Weight rows `r0..r0 + RA` against every activation row, 4 at a time.
#[inline(always)]
unsafe fn cols<const RA: usize>(op: Operands<'_>, r0: usize, out: Columns<'_>) {
    // The next `RA` weight rows into L2, a share before each pass over the activation rows.
    let next = op.w_qs.as_ptr().wrapping_add((r0 + RA) * op.k);
    let mut c = 0;
    // SAFETY: forwarded from `rows`.
    unsafe {
        while c + 4 <= op.m {
            prefetch_l2_share(next, RA * op.k, op.m.div_ceil(4), c / 4);
            tile::<RA, 4>(op, r0, c, out);
            c += 4;
        }
        while c < op.m {
            tile::<RA, 1>(op, r0, c, out);
            c += 1;
        }
    }
}

/// Weight rows `r0..r0 + RA` against activation rows `c0..c0 + RB`.
// `c` and `r` are the tile's coordinates; both index the accumulator grid.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn tile<const RA: usize, const RB: usize>(
    op: Operands<'_>,
    r0: usize,
    c0: usize,
    out: Columns<'_>,
) {
    let k = op.k;
    let supers = k / SUPER;
    // SAFETY: every offset below stays inside row r0 + r < rows of the weights and row
    // c0 + c < m of the activations (checked by the callers), within the first
    // `supers * 256` bytes of each.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let flip = _mm256_set1_epi8(-128);
        let mut facc = [[_mm256_setzero_ps(); RB]; RA];
        // Decode reads each weight once: the rows a few tiles ahead are fetched into L2 while
        // this one computes, a super-block's share per step.
        let ahead = r0 + PREFETCH_TILES * RA;
        let next = op.w_qs.as_ptr().wrapping_add(ahead * k);
        if RB == 1 {
            let scales = op.w_scales.as_ptr().wrapping_add(ahead * (k / QK));
            prefetch_l2_range(scales.cast(), RA * (k / QK) * 2);
        }
        for s in 0..supers {
            if RB == 1 {
                prefetch_l2_range(next.wrapping_add(s * RA * SUPER), RA * SUPER);
            }
            let mut acc = [[_mm256_setzero_si256(); RB]; RA];
            for half in 0..8 {
                let at = s * SUPER + 32 * half;
                let x: [__m256i; RB] = std::array::from_fn(|c| {
                    _mm256_loadu_si256(op.x_qs.as_ptr().add((c0 + c) * k + at).cast())
                });
                for r in 0..RA {
                    let stored = _mm256_loadu_si256(op.w_qs.as_ptr().add((r0 + r) * k + at).cast());
                    let signed = _mm256_xor_si256(stored, flip);
                    let magnitude = _mm256_abs_epi8(signed);
                    for c in 0..RB {
                        let signed_x = _mm256_sign_epi8(x[c], signed);
                        let pairs = _mm256_maddubs_epi16(magnitude, signed_x);
                        acc[r][c] = _mm256_add_epi32(acc[r][c], _mm256_madd_epi16(pairs, ones));
                    }
                }
            }
            for r in 0..RA {
                let p = op.w_scales.as_ptr().add((r0 + r) * (k / QK) + 8 * s);
                let w_scale = _mm256_cvtph_ps(_mm_loadu_si128(p.cast()));
                for c in 0..RB {
                    let xp = op
                        .x_scales
                        .as_ptr()
                        .add((c0 + c) * op.x_scale_stride + 16 * s);
                    let scale = _mm256_mul_ps(w_scale, _mm256_loadu_ps(xp));
                    facc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][c]), scale, facc[r][c]);
                }
            }
        }
        for r in 0..RA {
            for c in 0..RB {
                out.set(c0 + c, r0 + r, sum_avx2(facc[r][c]));
            }
        }
    }
}
