//! bf16 weights packed for AMX tiles: `x (m, k) · W (n, k)ᵀ → (m, n)` in f32 with
//! `tdpbf16ps`, for CPUs with AMX (Sapphire Rapids and later Xeons).
//!
//! Layout. A weight tile is 16 output columns × 32 values of k, stored as `tdpbf16ps` reads
//! its second operand: 16 lines of 64 bytes, line `p` holding, for each of the 16 columns, the
//! pair of values `2p, 2p + 1`. Tiles follow each other along k, then along the columns, so
//! one group of 16 columns is one sequential stream (1 KB per 32 values of k). The activations
//! are packed per call into tiles of 16 rows × 32 values, 1 KB each ([`ActTiles`]), and each
//! 16 × 16 block of sums is stored straight into the row-major output.
//!
//! Every output element is summed by the same instructions in the same order whatever the
//! number of activation rows, how they are grouped into tiles, and which task computes them:
//! one `tdpbf16ps` per 32 values of k, in order, into a sum that starts at zero. So a row's
//! result is bitwise independent of the rows beside it. Like every `tdpbf16ps` user this
//! treats bf16 subnormals as zero and flushes subnormal sums, which `vdpbf16ps` does too.
//!
//! Invariants: a [`Bf16Tiles`] holds an [`Amx`] (the instructions are usable), `n` is a
//! multiple of 16 and `k` of 32 ([`Bf16Tiles::fits`]).

use half::bf16;
use rayon::prelude::*;

use super::amx::{Amx, ROWS};
use super::isa::{detect_isa, with_isa};
use super::row_split::{Columns, par_columns};

/// Output columns per weight tile.
const COLS: usize = 16;
/// Values of k per tile.
const DEPTH: usize = 32;

/// One 64-byte line of a weight tile: 16 columns, a pair of bf16 values each.
#[repr(C, align(64))]
#[derive(Clone, Copy, Default)]
struct Line([u32; COLS]);

/// A bf16 `(n, k)` weight matrix in AMX tile order (see the module docs).
pub(crate) struct Bf16Tiles {
    amx: Amx,
    n: usize,
    k: usize,
    lines: Vec<Line>,
}

impl std::fmt::Debug for Bf16Tiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bf16Tiles({} x {})", self.n, self.k)
    }
}

impl Bf16Tiles {
    /// Whether an `(n, k)` matrix can be packed: whole tiles in both directions.
    pub(crate) fn fits(n: usize, k: usize) -> bool {
        n > 0 && k > 0 && n.is_multiple_of(COLS) && k.is_multiple_of(DEPTH)
    }

    /// Packs row-major `w (n, k)`; `None` unless [`Self::fits`].
    pub(crate) fn pack(amx: Amx, w: &[bf16], n: usize, k: usize) -> Option<Self> {
        if !Self::fits(n, k) || w.len() != n * k {
            return None;
        }
        let chunks = k / DEPTH;
        let mut lines = vec![Line::default(); n * k / (2 * COLS)];
        lines
            .par_chunks_mut(chunks * ROWS)
            .enumerate()
            .for_each(|(group, tiles)| {
                for (i, line) in tiles.iter_mut().enumerate() {
                    let (chunk, pair) = (i / ROWS, i % ROWS);
                    for (col, v) in line.0.iter_mut().enumerate() {
                        let at = (group * COLS + col) * k + chunk * DEPTH + 2 * pair;
                        *v = u32::from(w[at].to_bits()) | u32::from(w[at + 1].to_bits()) << 16;
                    }
                }
            });
        Some(Self { amx, n, k, lines })
    }

    /// Output columns (weight rows).
    pub(crate) fn rows(&self) -> usize {
        self.n
    }

    /// Values per weight row.
    pub(crate) fn k(&self) -> usize {
        self.k
    }

    /// Bytes the packed weights take (the same as row-major bf16).
    pub(crate) fn bytes(&self) -> usize {
        self.n * self.k * 2
    }

