//! The parallel loop of the decode hot path. A decode step runs ~50 short parallel regions per
//! token (every matmul, attention, GELU), a few tens of microseconds each. Rayon's idle workers
//! fall asleep between them and must be woken for the next (perf: 1.4 of 2 CPUs busy at batch
//! 1, ~200 context switches per token). candle's barrier pool keeps its workers spinning
//! between regions and runs part of each region on the calling thread, so it is used whenever
//! it has as many threads as the rayon pool the engine runs in (the `--threads` setting);
//! otherwise the loop falls back to rayon.

use rayon::prelude::*;

/// `f(i, chunk_i)` for each `chunk`-long piece of `data` (the last may be shorter), in parallel.
pub(crate) fn for_each_chunk_mut<F>(data: &mut [f32], chunk: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    let chunk = chunk.max(1);
    let tasks = data.len().div_ceil(chunk);
    let pool = candle_core::utils::barrier_pool();
    if tasks > 1 && pool.n_workers() + 1 == rayon::current_num_threads() {
        let len = data.len();
        let base = SharedSlice(data.as_mut_ptr());
        pool.execute_chunked(tasks, |range| {
            for i in range {
                let start = i * chunk;
                let end = len.min(start + chunk);
                // SAFETY: task `i` alone gets `start..end`; the ranges of different tasks are
                // disjoint and inside `data`, which outlives `execute_chunked` (it returns
                // only when every task has finished).
                let part =
                    unsafe { std::slice::from_raw_parts_mut(base.get().add(start), end - start) };
                f(i, part);
            }
        });
    } else {
        data.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, part)| f(i, part));
    }
}

/// The start of a slice shared by tasks that each write their own disjoint range of it.
#[derive(Clone, Copy)]
struct SharedSlice(*mut f32);

// SAFETY: only `for_each_chunk_mut` hands it out, to tasks with disjoint ranges.
unsafe impl Send for SharedSlice {}
// SAFETY: as above.
unsafe impl Sync for SharedSlice {}

impl SharedSlice {
    /// The pointer (a method, so closures capture the wrapper rather than the raw field).
    fn get(self) -> *mut f32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chunk_is_visited_once_with_its_index() {
        for (len, chunk) in [(0, 3), (1, 1), (10, 3), (64, 8), (1000, 7), (5, 100)] {
            let mut data = vec![0f32; len];
            for_each_chunk_mut(&mut data, chunk, |i, part| {
                assert!(part.len() <= chunk);
                for (j, x) in part.iter_mut().enumerate() {
                    *x += (i * chunk + j) as f32 + 1.0;
                }
            });
            let want: Vec<f32> = (0..len).map(|k| k as f32 + 1.0).collect();
            assert_eq!(data, want, "len {len} chunk {chunk}");
        }
    }
}
