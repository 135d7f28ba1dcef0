//! The bf16 matmul: `x (m, k) · w (n, k)ᵀ → (m, n)` in f32, both operands bf16 and
//! k-contiguous. With AVX512-BF16 each `vdpbf16ps` multiplies 32 bf16 pairs and adds them into
//! 16 f32 lanes; on AVX2 the weights are widened to f32 in registers (a 16-bit shift) and
//! multiplied with ordinary FMAs, the few activation rows widened once per call; elsewhere a
//! plain loop the compiler vectorises. The weights are read as stored, never converted.
//!
//! Tiles as in [`super::matmul`]: 8 weight rows × 1 activation row for decode (prefetching the
//! rows two tiles ahead), 4 × 4 (AVX-512) or 3 × 4 (AVX2) otherwise; weight rows split over
//! threads by [`super::row_split`], each tile summed by [`super::lane_sums`]. Invariant: the
//! AVX512-BF16 and AVX2 paths run only when [`Bf16Dot::detect`] found the instructions.

use half::bf16;

use super::isa::{Isa, detect_isa, with_isa};
use super::row_split::{Columns, par_columns};
use super::thread_team::map_elements;

/// Which bf16 dot-product code runs; only [`Bf16Dot::detect`] makes the SIMD one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Bf16Dot {
    /// AVX-512 with the BF16 extension (`vdpbf16ps`).
    #[cfg(target_arch = "x86_64")]
    Avx512Bf16,
    /// AVX2 tiles: weights widened to f32 in registers, activations widened once per call.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// Widen to f32 and FMA, compiled for the best f32 instruction set found.
    Widen(Isa),
}

impl Bf16Dot {
    /// The best code path this CPU supports.
    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512bf16")
        {
            return Self::Avx512Bf16;
        }
        #[cfg(target_arch = "x86_64")]
        if avx2_detected() {
            return Self::Avx2;
        }
        Self::Widen(detect_isa())
    }

    /// Every path this CPU supports (tests compare them).
    #[cfg(test)]
    pub(crate) fn all_supported() -> Vec<Self> {
        let mut all: Vec<Self> = Isa::all_supported().into_iter().map(Self::Widen).collect();
        #[cfg(target_arch = "x86_64")]
        if avx2_detected() {
            all.push(Self::Avx2);
        }
        #[cfg(target_arch = "x86_64")]
        if Self::detect() == Self::Avx512Bf16 {
            all.push(Self::Avx512Bf16);
        }
        all
    }
}

/// Whether the CPU has what [`Bf16Dot::Avx2`] needs: AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
fn avx2_detected() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// `(m, k) · (n, k)ᵀ`, returned row-major `(m, n)` in f32.
pub(crate) fn bf16_matmul_nt(
    dot: Bf16Dot,
    x: &[bf16],
    m: usize,
    k: usize,
    w: &[bf16],
    n: usize,
) -> Vec<f32> {
    assert!(
        x.len() == m * k && w.len() == n * k,
        "bf16_matmul_nt: shapes"
    );
    if k == 0 {
        return vec![0f32; m * n];
    }
    // The AVX2 tiles read the activations as f32: widened once here (exactly), not per tile.
    #[cfg(target_arch = "x86_64")]
    let wide: Vec<f32> = match dot {
        Bf16Dot::Avx2 => map_elements(x, |&v| widen(v)),
        _ => Vec::new(),
    };
    par_columns(m, n, 2 * k, |cols| {
        let rows = &w[cols.first() * k..][..cols.len() * k];
        match dot {
            // SAFETY: an `Avx512Bf16` exists only once AVX-512 F/BW/BF16 were detected.
            #[cfg(target_arch = "x86_64")]
            Bf16Dot::Avx512Bf16 => unsafe { x86::rows(rows, x, m, k, cols) },
            // SAFETY: an `Avx2` exists only once AVX2 and FMA were detected.
            #[cfg(target_arch = "x86_64")]
            Bf16Dot::Avx2 => unsafe { avx2::rows(rows, &wide, m, k, cols) },
            Bf16Dot::Widen(isa) => with_isa(isa, || widen_rows(rows, x, m, k, cols)),
        }
    })
}