    /// Weight row `r` widened to f32 into `out` (`k` values): an embedding look-up.
    pub(crate) fn row_f32(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.n && out.len() == self.k, "Bf16Tiles::row_f32");
        let chunks = self.k / DEPTH;
        let (group, col) = (r / COLS, r % COLS);
        let tiles = &self.lines[group * chunks * ROWS..][..chunks * ROWS];
        for (line, pair) in tiles.iter().zip(out.chunks_exact_mut(2)) {
            let v = line.0[col];
            pair[0] = f32::from_bits(v << 16);
            pair[1] = f32::from_bits(v & 0xffff_0000);
        }
    }

    /// `x (m, k) · Wᵀ → (m, n)`, row-major, f32 sums of the bf16 products.
    pub(crate) fn matmul(&self, x: &[bf16], m: usize) -> Vec<f32> {
        self.matmul_tiles(&ActTiles::pack(x, m, self.k, |v| v))
    }

    /// [`Self::matmul`] of f32 rows, each value rounded to bf16 (to nearest even) first.
    pub(crate) fn matmul_f32(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_tiles(&ActTiles::pack(x, m, self.k, bf16::from_f32))
    }

    fn matmul_tiles(&self, x: &ActTiles) -> Vec<f32> {
        assert_eq!(x.k, self.k, "Bf16Tiles: activations of another k");
        par_columns(x.m, self.n, 2 * self.k, |cols| {
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            // SAFETY: `self.amx` proves the tile instructions usable.
            unsafe {
                tiles::columns(self.amx, self, x, cols)
            };
            #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
            {
                let _ = (self.amx, cols);
                unreachable!("an Amx exists only on x86-64 Linux");
            }
        })
    }
}

/// Activation rows `(m, k)` as tiles: per 16 rows and 32 values of k, the rows' 64 bytes one
/// after another (1 KB), so a tile load reads one contiguous block. Read in place, rows
/// `2k` bytes apart, sixteen rows of a tile fall into the same few L1 sets when `2k` is a
/// multiple of 4 KB (MPT-7B's k = 4096), and prefill ran 30 % slower.
struct ActTiles {
    m: usize,
    k: usize,
    /// Row tile `t`, values `32c..`: lines `(t · k/32 + c) · 16..`, one per row.
    lines: Vec<ActLine>,
}

impl ActTiles {
    /// Packs row-major `x (m, k)`, converting each value with `to_bf16`. One pass over the
    /// rows, a small part of the matmul after it: done on the calling thread.
    fn pack<T: Copy>(x: &[T], m: usize, k: usize, to_bf16: impl Fn(T) -> bf16) -> Self {
        assert_eq!(x.len(), m * k, "Bf16Tiles: x is not (m, k)");
        let chunks = k / DEPTH;
        let mut lines = vec![ActLine([bf16::ZERO; DEPTH]); m.div_ceil(ROWS) * chunks * ROWS];
        with_isa(detect_isa(), || {
            for (row, xr) in x.chunks_exact(k).enumerate() {
                let first = row / ROWS * chunks * ROWS + row % ROWS;
                for (c, values) in xr.chunks_exact(DEPTH).enumerate() {
                    let line = &mut lines[first + c * ROWS].0;
                    for (dst, &v) in line.iter_mut().zip(values) {
                        *dst = to_bf16(v);
                    }
                }
            }
        });
        Self { m, k, lines }
    }
}

/// One activation row's 32 values of a tile, on a cache line of its own.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct ActLine([bf16; DEPTH]);

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[allow(unsafe_code)]
mod tiles {
    use super::{ActTiles, Bf16Tiles, COLS, Columns, DEPTH, Line};
    use crate::kernels::cpu::amx::ops::{configure, dot, load, release, store, zero};
    use crate::kernels::cpu::amx::{Amx, ROW_BYTES, ROWS, TileConfig};

    /// Tiles holding sums (tmm0-3) and activations (tmm4-5): the ones whose rows follow the
    /// number of activation rows in a block.
    const ROW_TILES: u8 = 0b0011_1111;

