//! Attention for prompt chunks on the CPU. A chunk is a run of consecutive positions of one
//! sequence; one task per (run, head, tile of `QUERY_TILE` queries), so every thread works on a
//! single long prompt. A task walks the key segments its queries see (causal: none past its last
//! query), runs the tile kernel over each for its queries `MAX_TILE_QUERIES` at a time, and merges
//! the segment states left to right — the definition of `attention_tile`, so the output does not
//! depend on where the chunk starts or which queries share a tile. Scratch is O(tile): the
//! queries, one accumulator row per query, and the output rows.

use std::ops::Range;

use super::Step;
use crate::kernels::cpu::attention_tile::{
    MAX_TILE_QUERIES, SoftmaxState, attend_segment, finish, merge, padded, segment_len,
};
use crate::kernels::cpu::isa::{Isa, with_isa};
use crate::kernels::cpu::kv_elem::KvElem;
use crate::kernels::cpu::thread_team;
use crate::kv::storage::Pools;

/// Queries per task: enough to reuse each segment's keys from L2 several times, few enough that
/// one prompt chunk makes many tasks.
const QUERY_TILE: usize = 32;

/// Fills the output rows of every slot in `runs` (each a run of consecutive positions).
pub(super) fn attend_runs<T: KvElem>(
    isa: Isa,
    step: &Step<'_>,
    pools: &Pools<T>,
    runs: &[Range<usize>],
    out: &mut [f32],
) {
    let (nh, hd) = (step.geom.n_heads, step.geom.head_dim);
    let tasks: Vec<(Range<usize>, usize)> = runs
        .iter()
        .flat_map(|run| {
            (run.start..run.end)
                .step_by(QUERY_TILE)
                .flat_map(move |s| (0..nh).map(move |h| (s..(s + QUERY_TILE).min(run.end), h)))
        })
        .collect();
    let results: Vec<Vec<f32>> = thread_team::map(tasks.len(), |i| {
        let (tile, head) = &tasks[i];
        with_isa(
            isa,
            #[inline(always)]
            || attend_tile(isa, step, pools, tile.clone(), *head),
        )
    });
    for ((tile, head), rows) in tasks.iter().zip(results) {
        for (t, row) in tile.clone().zip(rows.chunks_exact(hd)) {
            out[(t * nh + head) * hd..][..hd].copy_from_slice(row);
        }
    }
}

/// Output rows (`head_dim` each) of head `head` for the consecutive slots `tile`.
#[inline(always)]
fn attend_tile<T: KvElem>(
    isa: Isa,
    step: &Step<'_>,
    pools: &Pools<T>,
    tile: Range<usize>,
    head: usize,
) -> Vec<f32> {
    let hd = step.geom.head_dim;
    let stride = padded(hd);
    let n = tile.len();
    let first_pos = step.slots[tile.start].pos;
    let keys_end = first_pos + n; // the last query sees keys 0..first_pos + n
    let pools_h = step.head(pools, tile.start, head);
    let mut q = vec![0f32; n * hd];
    for (i, t) in tile.clone().enumerate() {
        step.scaled_query(t, head, &mut q[i * hd..(i + 1) * hd]);
    }
    let mut totals = vec![SoftmaxState::EMPTY; n];
    let mut total_acc = vec![0f32; n * stride];
    let mut part = [SoftmaxState::EMPTY; MAX_TILE_QUERIES];
    let mut part_acc = vec![0f32; MAX_TILE_QUERIES * stride];
    let seg = segment_len(step.geom.block_size);
    for start in (0..keys_end).step_by(seg) {
        let keys = start..(start + seg).min(keys_end);
        for g in (0..n).step_by(MAX_TILE_QUERIES) {
            let m = MAX_TILE_QUERIES.min(n - g);
            let qg = &q[g * hd..(g + m) * hd];
            let states = &mut part[..m];
            attend_segment(
                isa,
                &pools_h,
                qg,
                first_pos + g,
                keys.clone(),
                states,
                &mut part_acc,
            );
            for r in 0..m {
                let acc = &mut total_acc[(g + r) * stride..][..stride];
                merge(
                    &mut totals[g + r],
                    acc,
                    part[r],
                    &part_acc[r * stride..][..stride],
                );
            }
        }
    }
    let mut out = vec![0f32; n * hd];
    for (r, row) in out.chunks_exact_mut(hd).enumerate() {
        finish(totals[r], &total_acc[r * stride..], row);
    }
    out
}
