//! Q8_0 weights repacked for an int8 dot-product kernel: `x (m, k) · W (n, k)ᵀ` where `W` is
//! ggml Q8_0 (blocks of 32 i8 with an f16 scale) and `x` is quantized per call the same way
//! (as llama.cpp does for Q8_0 weights), so each product is an exact integer sum per block
//! times the two scales.
//!
//! Layout. Each row's first `k / 256` super-blocks of 8 blocks are interleaved so that one
//! 64-byte register load gives 16 lanes of 4 bytes, lane `j` from block `j % 8`, half `j / 8`:
//! four such loads cover the 256 weights, and every lane only ever sums values of one block,
//! so the integer sums need no per-block shuffles and are scaled once per super-block. Weights
//! are stored plus 128 (unsigned, as `vpdpbusd` wants its first operand); the activations'
//! per-lane sums times 128 are subtracted up front. Blocks past the last whole super-block
//! (rows whose length is not a multiple of 256) stay in ggml's order. The f16 scales are kept
//! as they are in the file, so the matrix takes exactly Q8_0's 34 bytes per 32 weights.
//!
//! Invariant: the AVX-512 VNNI and AVX2 paths run only when [`Int8Dot::detect`] found the
//! instructions.

use half::f16;
use rayon::prelude::*;

use super::isa::{detect_isa, with_isa};
#[cfg(target_arch = "x86_64")]
use super::q8_0_avx2;
use super::row_split::{Columns, par_columns};
use super::thread_team;

#[cfg(test)]
use super::ggml_scalars::f16_at;

/// Weights per Q8_0 block.
const QK: usize = 32;
/// Weights per interleaved super-block (8 blocks; 4 register loads of 64 bytes).
const SUPER: usize = 256;
/// Activation rows per task when they are quantized over threads.
const ACT_ROWS_PER_TASK: usize = 8;

/// Which int8 dot-product code runs; only [`Int8Dot::detect`] makes a SIMD one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Int8Dot {
    /// AVX-512 with VNNI (`vpdpbusd`) and BW.
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
    /// AVX2 with FMA and F16C (`vpmaddubsw` on magnitudes and signs, see [`super::q8_0_avx2`]).
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// Plain Rust.
    Portable,
}

impl Int8Dot {
    /// The best code path this CPU supports.
    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
        {
            return Self::Avx512Vnni;
        }
        #[cfg(target_arch = "x86_64")]
        if avx2_detected() {
            return Self::Avx2;
        }
        Self::Portable
    }

    /// Every path this CPU supports (tests compare them).
    #[cfg(test)]
    pub(crate) fn all_supported() -> Vec<Self> {
        let mut all = vec![Self::Portable];
        #[cfg(target_arch = "x86_64")]
        if avx2_detected() {
            all.push(Self::Avx2);
        }
        if !all.contains(&Self::detect()) {
            all.push(Self::detect());
        }
        all
    }
}

/// Whether the CPU has what [`Int8Dot::Avx2`] needs: AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
fn avx2_detected() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// A `(rows, k)` Q8_0 matrix in the interleaved layout above.
#[derive(Clone)]
pub(crate) struct Q8Matrix {
    rows: usize,
    k: usize,
    /// `k` bytes per row: interleaved super-blocks (values + 128), then tail blocks (i8).
    qs: Vec<u8>,
    /// `k / 32` f16 scales per row, in block order.
    scales: Vec<f16>,
}

impl std::fmt::Debug for Q8Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q8Matrix({} x {})", self.rows, self.k)
    }
}

/// Byte offset inside a super-block of value `i` (0..256), and the inverse mapping's parts.
#[inline(always)]
fn interleaved(i: usize) -> usize {
    let (block, within) = (i / QK, i % QK);
    let (half, t, e) = (within / 16, (within % 16) / 4, within % 4);
    64 * t + 4 * (8 * half + block) + e
}

impl Q8Matrix {
    /// Repacks ggml Q8_0 bytes of a `(rows, k)` matrix (`k` a multiple of 32).
    pub(crate) fn from_ggml(bytes: &[u8], rows: usize, k: usize) -> Self {
        assert!(
            k.is_multiple_of(QK) && bytes.len() == rows * k / QK * 34,
            "Q8Matrix::from_ggml: {} bytes for {rows} x {k}",
            bytes.len()
        );
        let mut m = Self {
            rows,
            k,
            qs: vec![0u8; rows * k],
            scales: vec![f16::ZERO; rows * k / QK],
        };
        m.qs.par_chunks_mut(k)
            .zip(m.scales.par_chunks_mut(k / QK))
            .zip(bytes.par_chunks(k / QK * 34))
            .for_each(|((qs, scales), src)| repack_row(src, qs, scales));
        m
    }