    /// The task's output columns, every activation row: blocks of 2 × 2 tiles (32 rows × 32
    /// columns) while two whole row tiles remain, else one row tile against 4 weight tiles
    /// (a decode step); the last rows (`m % 16`) under a configuration of that many rows.
    ///
    /// # Safety
    /// None beyond the [`Amx`], which proves the instructions usable; the shapes are checked.
    pub(super) unsafe fn columns(_: Amx, w: &Bf16Tiles, x: &ActTiles, out: Columns<'_>) {
        let m = x.m;
        assert!(
            out.first().is_multiple_of(COLS) && out.len().is_multiple_of(COLS),
            "Bf16Tiles: a task's columns are not whole tiles"
        );
        let groups = out.first() / COLS..(out.first() + out.len()) / COLS;
        let (whole, rest) = (m / ROWS, m % ROWS);
        let block = Block { w, x, out };
        assert_eq!(x.lines.len(), m.div_ceil(ROWS) * w.k / DEPTH * ROWS);
        // SAFETY (all calls): AMX is usable (caller); blocks stay inside `x`'s row tiles
        // (the last one has room for 16 rows) and inside the task's columns.
        unsafe {
            if whole > 0 {
                configure(&TileConfig::new(0, ROWS));
                if whole == 1 {
                    block.one_row_tile(0, ROWS, groups.clone());
                } else {
                    for g in groups.clone().step_by(2) {
                        let nb = (groups.end - g).min(2);
                        for t in (0..whole).step_by(2) {
                            block.two_by_two(t * ROWS, (whole - t).min(2), g, nb);
                        }
                    }
                }
            }
            if rest > 0 {
                configure(&TileConfig::new(ROW_TILES, rest));
                block.one_row_tile(whole * ROWS, rest, groups);
            }
            release();
        }
    }

    /// Sum tiles tmm0-3 = 0.
    ///
    /// # Safety
    /// A configuration is loaded (AMX usable).
    #[inline(always)]
    unsafe fn zero_sums() {
        // SAFETY: as the caller guarantees.
        unsafe {
            zero::<0>();
            zero::<1>();
            zero::<2>();
            zero::<3>();
        }
    }

