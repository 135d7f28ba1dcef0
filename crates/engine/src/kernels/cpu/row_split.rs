//! Splitting `x (m, k) · W (n, k)ᵀ` over threads by weight rows, each task writing its columns
//! of the row-major `(m, n)` result in place.
//!
//! Writing in place spares a transposition of the whole result after the call (single-threaded,
//! it took an eighth of a bf16 prefill). Task sizes follow the work: a decode step (one
//! activation row) over a matrix of short rows (k = 768) would otherwise spend much of its time
//! starting tasks of a few kilobytes each.
//!
//! Invariant: the tasks of one call own disjoint column ranges, and [`Columns`] lets a task
//! address only its own, only during the call (its lifetime is the call's borrow of the output).

use std::marker::PhantomData;

use super::thread_team;

/// Weight bytes times activation rows a task should cover at least.
const TASK_WORK: usize = 256 << 10;
/// Tasks per thread at least, so that uneven progress evens out.
const TASKS_PER_THREAD: usize = 4;

/// One task's columns `first..first + len` of the `(m, n)` output.
#[derive(Clone, Copy)]
pub(crate) struct Columns<'a> {
    base: *mut f32,
    m: usize,
    n: usize,
    first: usize,
    len: usize,
    /// The output buffer this writes into, borrowed for the call.
    out: PhantomData<&'a mut [f32]>,
}

// SAFETY: a `Columns` is only made by `par_columns`, which hands each task a disjoint column
// range of a buffer borrowed for `'a`; tasks take any `Columns<'_>`, so none keeps one past the
// call, and writes through it never overlap another task's.
unsafe impl Send for Columns<'_> {}
unsafe impl Sync for Columns<'_> {}

impl<'a> Columns<'a> {
    /// All of `out`, an `(m, n)` matrix, with no columns owned yet.
    fn whole(out: &'a mut [f32], m: usize, n: usize) -> Self {
        assert_eq!(out.len(), m * n, "Columns::whole: not an (m, n) buffer");
        Self {
            base: out.as_mut_ptr(),
            m,
            n,
            first: 0,
            len: 0,
            out: PhantomData,
        }
    }

    /// Columns `first..first + len` of the same output.
    fn part(&self, first: usize, len: usize) -> Self {
        Self {
            first,
            len,
            ..*self
        }
    }

    /// The first weight row (output column) this task owns.
    pub(crate) fn first(&self) -> usize {
        self.first
    }

    /// How many weight rows it owns.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// A pointer to `count` contiguous outputs: activation row `row`, columns `first + col..`.
    /// Panics unless they lie inside this task's range.
    #[inline(always)]
    pub(crate) fn at(&self, row: usize, col: usize, count: usize) -> *mut f32 {
        assert!(
            row < self.m && col + count <= self.len,
            "Columns::at out of range"
        );
        // SAFETY: `row < m` and `first + col + count <= first + len <= n`, inside the buffer.
        unsafe { self.base.add(row * self.n + self.first + col) }
    }

    /// A pointer to `count` outputs in each of the `rows` activation rows from `row`, columns
    /// `first + col..`; rows are [`Self::stride`] values apart. Panics unless they lie inside
    /// this task's range.
    #[inline(always)]
    pub(crate) fn block(&self, row: usize, rows: usize, col: usize, count: usize) -> *mut f32 {
        assert!(
            rows > 0 && row + rows <= self.m && col + count <= self.len,
            "Columns::block out of range"
        );
        self.at(row, col, count)
    }

    /// Values between the starts of two activation rows of the output.
    pub(crate) fn stride(&self) -> usize {
        self.n
    }

    /// Sets one output.
    #[inline(always)]
    pub(crate) fn set(&self, row: usize, col: usize, value: f32) {
        // SAFETY: `at` checked the range; the range belongs to this task alone.
        unsafe { *self.at(row, col, 1) = value }
    }

    /// Adds to one output.
    #[inline(always)]
    pub(crate) fn add(&self, row: usize, col: usize, value: f32) {
        // SAFETY: as in `set`.
        unsafe { *self.at(row, col, 1) += value }
    }
}

/// Weight rows per task for `n` rows of `row_bytes` each against `m` activation rows: a
/// multiple of 16 (the AMX weight tile, two of the decode tiles), large enough to be worth a
/// task, small enough for [`TASKS_PER_THREAD`].
fn rows_per_task(n: usize, row_bytes: usize, m: usize) -> usize {
    let for_work = TASK_WORK.div_ceil(row_bytes.max(1) * m.max(1));
    let tasks = TASKS_PER_THREAD * rayon::current_num_threads();
    let for_balance = n.div_ceil(tasks.max(1));
    for_work.min(for_balance).max(1).next_multiple_of(16)
}

/// Runs `task` on every column range of a zeroed `(m, n)` output, in parallel, and returns it.
pub(crate) fn par_columns(
    m: usize,
    n: usize,
    row_bytes: usize,
    task: impl Fn(Columns<'_>) + Sync + Send,
) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    let per = rows_per_task(n, row_bytes, m);
    let all = Columns::whole(&mut out, m, n);
    thread_team::run(n.div_ceil(per), |t| {
        let first = t * per;
        task(all.part(first, per.min(n - first)))
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_cover_every_column_once() {
        for (m, n, row_bytes) in [(1, 50432, 816), (1, 768, 816), (512, 3072, 816), (3, 5, 7)] {
            let out = par_columns(m, n, row_bytes, |cols| {
                for r in 0..m {
                    for c in 0..cols.len() {
                        cols.add(r, c, (r * n + cols.first() + c) as f32 + 1.0);
                    }
                }
            });
            for (i, &v) in out.iter().enumerate() {
                assert_eq!(v, i as f32 + 1.0, "m={m} n={n}: element {i}");
            }
        }
    }

    #[test]
    fn task_sizes_are_tile_multiples_with_enough_tasks() {
        let threads = rayon::current_num_threads();
        for (n, row_bytes, m) in [(50432, 816, 1), (768, 816, 1), (3072, 816, 512), (8, 1, 1)] {
            let per = rows_per_task(n, row_bytes, m);
            assert_eq!(per % 16, 0);
            assert!(
                n.div_ceil(per) >= (TASKS_PER_THREAD * threads).min(n / 16),
                "n={n}: {per} rows per task"
            );
        }
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn a_task_cannot_address_its_neighbours_columns() {
        par_columns(2, 64, 1 << 20, |cols| {
            cols.set(0, cols.len(), 1.0);
        });
    }
}