    /// Rows (output features).
    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    /// Row length (input features).
    pub(crate) fn k(&self) -> usize {
        self.k
    }

    /// Bytes held (values and scales).
    pub(crate) fn bytes(&self) -> usize {
        self.qs.len() + 2 * self.scales.len()
    }

    /// Row `r` dequantized into `out` (`k` floats): for embedding look-ups.
    pub(crate) fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let (qs, scales) = (
            &self.qs[r * self.k..][..self.k],
            &self.scales[r * self.k / QK..],
        );
        let full = self.k / SUPER * SUPER;
        for (i, o) in out[..full].iter_mut().enumerate() {
            let base = i / SUPER * SUPER;
            let q = qs[base + interleaved(i % SUPER)] as i32 - 128;
            *o = q as f32 * scales[i / QK].to_f32();
        }
        for (i, o) in out[full..self.k].iter_mut().enumerate() {
            let i = full + i;
            *o = qs[i] as i8 as f32 * scales[i / QK].to_f32();
        }
    }

    /// `x (m, k) · selfᵀ → (m, n)` row-major, with `x` quantized to Q8_0 per block first.
    pub(crate) fn matmul(&self, dot: Int8Dot, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.k, "Q8Matrix::matmul: x is not (m, k)");
        let act = QuantizedActs::new(x, m, self.k);
        let (k, kb) = (self.k, self.k / QK);
        par_columns(m, self.rows, k + 2 * kb, |cols| {
            let (first, rows) = (cols.first(), cols.len());
            let w = WeightRows {
                qs: &self.qs[first * k..][..rows * k],
                scales: &self.scales[first * kb..][..rows * kb],
                k,
            };
            match dot {
                // SAFETY: an `Int8Dot` of this kind exists only once AVX-512 F/BW/VNNI were
                // detected at run time.
                #[cfg(target_arch = "x86_64")]
                Int8Dot::Avx512Vnni => unsafe { x86::rows(w, rows, &act, cols) },
                // SAFETY: an `Int8Dot` of this kind exists only once AVX2, FMA and F16C were
                // detected at run time.
                #[cfg(target_arch = "x86_64")]
                Int8Dot::Avx2 => unsafe { q8_0_avx2::rows(act.operands(w), rows, cols) },
                Int8Dot::Portable => portable_rows(w, rows, &act, cols),
            }
            tail_rows(w, rows, &act, cols);
        })
    }
}

fn repack_row(src: &[u8], qs: &mut [u8], scales: &mut [f16]) {
    let k = qs.len();
    let full = k / SUPER * SUPER;
    for (b, block) in src.chunks_exact(34).enumerate() {
        scales[b] = f16::from_le_bytes([block[0], block[1]]);
        for (e, &q) in block[2..].iter().enumerate() {
            let i = b * QK + e;
            if i < full {
                let base = i / SUPER * SUPER;
                qs[base + interleaved(i % SUPER)] = (q as i8 as i32 + 128) as u8;
            } else {
                qs[i] = q;
            }
        }
    }
}

/// A task's weight rows: `k` bytes and `k / 32` scales each.
#[derive(Clone, Copy)]
struct WeightRows<'a> {
    qs: &'a [u8],
    scales: &'a [f16],
    k: usize,
}

/// The activations quantized to Q8_0, in the weights' interleaved layout, with what the kernel
/// needs per super-block precomputed: 16 lane scales and 16 lane corrections (−128 × the sum
/// of the lane's activation values), so both are one aligned load in the inner loop.
struct QuantizedActs {
    m: usize,
    k: usize,
    /// `k` i8 per row, same layout as the weights (without the +128).
    qs: Vec<i8>,
    /// Per row: 16 f32 per super-block (lane `j` has block `j % 8`'s scale), then one per
    /// tail block.
    scales: Vec<f32>,
    /// Per row: 16 i32 per super-block.
    corr: Vec<i32>,
}

