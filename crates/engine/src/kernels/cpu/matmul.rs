//! The register-tiled matmul behind `Linear`: `x (m, k) · w (n, k)ᵀ` with both operands
//! k-contiguous, as PyTorch checkpoints store weights. Built for the small row counts of decode
//! steps; prefill chunks go through it too, a block of rows at a time, to be batch-invariant.
//!
//! A tile holds `RW` weight rows × `RX` activation rows of partial dot products in SIMD
//! registers; each weight vector loaded is used `RX` times and each activation vector `RW` times,
//! so the loop is bound by FMAs rather than loads, and each weight row comes from memory once per
//! call. Weight rows are split over threads (`row_split`), each task writing its columns of the
//! result in place; the activations (m × k floats) stay in L2.
//! Invariant: SIMD code here runs only for an [`Isa`] of that kind, and only `detect_isa` makes
//! one, so it never runs on a CPU without the instruction set.
//!
//! Batch invariance: for a given [`Isa`], every output element is computed the same way whatever
//! the tile it falls in: lane `l` of one register sums `a[i] · b[i]` for `i ≡ l` (mod the lane
//! width) in increasing `i` with FMAs, the lanes are added in the register's fixed reduction
//! order, and the products past the last whole register (`k` not a multiple of the width) are
//! summed left to right and added last. Tiles only choose which sums share a loop, so the result
//! for activation row `r` does not depend on `m`, on `r`'s place in the batch, on the number of
//! weight rows or on the thread count.

use super::isa::{Isa, IsaKind};
use super::prefetch::prefetch_l2_range;
use super::row_split::{Columns, par_columns};