/// bf16 → f32 is a 16-bit shift: the compiler turns the loop into vector shifts and FMAs.
#[inline(always)]
fn widen(v: bf16) -> f32 {
    f32::from_bits(u32::from(v.to_bits()) << 16)
}

/// Output `(c, r)` = `w_r · x_c`, widening in registers.
#[inline(always)]
fn widen_rows(w: &[bf16], x: &[bf16], m: usize, k: usize, out: Columns<'_>) {
    const LANES: usize = 16;
    for (r, wr) in w.chunks_exact(k).enumerate() {
        for c in 0..m {
            let xr = &x[c * k..][..k];
            let mut acc = [0f32; LANES];
            let (cw, cx) = (wr.chunks_exact(LANES), xr.chunks_exact(LANES));
            let tail: f32 = cw
                .remainder()
                .iter()
                .zip(cx.remainder())
                .map(|(&a, &b)| widen(a) * widen(b))
                .sum();
            for (a, b) in cw.zip(cx) {
                for l in 0..LANES {
                    acc[l] += widen(a[l]) * widen(b[l]);
                }
            }
            out.set(c, r, acc.iter().sum::<f32>() + tail);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use std::arch::x86_64::*;

    use half::bf16;

    use super::{Columns, widen};
    use crate::kernels::cpu::lane_sums::x86::store_tile;
    use crate::kernels::cpu::prefetch::{LINE, prefetch_l2_range, prefetch_l2_share};

    /// bf16 values per 512-bit register.
    const WIDTH: usize = 32;
    /// Values of k per pass of the 4 × 4 tiles over longer rows: the 4 weight rows' share
    /// (8 KB) stays in L1 while every group of activation rows passes over it. Whole rows of
    /// 4096 (64 KB per tile with the activations) spill to L2 on every pass.
    const CHUNK: usize = 1024;
    /// Rows up to this long are passed over whole: a tile's weights and activations fit L1.
    const WHOLE_UP_TO: usize = 2048;
    /// Groups of 4 activation rows at most that pass over k in chunks (a decode step of up
    /// to 32 sequences); a prefill chunk's many groups reuse each weight share often enough.
    const CHUNKED_GROUPS: usize = 8;

    /// One 4 × 4 tile's lane sums, kept between the passes over k.
    type Lanes = [[__m512; 4]; 4];

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn rows(w: &[bf16], x: &[bf16], m: usize, k: usize, out: Columns<'_>) {
        let rows = w.len() / k;
        assert!(x.len() >= m * k && out.len() >= rows);
        let mut r = 0;
        // SAFETY (all calls): features enabled here; the assert above bounds every row.
        unsafe {
            if m == 1 {
                while r + 8 <= rows {
                    tile::<8, 1>(w, r, x, 0, k, out);
                    r += 8;
                }
            }
            let mut lanes: [Lanes; CHUNKED_GROUPS] =
                [[[_mm512_setzero_ps(); 4]; 4]; CHUNKED_GROUPS];
            while r + 4 <= rows {
                cols::<4>(w, r, x, m, k, out, &mut lanes);
                r += 4;
            }
            while r < rows {
                cols::<1>(w, r, x, m, k, out, &mut lanes);
                r += 1;
            }
        }
    }

    /// Weight rows `r0..r0 + RA` against every activation row, in groups of 4. Rows longer
    /// than [`WHOLE_UP_TO`] against at most [`CHUNKED_GROUPS`] groups are passed over a
    /// [`CHUNK`] at a time, each group keeping its lane sums in `lanes` between passes, so
    /// that every lane adds the same products in the same order as an unbroken loop (the
    /// decode tile's) and a row's bits stay those of any batch.
    #[inline(always)]
    unsafe fn cols<const RA: usize>(
        w: &[bf16],
        r0: usize,
        x: &[bf16],
        m: usize,
        k: usize,
        out: Columns<'_>,
        lanes: &mut [Lanes],
    ) {
        // The next `RA` weight rows (they follow in memory) into L2, a share before each pass,
        // as `matmul.rs` does: alone, the hardware prefetcher leaves the first pass over each
        // group of rows waiting on memory.
        let next = w.as_ptr().wrapping_add((r0 + RA) * k).cast::<u8>();
        let (groups, full) = (m / 4, k / WIDTH * WIDTH);
        // SAFETY: forwarded from `rows`; `lanes` holds a tile per group of 4 rows.
        unsafe {
            if k <= WHOLE_UP_TO || groups > lanes.len() {
                for g in 0..groups {
                    prefetch_l2_share(next, RA * k * 2, groups, g);
                    tile::<RA, 4>(w, r0, x, 4 * g, k, out);
                }
            } else {
                let passes = full.div_ceil(CHUNK) * groups;
                for (chunk, i0) in (0..full).step_by(CHUNK).enumerate() {
                    let i1 = (i0 + CHUNK).min(full);
                    for (g, lane) in lanes[..groups].iter_mut().enumerate() {
                        prefetch_l2_share(next, RA * k * 2, passes, chunk * groups + g);
                        let acc = (&mut lane[..RA]).try_into().expect("RA <= 4");
                        part::<RA, 4>(w, r0, x, 4 * g, k, i0..i1, acc);
                    }
                }
                for (g, lane) in lanes[..groups].iter().enumerate() {
                    let acc: &[[__m512; 4]; RA] = (&lane[..RA]).try_into().expect("RA <= 4");
                    store_tile(acc, out, r0, 4 * g);
                    add_tail::<RA, 4>(w, r0, x, 4 * g, k, out);
                }
            }
            for c in 4 * groups..m {
                tile::<RA, 1>(w, r0, x, c, k, out);
            }
        }
    }

    /// Weight rows `r0..r0 + RA` against activation rows `c0..c0 + RB` in one pass over k.
    #[inline(always)]
    unsafe fn tile<const RA: usize, const RB: usize>(
        w: &[bf16],
        r0: usize,
        x: &[bf16],
        c0: usize,
        k: usize,
        out: Columns<'_>,
    ) {
        // SAFETY: forwarded from the callers, which keep the rows inside `w` and `x`.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); RB]; RA];
            part::<RA, RB>(w, r0, x, c0, k, 0..k / WIDTH * WIDTH, &mut acc);
            store_tile(&acc, out, r0, c0);
            add_tail::<RA, RB>(w, r0, x, c0, k, out);
        }
    }

    /// Adds the products over values `range` (whole registers) to the tile's lane sums,
    /// starting them from zero at the first value.
    // `c` and `r` are the tile's coordinates; both index the accumulator grid.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn part<const RA: usize, const RB: usize>(
        w: &[bf16],
        r0: usize,
        x: &[bf16],
        c0: usize,
        k: usize,
        range: std::ops::Range<usize>,
        lanes: &mut [[__m512; RB]; RA],
    ) {
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        // SAFETY: loads read `WIDTH` values at `i` with `i + WIDTH <= range.end <= k`, inside
        // rows r0 + r and c0 + c, which the callers keep inside `w` and `x`.
        unsafe {
            let mut acc = if range.start == 0 {
                [[_mm512_setzero_ps(); RB]; RA]
            } else {
                *lanes
            };
            // Decode: the rows two tiles ahead into L2 while this one computes (as in `q8_0`).
            let next = wp.wrapping_add((r0 + 2 * RA) * k).cast::<u8>();
            let mut i = range.start;
            while i + WIDTH <= range.end {
                if RB == 1 {
                    prefetch_l2_range(next.wrapping_add(i / WIDTH * RA * LINE), RA * LINE);
                }
                let mut wv = [_mm512_setzero_si512(); RA];
                for (r, v) in wv.iter_mut().enumerate() {
                    *v = _mm512_loadu_si512(wp.add((r0 + r) * k + i).cast());
                }
                for c in 0..RB {
                    let xv: __m512bh =
                        std::mem::transmute(_mm512_loadu_si512(xp.add((c0 + c) * k + i).cast()));
                    for (r, &v) in wv.iter().enumerate() {
                        acc[r][c] = _mm512_dpbf16_ps(
                            acc[r][c],
                            std::mem::transmute::<__m512i, __m512bh>(v),
                            xv,
                        );
                    }
                }
                i += WIDTH;
            }
            *lanes = acc;
        }
    }

    /// Adds the values past the last whole register (`k % 32` of them) to outputs already
    /// stored, one at a time.
    #[inline(always)]
    fn add_tail<const RA: usize, const RB: usize>(
        w: &[bf16],
        r0: usize,
        x: &[bf16],
        c0: usize,
        k: usize,
        out: Columns<'_>,
    ) {
        let full = k / WIDTH * WIDTH;
        if full == k {
            return;
        }
        for r in 0..RA {
            for c in 0..RB {
                let tail: f32 = (full..k)
                    .map(|j| widen(w[(r0 + r) * k + j]) * widen(x[(c0 + c) * k + j]))
                    .sum();
                out.add(c0 + c, r0 + r, tail);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use std::arch::x86_64::*;

    use half::bf16;

    use super::{Columns, widen};
    use crate::kernels::cpu::lane_sums::x86::sum_avx2;
    use crate::kernels::cpu::prefetch::{LINE, prefetch_l2_range, prefetch_l2_share};

    /// f32 lanes per register.
    const WIDTH: usize = 8;
    /// bf16 weights per cache line.
    const PER_LINE: usize = LINE / 2;

    /// Output `(c, r)` = `w_r · x_c` for f32 activation rows `x`: 8 weight rows against one
    /// activation row (decode), else 3 × 4 tiles: 12 accumulators, 3 weight vectors and one
    /// activation vector fill the 16 registers.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn rows(w: &[bf16], x: &[f32], m: usize, k: usize, out: Columns<'_>) {
        let rows = w.len() / k;
        assert!(x.len() >= m * k && out.len() >= rows);
        let mut r = 0;
        // SAFETY (all calls): features enabled here; the assert bounds every row.
        unsafe {
            if m == 1 {
                while r + 8 <= rows {
                    tile::<8, 1>(w, r, x, 0, k, out);
                    r += 8;
                }
            }
            while r + 3 <= rows {
                cols::<3>(w, r, x, m, k, out);
                r += 3;
            }
            while r < rows {
                cols::<1>(w, r, x, m, k, out);
                r += 1;
            }
        }
    }

    #[inline(always)]
    unsafe fn cols<const RA: usize>(
        w: &[bf16],
        r0: usize,
        x: &[f32],
        m: usize,
        k: usize,
        out: Columns<'_>,
    ) {
        // The next `RA` weight rows into L2, a share before each pass over the activations.
        let next = w.as_ptr().wrapping_add((r0 + RA) * k).cast::<u8>();
        let mut c = 0;
        // SAFETY: forwarded from `rows`.
        unsafe {
            while c + 4 <= m {
                prefetch_l2_share(next, RA * k * 2, m.div_ceil(4), c / 4);
                tile::<RA, 4>(w, r0, x, c, k, out);
                c += 4;
            }
            while c < m {
                tile::<RA, 1>(w, r0, x, c, k, out);
                c += 1;
            }
        }
    }

    // `c` and `r` are the tile's coordinates; both index the accumulator grid.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn tile<const RA: usize, const RB: usize>(
        w: &[bf16],
        r0: usize,
        x: &[f32],
        c0: usize,
        k: usize,
        out: Columns<'_>,
    ) {
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        // SAFETY: loads read `WIDTH` values at `i` with `i + WIDTH <= k`, inside rows r0 + r and
        // c0 + c, which the callers keep inside `w` and `x`.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); RB]; RA];
            // Decode: the rows two tiles ahead into L2, a line per row per line consumed.
            let next = wp.wrapping_add((r0 + 2 * RA) * k).cast::<u8>();
            let mut i = 0;
            while i + WIDTH <= k {
                if RB == 1 && i.is_multiple_of(PER_LINE) {
                    prefetch_l2_range(next.wrapping_add(i / PER_LINE * RA * LINE), RA * LINE);
                }
                // bf16 → f32 is the 16 bits moved to the top of a 32-bit lane.
                let wv: [__m256; RA] = std::array::from_fn(|r| {
                    let h = _mm_loadu_si128(wp.add((r0 + r) * k + i).cast());
                    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
                });
                for c in 0..RB {
                    let xv = _mm256_loadu_ps(xp.add((c0 + c) * k + i));
                    for r in 0..RA {
                        acc[r][c] = _mm256_fmadd_ps(wv[r], xv, acc[r][c]);
                    }
                }
                i += WIDTH;
            }
            for r in 0..RA {
                for c in 0..RB {
                    let tail: f32 = (i..k)
                        .map(|j| widen(w[(r0 + r) * k + j]) * x[(c0 + c) * k + j])
                        .sum();
                    out.set(c0 + c, r0 + r, sum_avx2(acc[r][c]) + tail);
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn a_rows_bits_do_not_depend_on_the_rows_beside_it() {
        // k: long enough for several of the multi-row tiles' passes, a partial one and a tail.
        let (k, n) = (2600, 13);
        let x = pseudo(9 * k, 3);
        let w = pseudo(n * k, 4);
        for dot in Bf16Dot::all_supported() {
            let alone: Vec<Vec<f32>> = (0..9)
                .map(|i| bf16_matmul_nt(dot, &x[i * k..][..k], 1, k, &w, n))
                .collect();
            for m in 2..=9 {
                let got = bf16_matmul_nt(dot, &x[..m * k], m, k, &w, n);
                assert_rows_are_the_rows_alone(&got, &alone, &format!("{dot:?} m={m}"));
            }
        }
    }

    /// Asserts that each row of `got` (rows as long as `alone`'s) has the bits of `alone[i]`.
    pub(crate) fn assert_rows_are_the_rows_alone(got: &[f32], alone: &[Vec<f32>], what: &str) {
        let n = alone.first().map_or(1, Vec::len).max(1);
        for (i, row) in got.chunks(n).enumerate() {
            let same = row
                .iter()
                .zip(&alone[i])
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{what}: row {i} differs from the row alone");
        }
    }

    /// `n` bf16 values in [-1, 1], a different sequence per `seed`.
    pub(crate) fn pseudo(n: usize, seed: usize) -> Vec<bf16> {
        (0..n)
            .map(|i| bf16::from_f32((((i + seed) * 7919 % 211) as f32 - 105.0) / 105.0))
            .collect()
    }

    /// Asserts that `got (m, n)` is `x (m, k) · w (n, k)ᵀ` summed in f64, to f32 precision.
    pub(crate) fn assert_near_f64_product(
        got: &[f32],
        x: &[bf16],
        w: &[bf16],
        m: usize,
        k: usize,
        n: usize,
        what: &str,
    ) {
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k)
                    .map(|l| x[i * k + l].to_f64() * w[j * k + l].to_f64())
                    .sum();
                let g = f64::from(got[i * n + j]);
                assert!(
                    (g - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "{what} m={m} k={k} n={n} ({i},{j}): {g} vs {want}"
                );
            }
        }
    }

    #[test]
    fn every_path_matches_an_f64_product_of_the_bf16_values() {
        for (m, k, n) in [
            (1, 64, 9),
            (1, 100, 40),
            (3, 96, 33),
            (4, 32, 8),
            (5, 130, 7),
            (17, 64, 37),
            (2, 0, 3),
        ] {
            let x = pseudo(m * k, 1);
            let w = pseudo(n * k, 2);
            for dot in Bf16Dot::all_supported() {
                let got = bf16_matmul_nt(dot, &x, m, k, &w, n);
                assert_near_f64_product(&got, &x, &w, m, k, n, &format!("{dot:?}"));
            }
        }
    }
}