impl QuantizedActs {
    fn new(x: &[f32], m: usize, k: usize) -> Self {
        let supers = k / SUPER;
        let tail = (k - supers * SUPER) / QK;
        let mut a = Self {
            m,
            k,
            qs: vec![0i8; m * k],
            scales: vec![0f32; m * (16 * supers + tail)],
            // One spare slot per row when there are no super-blocks, so every row has a chunk.
            corr: vec![0i32; m * (16 * supers).max(1)],
        };
        let per_scales = 16 * supers + tail;
        let corr_per_row = (16 * supers).max(1);
        // Rows are independent: prefill chunks have hundreds, so they are split over threads;
        // a decode step's few rows make a task or two.
        let mut rows: Vec<_> =
            a.qs.chunks_mut(k)
                .zip(a.scales.chunks_mut(per_scales))
                .zip(a.corr.chunks_mut(corr_per_row))
                .zip(x.chunks(k))
                .collect();
        // Compiled for the CPU's instruction set, so that the rounding vectorises.
        let isa = detect_isa();
        thread_team::for_each_mut(
            &mut rows,
            ACT_ROWS_PER_TASK,
            |(((qs, scales), corr), xr)| {
                with_isa(
                    isa,
                    #[inline(always)]
                    || quantize_act_row(xr, supers, qs, scales, corr),
                )
            },
        );
        a
    }
}

#[cfg(target_arch = "x86_64")]
impl QuantizedActs {
    /// The AVX2 kernel's view of these activations and a task's weight rows.
    fn operands<'a>(&'a self, w: WeightRows<'a>) -> q8_0_avx2::Operands<'a> {
        q8_0_avx2::Operands {
            w_qs: w.qs,
            w_scales: w.scales,
            x_qs: &self.qs,
            x_scales: &self.scales,
            x_scale_stride: self.scales.len() / self.m.max(1),
            k: self.k,
            m: self.m,
        }
    }
}

/// One activation row into the interleaved layout (see [`QuantizedActs`]).
#[inline(always)]
fn quantize_act_row(
    xr: &[f32],
    supers: usize,
    qs: &mut [i8],
    scales: &mut [f32],
    corr: &mut [i32],
) {
    let mut q = [0i8; QK];
    for (b, block) in xr.chunks_exact(QK).enumerate() {
        let d = quantize_act_block(block, &mut q);
        let i0 = b * QK;
        if i0 < supers * SUPER {
            let (s, within) = (b / 8, b % 8);
            let base = s * SUPER;
            // Four consecutive values stay together in the layout (see `interleaved`).
            for (g, four) in q.chunks_exact(4).enumerate() {
                let at = base + interleaved(within * QK + 4 * g);
                qs[at..at + 4].copy_from_slice(four);
            }
            for half in 0..2 {
                let lane = 16 * s + 8 * half + within;
                scales[lane] = d;
                let sum: i32 = q[16 * half..16 * half + 16].iter().map(|&v| v as i32).sum();
                corr[lane] = -128 * sum;
            }
        } else {
            qs[i0..i0 + QK].copy_from_slice(&q);
            scales[16 * supers + (b - 8 * supers)] = d;
        }
    }
}

/// Quantizes 32 activations as ggml's Q8_0 (d = max|x| / 127, q = round(x / d)); returns d.
#[inline(always)]
fn quantize_act_block(x: &[f32], q: &mut [i8; QK]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (q, &v) in q.iter_mut().zip(x) {
        *q = round_half_away(v * id) as i8;
    }
    d
}

/// `x.round()` (halves away from zero), in operations that vectorise: `f32::round` is a call
/// to libm's `roundf` per value, a tenth of a 16-row decode step. Exact: `x - trunc(x)` is.
#[inline(always)]
fn round_half_away(x: f32) -> f32 {
    let t = x.trunc();
    if (x - t).abs() >= 0.5 {
        t + 1f32.copysign(x)
    } else {
        t
    }
}