/// A SIMD register of f32 lanes: the few operations the tiled kernel needs.
///
/// Implementations are `unsafe` because they may only run on CPUs with the matching instruction set;
/// an [`Isa`] of that kind guarantees it.
trait Lanes: Copy {
    /// Floats per register.
    const WIDTH: usize;
    unsafe fn zero() -> Self;
    /// Loads `WIDTH` floats from `p`.
    unsafe fn load(p: *const f32) -> Self;
    /// `a * b + acc`.
    unsafe fn fmadd(a: Self, b: Self, acc: Self) -> Self;
    /// Sum of the lanes.
    unsafe fn sum(self) -> f32;
    /// Writes a tile's sums: `acc[r][c]` is output `(c0 + c, r0 + r)`.
    #[inline(always)]
    unsafe fn store_tile<const RA: usize, const RB: usize>(
        acc: &[[Self; RB]; RA],
        out: Columns<'_>,
        r0: usize,
        c0: usize,
    ) {
        for (r, row) in acc.iter().enumerate() {
            for (c, v) in row.iter().enumerate() {
                // SAFETY: forwarded from the caller.
                out.set(c0 + c, r0 + r, unsafe { v.sum() });
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Columns, Lanes};
    use crate::kernels::cpu::lane_sums::x86 as lane_sums;
    use std::arch::x86_64::*;

    #[derive(Clone, Copy)]
    pub(super) struct Avx512(__m512);

    impl Lanes for Avx512 {
        const WIDTH: usize = 16;
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn zero() -> Self {
            Self(_mm512_setzero_ps())
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: the caller passes a pointer to WIDTH readable floats.
            Self(unsafe { _mm512_loadu_ps(p) })
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn fmadd(a: Self, b: Self, acc: Self) -> Self {
            Self(_mm512_fmadd_ps(a.0, b.0, acc.0))
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn sum(self) -> f32 {
            // SAFETY: AVX-512 F is enabled here.
            unsafe { lane_sums::sum1(self.0) }
        }
        /// Tiles of 8 × 1 and 4 × 4 summed together (`lane_sums`), in [`Self::sum`]'s order.
        #[inline(always)]
        unsafe fn store_tile<const RA: usize, const RB: usize>(
            acc: &[[Self; RB]; RA],
            out: Columns<'_>,
            r0: usize,
            c0: usize,
        ) {
            let regs: [[__m512; RB]; RA] =
                std::array::from_fn(|r| std::array::from_fn(|c| acc[r][c].0));
            // SAFETY: callers hold AVX-512 F (an `Avx512` exists only then).
            unsafe { lane_sums::store_tile(&regs, out, r0, c0) }
        }
    }

    #[derive(Clone, Copy)]
    pub(super) struct Avx2(__m256);

    impl Lanes for Avx2 {
        const WIDTH: usize = 8;
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn zero() -> Self {
            Self(_mm256_setzero_ps())
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: the caller passes a pointer to WIDTH readable floats.
            Self(unsafe { _mm256_loadu_ps(p) })
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn fmadd(a: Self, b: Self, acc: Self) -> Self {
            Self(_mm256_fmadd_ps(a.0, b.0, acc.0))
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn sum(self) -> f32 {
            // SAFETY: AVX2 is enabled here.
            unsafe { lane_sums::sum_avx2(self.0) }
        }
    }
}

/// `count` rows of a matrix, each `stride` floats after the previous; the kernels read the first
/// `k` floats of each.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rows<'a> {
    /// The floats, starting at the first row.
    pub(crate) data: &'a [f32],
    /// Number of rows.
    pub(crate) count: usize,
    /// Distance between row starts, in floats.
    pub(crate) stride: usize,
}

impl<'a> Rows<'a> {
    /// `data` as dense rows of `width` floats.
    pub(crate) fn dense(data: &'a [f32], width: usize) -> Self {
        let count = data.len().checked_div(width).unwrap_or(0);
        Self {
            data,
            count,
            stride: width,
        }
    }

    /// Rows `from..from + count`.
    fn sub(self, from: usize, count: usize) -> Self {
        Self {
            data: &self.data[(from * self.stride).min(self.data.len())..],
            count,
            stride: self.stride,
        }
    }

    /// Whether `k` floats of every row are inside `data`.
    fn holds(self, k: usize) -> bool {
        self.count == 0 || (self.count - 1) * self.stride + k <= self.data.len()
    }
}

/// Bytes of activations one pass over the weights takes when there are many rows (prefill
/// chunks): the block stays in L2 while the weight rows stream past it. Blocks do not change any
/// output element's sum (see the module's invariant); each extra block reads the weights once
/// more, so they are as large as L2 comfortably holds.
const ROW_BLOCK_BYTES: usize = 512 << 10;

/// Activation rows per pass over the weights for rows of `k` floats: 8 to 128.
fn row_block(k: usize) -> usize {
    (ROW_BLOCK_BYTES / (4 * k.max(1))).clamp(8, 128)
}

/// `(m, k) · (n, k)ᵀ`, returned row-major `(m, n)`; weight rows are split over rayon threads,
/// activation rows taken [`row_block`] at a time.
pub(crate) fn matmul_nt(isa: Isa, x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    assert!(
        x.len() == m * k && w.len() == n * k,
        "matmul_nt: operands are not (m, k) and (n, k)"
    );
    let block = row_block(k);
    if m <= block {
        return matmul_block(isa, x, m, k, w, n);
    }
    let mut out = Vec::with_capacity(m * n);
    for start in (0..m).step_by(block) {
        let rows = block.min(m - start);
        out.extend(matmul_block(
            isa,
            &x[start * k..(start + rows) * k],
            rows,
            k,
            w,
            n,
        ));
    }
    out
}

/// [`matmul_nt`] for one block of activation rows.
fn matmul_block(isa: Isa, x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    if k == 0 {
        return vec![0f32; m * n];
    }
    let x = Rows {
        data: x,
        count: m,
        stride: k,
    };
    par_columns(m, n, 4 * k, |cols| {
        let rows = Rows::dense(&w[cols.first() * k..][..cols.len() * k], k);
        dot_rows(isa, rows, x, k, cols)
    })
}

/// Output `(j, i)` = `a_i · b_j` over the first `k` floats of each row, on this thread: `a` is
/// streamed once (the large operand, the weights), `b` re-read per tile.
pub(crate) fn dot_rows(isa: Isa, a: Rows<'_>, b: Rows<'_>, k: usize, out: Columns<'_>) {
    assert!(a.holds(k) && b.holds(k), "dot_rows: rows shorter than k");
    assert!(out.len() >= a.count, "dot_rows: output too small");
    match isa.kind() {
        // SAFETY: an `Isa` of this kind exists only once AVX-512F was detected at run time.
        #[cfg(target_arch = "x86_64")]
        IsaKind::Avx512 => unsafe { rows_avx512(a, b, k, out) },
        // SAFETY: an `Isa` of this kind exists only once AVX2 and FMA were detected.
        #[cfg(target_arch = "x86_64")]
        IsaKind::Avx2Fma => unsafe { rows_avx2(a, b, k, out) },
        IsaKind::Portable => rows_portable(a, b, k, out),
    }
}

/// Tile shapes: 4 × 4 accumulators plus 4 weight vectors and one activation vector fit AVX-512's
/// 32 registers; a single activation row (batch-1 decode) streams 8 weight rows at once so that
/// enough independent FMA chains hide the latency.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn rows_avx512(a: Rows<'_>, b: Rows<'_>, k: usize, out: Columns<'_>) {
    // SAFETY: the features are enabled on this function; `dot_rows` checked the sizes.
    unsafe {
        if b.count == 1 {
            a_tiles::<x86::Avx512, 8, 1>(a, b, k, out)
        } else {
            a_tiles::<x86::Avx512, 4, 4>(a, b, k, out)
        }
    }
}

/// AVX2 has 16 registers: 2 × 4 accumulators plus 2 weight vectors and an activation vector.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_avx2(a: Rows<'_>, b: Rows<'_>, k: usize, out: Columns<'_>) {
    // SAFETY: as above.
    unsafe {
        if b.count == 1 {
            a_tiles::<x86::Avx2, 8, 1>(a, b, k, out)
        } else {
            a_tiles::<x86::Avx2, 2, 4>(a, b, k, out)
        }
    }
}

/// Walks `a` in groups of `RA` rows (then single rows), each against all of `b`.
#[inline(always)]
unsafe fn a_tiles<V: Lanes, const RA: usize, const RB: usize>(
    a: Rows<'_>,
    b: Rows<'_>,
    k: usize,
    out: Columns<'_>,
) {
    let mut r = 0;
    // SAFETY (both calls): forwarded from the caller.
    unsafe {
        while r + RA <= a.count {
            b_tiles::<V, RA, RB>(a.sub(r, RA), b, k, out, r);
            r += RA;
        }
        while r < a.count {
            b_tiles::<V, 1, RB>(a.sub(r, 1), b, k, out, r);
            r += 1;
        }
    }
}

/// The `RA` rows of `a` (output columns `r0..`) against all rows of `b`, `RB` at a time,
/// prefetching the next `RA` rows of `a` (they follow in memory) into L2, spread evenly over the
/// passes over `b`.
#[inline(always)]
unsafe fn b_tiles<V: Lanes, const RA: usize, const RB: usize>(
    a: Rows<'_>,
    b: Rows<'_>,
    k: usize,
    out: Columns<'_>,
    r0: usize,
) {
    let passes = b.count.div_ceil(RB);
    let steps = k / V::WIDTH;
    let next = Prefetch {
        base: a.data.as_ptr().wrapping_add(RA * a.stride),
        // Assumes dense rows (strided operands are small and cache-resident anyway).
        floats_per_step: (RA * V::WIDTH).div_ceil(passes.max(1)),
    };
    let mut c = 0;
    // SAFETY (all calls): forwarded from the caller.
    unsafe {
        while c + RB <= b.count {
            tile::<V, RA, RB>(a, b, k, c, (out, r0), next.pass(c / RB, steps));
            c += RB;
        }
        let last = next.pass(c / RB, steps);
        match b.count - c {
            0 => {}
            1 => tile::<V, RA, 1>(a, b, k, c, (out, r0), last),
            2 => tile::<V, RA, 2>(a, b, k, c, (out, r0), last),
            3 => tile::<V, RA, 3>(a, b, k, c, (out, r0), last),
            rest => unreachable!("tile widths are at most 4; {rest} rows left over"),
        }
    }
}

/// Which part of the next tile of `a` one pass over the current tile prefetches.
#[derive(Clone, Copy)]
struct Prefetch {
    /// Start of the next tile's part for this pass (may be past the end of the data).
    base: *const f32,
    /// Floats of it to prefetch per vector step of the pass.
    floats_per_step: usize,
}

impl Prefetch {
    /// The share of pass `pass` when each pass has `steps` vector steps.
    fn pass(self, pass: usize, steps: usize) -> Self {
        Self {
            base: self.base.wrapping_add(pass * steps * self.floats_per_step),
            ..self
        }
    }

    /// Prefetches this pass's floats for vector step `step`, one hint per cache line.
    #[inline(always)]
    fn step(self, step: usize) {
        let start = self.base.wrapping_add(step * self.floats_per_step);
        prefetch_l2_range(start.cast(), self.floats_per_step * size_of::<f32>());
    }
}

/// Output `(c0 + c, r0 + r)` = `a_r · b_(c0 + c)` for `r < RA`, `c < RB`.
#[inline(always)]
unsafe fn tile<V: Lanes, const RA: usize, const RB: usize>(
    a: Rows<'_>,
    b: Rows<'_>,
    k: usize,
    c0: usize,
    (out, r0): (Columns<'_>, usize),
    next: Prefetch,
) {
    let (sa, sb) = (a.stride, b.stride);
    assert!(a.data.len() >= (RA - 1) * sa + k && b.data.len() >= (c0 + RB - 1) * sb + k);
    let (ap, bp) = (a.data.as_ptr(), b.data[c0 * sb..].as_ptr());
    // SAFETY: the assert above keeps every pointer below inside `a` and `b`: vector loads start
    // at `i` with `i + WIDTH <= k` within a row of at least `k` floats.
    unsafe {
        let mut acc = [[V::zero(); RB]; RA];
        let mut i = 0;
        while i + V::WIDTH <= k {
            let mut av = [V::zero(); RA];
            next.step(i / V::WIDTH);
            for (r, v) in av.iter_mut().enumerate() {
                *v = V::load(ap.add(r * sa + i));
            }
            for c in 0..RB {
                let bv = V::load(bp.add(c * sb + i));
                for (acc_r, &a_r) in acc.iter_mut().zip(&av) {
                    acc_r[c] = V::fmadd(a_r, bv, acc_r[c]);
                }
            }
            i += V::WIDTH;
        }
        V::store_tile(&acc, out, r0, c0);
        if i < k {
            for r in 0..RA {
                for c in 0..RB {
                    let tail: f32 = (i..k)
                        .map(|j| a.data[r * sa + j] * b.data[(c0 + c) * sb + j])
                        .sum();
                    out.add(c0 + c, r0 + r, tail);
                }
            }
        }
    }
}

/// Portable fallback: one dot product at a time, written so the compiler can vectorise it.
fn rows_portable(a: Rows<'_>, b: Rows<'_>, k: usize, out: Columns<'_>) {
    const LANES: usize = 16;
    for r in 0..a.count {
        let ar = &a.data[r * a.stride..][..k];
        for c in 0..b.count {
            let br = &b.data[c * b.stride..][..k];
            let mut acc = [0f32; LANES];
            let (ca, cb) = (ar.chunks_exact(LANES), br.chunks_exact(LANES));
            let tail: f32 = ca
                .remainder()
                .iter()
                .zip(cb.remainder())
                .map(|(x, y)| x * y)
                .sum();
            for (x, y) in ca.zip(cb) {
                for l in 0..LANES {
                    acc[l] += x[l] * y[l];
                }
            }
            out.set(c, r, acc.iter().sum::<f32>() + tail);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|l| x[i * k + l] as f64 * w[j * k + l] as f64)
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    #[test]
    fn every_isa_matches_naive_for_odd_shapes() {
        // Row counts around each tile width, k with and without a vector tail, n around the
        // per-task and per-tile row counts.
        for isa in Isa::all_supported() {
            for (m, k, n) in [
                (1, 1, 1),
                (1, 100, 70),
                (3, 65, 33),
                (2, 128, 64),
                (5, 300, 97),
                (4, 16, 4),
                (7, 48, 65),
                (16, 64, 40),
                (17, 72, 33),
                (32, 33, 31),
                (2, 0, 3),
            ] {
                let x: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                    .collect();
                let w: Vec<f32> = (0..n * k)
                    .map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0)
                    .collect();
                let got = matmul_nt(isa, &x, m, k, &w, n);
                let want = naive(&x, m, k, &w, n);
                assert_eq!(got.len(), want.len());
                for (idx, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "{isa:?} m={m} k={k} n={n} at {idx}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn dot_rows_reads_only_k_floats_of_strided_rows() {
        let (k, stride_a, stride_b) = (37, 50, 41);
        for isa in Isa::all_supported() {
            for (na, nb) in [(1, 1), (5, 1), (9, 6), (4, 17)] {
                let a = pseudo(na * stride_a, 3);
                let b = pseudo(nb * stride_b, 4);
                let rows_a = Rows {
                    data: &a,
                    count: na,
                    stride: stride_a,
                };
                let rows_b = Rows {
                    data: &b,
                    count: nb,
                    stride: stride_b,
                };
                let got = par_columns(nb, na, 4 * k, |cols| {
                    dot_rows(isa, rows_a.sub(cols.first(), cols.len()), rows_b, k, cols)
                });
                for i in 0..na {
                    for j in 0..nb {
                        let want: f64 = (0..k)
                            .map(|l| a[i * stride_a + l] as f64 * b[j * stride_b + l] as f64)
                            .sum();
                        let g = got[j * na + i];
                        assert!(
                            (g as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{isa:?} {na}x{nb} at ({i},{j}): {g} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_whatever_the_batch_around_it() {
        // 150 activation rows: past several row blocks. k below, at and past the lane widths and
        // with tails; n around the tile heights (4, 8) and the rows per task (32).
        let total = 150;
        for isa in Isa::all_supported() {
            // k = 20000 makes row blocks of 8, so the windows cross several.
            for (k, n) in [
                (1, 5),
                (15, 9),
                (16, 4),
                (17, 33),
                (100, 70),
                (771, 37),
                (20000, 6),
            ] {
                let x = pseudo(total * k, 1);
                let w = pseudo(n * k, 2);
                let all = matmul_nt(isa, &x, total, k, &w, n);
                let windows = [(0, 1), (3, 1), (149, 1), (1, 2), (5, 3), (7, 4), (2, 5)];
                let more = [(0, 32), (9, 33), (60, 64), (63, 65), (20, 129), (1, 149)];
                for (from, m) in windows.into_iter().chain(more) {
                    let got = matmul_nt(isa, &x[from * k..(from + m) * k], m, k, &w, n);
                    for (i, (a, b)) in got.iter().zip(&all[from * n..]).enumerate() {
                        assert_eq!(
                            a.to_bits(),
                            b.to_bits(),
                            "{isa:?} k={k} n={n}: row {} of {m} from {from}, column {}",
                            i / n,
                            i % n
                        );
                    }
                }
            }
        }
    }

    fn pseudo(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i + seed) * 7919 % 211) as f32 - 105.0) / 105.0)
            .collect()
    }
}