    /// What every block of one task reads and writes.
    struct Block<'a> {
        w: &'a Bf16Tiles,
        x: &'a ActTiles,
        out: Columns<'a>,
    }

    impl Block<'_> {
        /// The activation tile of rows from `row` (a multiple of 16), values `DEPTH * chunk..`.
        fn act(&self, row: usize, chunk: usize) -> *const u8 {
            let chunks = self.w.k / DEPTH;
            std::ptr::from_ref(&self.x.lines[(row / ROWS * chunks + chunk) * ROWS]).cast()
        }

        /// The weight tile of column group `group`, values `DEPTH * chunk..`.
        fn weights(&self, group: usize, chunk: usize) -> *const u8 {
            let chunks = self.w.k / DEPTH;
            std::ptr::from_ref::<Line>(&self.w.lines[(group * chunks + chunk) * ROWS]).cast()
        }

        /// Where the sums of `rows` activation rows from `row` and column group `group` go.
        fn sums(&self, row: usize, rows: usize, group: usize) -> *mut u8 {
            let col = group * COLS - self.out.first();
            self.out.block(row, rows, col, COLS).cast()
        }

        /// Rows `row..row + 16·na` (`na` whole row tiles) against column groups `g..g + nb`;
        /// `na, nb ≤ 2`.
        ///
        /// # Safety
        /// As [`columns`], with a configuration loaded.
        #[inline(always)]
        unsafe fn two_by_two(&self, row: usize, na: usize, g: usize, nb: usize) {
            let chunks = self.w.k / DEPTH;
            let (x_stride, out_stride) = (ROW_BYTES, 4 * self.out.stride());
            // SAFETY: every pointer comes from a checked slice index or `Columns::block`;
            // tiles read at most 16 × 64 contiguous bytes of an activation or weight tile.
            unsafe {
                zero_sums();
                for c in 0..chunks {
                    load::<6>(self.weights(g, c), ROW_BYTES);
                    if nb > 1 {
                        load::<7>(self.weights(g + 1, c), ROW_BYTES);
                    }
                    load::<4>(self.act(row, c), x_stride);
                    dot::<0, 4, 6>();
                    if nb > 1 {
                        dot::<1, 4, 7>();
                    }
                    if na > 1 {
                        load::<5>(self.act(row + ROWS, c), x_stride);
                        dot::<2, 5, 6>();
                        if nb > 1 {
                            dot::<3, 5, 7>();
                        }
                    }
                }
                store::<0>(self.sums(row, ROWS, g), out_stride);
                if nb > 1 {
                    store::<1>(self.sums(row, ROWS, g + 1), out_stride);
                }
                if na > 1 {
                    store::<2>(self.sums(row + ROWS, ROWS, g), out_stride);
                    if nb > 1 {
                        store::<3>(self.sums(row + ROWS, ROWS, g + 1), out_stride);
                    }
                }
            }
        }

        /// The row tile of `rows` rows from `row` against `groups`, four weight tiles at a
        /// time sharing each activation tile.
        ///
        /// # Safety
        /// As [`columns`], with a configuration of `rows` rows loaded.
        #[inline(always)]
        unsafe fn one_row_tile(&self, row: usize, rows: usize, groups: std::ops::Range<usize>) {
            let chunks = self.w.k / DEPTH;
            let (x_stride, out_stride) = (ROW_BYTES, 4 * self.out.stride());
            // SAFETY: as in `two_by_two`.
            unsafe {
                for g in groups.clone().step_by(4) {
                    let nb = (groups.end - g).min(4);
                    zero_sums();
                    for c in 0..chunks {
                        load::<4>(self.act(row, c), x_stride);
                        load::<6>(self.weights(g, c), ROW_BYTES);
                        dot::<0, 4, 6>();
                        if nb > 1 {
                            load::<7>(self.weights(g + 1, c), ROW_BYTES);
                            dot::<1, 4, 7>();
                        }
                        if nb > 2 {
                            load::<6>(self.weights(g + 2, c), ROW_BYTES);
                            dot::<2, 4, 6>();
                        }
                        if nb > 3 {
                            load::<7>(self.weights(g + 3, c), ROW_BYTES);
                            dot::<3, 4, 7>();
                        }
                    }
                    store::<0>(self.sums(row, rows, g), out_stride);
                    if nb > 1 {
                        store::<1>(self.sums(row, rows, g + 1), out_stride);
                    }
                    if nb > 2 {
                        store::<2>(self.sums(row, rows, g + 2), out_stride);
                    }
                    if nb > 3 {
                        store::<3>(self.sums(row, rows, g + 3), out_stride);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::bf16::tests::{
        assert_near_f64_product, assert_rows_are_the_rows_alone, pseudo,
    };

    #[test]
    fn packing_keeps_every_row() {
        // Packing is plain data; it needs no AMX, but a `Bf16Tiles` holds the proof.
        let Some(amx) = Amx::detect() else { return };
        let (n, k) = (48, 96);
        let w = pseudo(n * k, 5);
        let tiles = Bf16Tiles::pack(amx, &w, n, k).expect("fits");
        let mut row = vec![0f32; k];
        for r in 0..n {
            tiles.row_f32(r, &mut row);
            let want: Vec<f32> = w[r * k..][..k].iter().map(|v| v.to_f32()).collect();
            assert_eq!(row, want, "row {r}");
        }
        assert!(Bf16Tiles::pack(amx, &w[..40 * k], 40, k).is_none());
        assert!(!Bf16Tiles::fits(48, 100));
    }

    #[test]
    fn matches_an_f64_product_of_the_bf16_values() {
        let Some(amx) = Amx::detect() else { return };
        for (m, k, n) in [
            (1, 32, 16),
            (3, 96, 48),
            (16, 64, 64),
            (17, 128, 80),
            (45, 64, 32),
        ] {
            let x = pseudo(m * k, 1);
            let w = pseudo(n * k, 2);
            let got = Bf16Tiles::pack(amx, &w, n, k).expect("fits").matmul(&x, m);
            assert_near_f64_product(&got, &x, &w, m, k, n, "amx");
        }
    }

    #[test]
    fn a_rows_bits_do_not_depend_on_the_rows_beside_it() {
        let Some(amx) = Amx::detect() else { return };
        let (k, n) = (2560, 112);
        let x = pseudo(40 * k, 3);
        let tiles = Bf16Tiles::pack(amx, &pseudo(n * k, 4), n, k).expect("fits");
        let alone: Vec<Vec<f32>> = (0..40).map(|i| tiles.matmul(&x[i * k..][..k], 1)).collect();
        for m in [2, 15, 16, 17, 31, 32, 33, 40] {
            let got = tiles.matmul(&x[..m * k], m);
            assert_rows_are_the_rows_alone(&got, &alone, &format!("m={m}"));
        }
    }
}