/// The super-block part of output `(c, r)` for every weight row `r` and activation row `c`.
fn portable_rows(w: WeightRows<'_>, rows: usize, act: &QuantizedActs, out: Columns<'_>) {
    let (k, m) = (w.k, act.m);
    let supers = k / SUPER;
    let per_scales = act.scales.len() / m.max(1);
    for r in 0..rows {
        let wq = &w.qs[r * k..][..k];
        let ws = &w.scales[r * k / QK..];
        for c in 0..m {
            let xq = &act.qs[c * k..][..k];
            let xs = &act.scales[c * per_scales..];
            let corr = &act.corr[c * 16 * supers..];
            let mut total = 0f32;
            for s in 0..supers {
                let base = s * SUPER;
                let mut lanes = [0i32; 16];
                for t in 0..4 {
                    for (j, lane) in lanes.iter_mut().enumerate() {
                        for e in 0..4 {
                            let p = base + 64 * t + 4 * j + e;
                            *lane += wq[p] as i32 * xq[p] as i32;
                        }
                    }
                }
                for (j, &lane) in lanes.iter().enumerate() {
                    let dw = ws[8 * s + j % 8].to_f32();
                    total += (lane + corr[16 * s + j]) as f32 * (dw * xs[16 * s + j]);
                }
            }
            out.set(c, r, total);
        }
    }
}

/// Adds the tail blocks (past the last whole super-block) to output `(c, r)`.
fn tail_rows(w: WeightRows<'_>, rows: usize, act: &QuantizedActs, out: Columns<'_>) {
    let (k, m) = (w.k, act.m);
    let supers = k / SUPER;
    let full = supers * SUPER;
    if full == k {
        return;
    }
    let per_scales = act.scales.len() / m.max(1);
    for r in 0..rows {
        let wq = &w.qs[r * k..][..k];
        let ws = &w.scales[r * k / QK..];
        for c in 0..m {
            let xq = &act.qs[c * k..][..k];
            let xs = &act.scales[c * per_scales + 16 * supers..];
            let mut total = 0f32;
            for (t, b) in (full / QK..k / QK).enumerate() {
                let sum: i32 = (b * QK..b * QK + QK)
                    .map(|i| wq[i] as i8 as i32 * xq[i] as i32)
                    .sum();
                total += sum as f32 * (ws[b].to_f32() * xs[t]);
            }
            out.add(c, r, total);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Columns, QK, QuantizedActs, SUPER, WeightRows};
    use crate::kernels::cpu::lane_sums::x86::store_tile;
    use crate::kernels::cpu::prefetch::{prefetch_l2_range, prefetch_l2_share};

    /// How many decode tiles ahead the weights are prefetched.
    const PREFETCH_TILES: usize = 4;

    /// Super-block part of output `(c, r)`: 8 weight rows at a time against one activation
    /// row (decode), else 4 × 4 tiles; leftovers with narrower tiles.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn rows(
        w: WeightRows<'_>,
        rows: usize,
        act: &QuantizedActs,
        out: Columns<'_>,
    ) {
        assert!(w.qs.len() >= rows * w.k && act.qs.len() >= act.m * act.k && out.len() >= rows);
        if w.k < SUPER {
            return;
        }
        let m = act.m;
        let mut r = 0;
        // SAFETY (all calls): the features are enabled here; the assert above bounds every row.
        unsafe {
            if m == 1 {
                while r + 8 <= rows {
                    tile::<8, 1>(w, r, act, 0, out);
                    r += 8;
                }
            }
            while r + 4 <= rows {
                cols::<4>(w, r, act, out);
                r += 4;
            }
            while r < rows {
                cols::<1>(w, r, act, out);
                r += 1;
            }
        }
    }

    #[inline(always)]
    unsafe fn cols<const RA: usize>(
        w: WeightRows<'_>,
        r0: usize,
        act: &QuantizedActs,
        out: Columns<'_>,
    ) {
        // The next `RA` weight rows into L2, a share before each pass over the activation
        // rows (as in `bf16.rs`); the scales, an eighth as large, before the first pass.
        let k = w.k;
        let next = w.qs.as_ptr().wrapping_add((r0 + RA) * k);
        let mut c = 0;
        // SAFETY: forwarded from `rows`.
        unsafe {
            if act.m >= 4 {
                let scales = w.scales.as_ptr().wrapping_add((r0 + RA) * (k / QK));
                prefetch_l2_range(scales.cast(), RA * (k / QK) * 2);
            }
            while c + 4 <= act.m {
                prefetch_l2_share(next, RA * k, act.m.div_ceil(4), c / 4);
                tile::<RA, 4>(w, r0, act, c, out);
                c += 4;
            }
            while c < act.m {
                tile::<RA, 1>(w, r0, act, c, out);
                c += 1;
            }
        }
    }

    /// Weight rows `r0..r0 + RA` against activation rows `c0..c0 + RB`.
    // `c` and `r` are the tile's coordinates; both index the accumulator grid.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn tile<const RA: usize, const RB: usize>(
        w: WeightRows<'_>,
        r0: usize,
        act: &QuantizedActs,
        c0: usize,
        out: Columns<'_>,
    ) {
        let (k, m) = (w.k, act.m);
        let supers = k / SUPER;
        let per_scales = act.scales.len() / m;
        // SAFETY: every offset below stays inside row r0 + r < rows of `w` and row c0 + c < m
        // of `act` (checked by the callers), within its first `supers * 256` bytes.
        unsafe {
            let mut facc = [[_mm512_setzero_ps(); RB]; RA];
            // Decode reads each weight once: the rows four tiles ahead are fetched into L2 while
            // this one computes, a super-block's share per step (the hardware prefetcher alone
            // leaves rows of 768 bytes at half the bandwidth; one tile ahead is too late).
            let ahead = r0 + PREFETCH_TILES * RA;
            let next = w.qs.as_ptr().wrapping_add(ahead * k);
            if RB == 1 {
                let scales = w.scales.as_ptr().wrapping_add(ahead * (k / QK));
                prefetch_l2_range(scales.cast(), RA * (k / QK) * 2);
            }
            for s in 0..supers {
                if RB == 1 {
                    prefetch_l2_range(next.wrapping_add(s * RA * SUPER), RA * SUPER);
                }
                let mut wsc = [_mm512_setzero_ps(); RA];
                for (r, v) in wsc.iter_mut().enumerate() {
                    let p = w.scales.as_ptr().add((r0 + r) * (k / QK) + 8 * s);
                    let h = _mm_loadu_si128(p.cast());
                    *v = _mm512_cvtph_ps(_mm256_broadcastsi128_si256(h));
                }
                // Each weight register is loaded once and used against all RB activation
                // rows; the integer sums start from the rows' corrections.
                let mut acc = [[_mm512_setzero_si512(); RB]; RA];
                let mut xs = [_mm512_setzero_ps(); RB];
                for c in 0..RB {
                    let row = c0 + c;
                    xs[c] = _mm512_loadu_ps(act.scales.as_ptr().add(row * per_scales + 16 * s));
                    let corr = _mm512_loadu_si512(
                        act.corr.as_ptr().add(row * 16 * supers + 16 * s).cast(),
                    );
                    for r in 0..RA {
                        acc[r][c] = corr;
                    }
                }
                for t in 0..4 {
                    let x: [__m512i; RB] = std::array::from_fn(|c| {
                        let xp = act.qs.as_ptr().add((c0 + c) * k + s * SUPER + 64 * t);
                        _mm512_loadu_si512(xp.cast())
                    });
                    for r in 0..RA {
                        let wp = w.qs.as_ptr().add((r0 + r) * k + s * SUPER + 64 * t);
                        let wt = _mm512_loadu_si512(wp.cast());
                        for c in 0..RB {
                            acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], wt, x[c]);
                        }
                    }
                }
                for r in 0..RA {
                    for c in 0..RB {
                        let scale = _mm512_mul_ps(wsc[r], xs[c]);
                        facc[r][c] =
                            _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][c]), scale, facc[r][c]);
                    }
                }
            }
            store_tile(&facc, out, r0, c0);
        }
    }
}

/// Quantizes a row-major f32 `(rows, k)` matrix to ggml Q8_0 bytes and repacks it.
pub(crate) fn quantize_matrix(values: &[f32], rows: usize, k: usize) -> Q8Matrix {
    use super::quant_formats::GgmlFormat;
    let row_bytes = GgmlFormat::Q8_0.bytes_for(k);
    let mut m = Q8Matrix {
        rows,
        k,
        qs: vec![0u8; rows * k],
        scales: vec![f16::ZERO; rows * k / QK],
    };
    m.qs.par_chunks_mut(k)
        .zip(m.scales.par_chunks_mut(k / QK))
        .zip(values.par_chunks(k))
        .for_each_init(
            || vec![0u8; row_bytes],
            |buf, ((qs, scales), x)| {
                GgmlFormat::Q8_0.quantize_row(x, buf);
                repack_row(buf, qs, scales);
            },
        );
    m
}

/// The scale of block `b` of a ggml Q8_0 row (for tests and diagnostics).
#[cfg(test)]
fn ggml_scale(row: &[u8], b: usize) -> f32 {
    f16_at(&row[34 * b..])
}

#[cfg(test)]
#[path = "q8_0_tests.rs"]
mod tests;
