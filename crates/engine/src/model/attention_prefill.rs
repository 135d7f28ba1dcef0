//! Paged attention for prompt chunks on the CPU. A chunk is a run of consecutive positions of
//! one sequence; its queries share keys, so per head we gather the sequence's keys and values out
//! of the paged pool once, and compute the scores of a tile of queries against all keys they may
//! see as one register-tiled product (`skinny_kernel::dot_rows`) instead of one dot product at a
//! time. Same definition as `attention::attend_one`: for a query at position `p`, keys `0..=p`,
//! score `scale · q·k_j + slope · (j − p)`, softmax, weighted sum of values.

use std::ops::Range;

use rayon::prelude::*;

use super::attention::TokenSlot;
use super::fast_math;
use super::skinny_kernel::{Isa, Rows, dot_rows, with_isa};
use crate::kv_cache::KvGeometry;
use crate::kv_cache::cache::LayerKv;

/// Runs shorter than this go through the per-token kernel: gathering would not pay off.
pub(crate) const MIN_TILED_RUN: usize = 8;
/// Queries per tile: their scores against up to a few thousand keys stay in L2.
const QUERY_TILE: usize = 32;

/// Ranges of `slots` that are consecutive positions of one sequence (same block table).
pub(crate) fn runs(slots: &[TokenSlot<'_>]) -> Vec<Range<usize>> {
    let mut runs: Vec<Range<usize>> = Vec::new();
    for (i, slot) in slots.iter().enumerate() {
        let continues = i > 0 && {
            let prev = slots[i - 1];
            std::ptr::eq(prev.block_table, slot.block_table) && prev.pos + 1 == slot.pos
        };
        match runs.last_mut() {
            Some(run) if continues => run.end = i + 1,
            _ => runs.push(i..i + 1),
        }
    }
    runs
}

/// Attention output of one head for every token of `run` (a chunk of one sequence), as rows of
/// `head_dim` floats. `q` holds all of the step's queries, rows of `n_heads · head_dim`.
/// Inlined into `with_isa` so its loops are vectorised for the CPU at hand.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn attend_run(
    isa: Isa,
    geom: &KvGeometry,
    layer: &LayerKv,
    run: &[TokenSlot<'_>],
    q: &[f32],
    head: usize,
    slope: f32,
    scale: f32,
) -> Vec<f32> {
    let (hd, nh, bs) = (geom.head_dim, geom.n_heads, geom.block_size);
    let first_pos = run[0].pos;
    let keys_len = run[run.len() - 1].pos + 1;
    let table = run[0].block_table;

    // Keys as dense rows; values transposed (one row per channel) so that P·V is also a product
    // of k-contiguous rows.
    let mut keys = Vec::with_capacity(keys_len * hd);
    let mut values_t = vec![0f32; hd * keys_len];
    for j in 0..keys_len {
        let at = geom.offset(table[j / bs] as usize, head, j % bs);
        keys.extend_from_slice(&layer.k[at..at + hd]);
        for (d, &v) in layer.v[at..at + hd].iter().enumerate() {
            values_t[d * keys_len + j] = v;
        }
    }
    let queries: Vec<f32> = (0..run.len())
        .flat_map(|t| &q[t * nh * hd + head * hd..][..hd])
        .copied()
        .collect();

    let mut out = vec![0f32; run.len() * hd];
    let mut probs = Vec::new();
    for tile_start in (0..run.len()).step_by(QUERY_TILE) {
        let rows = QUERY_TILE.min(run.len() - tile_start);
        // The tile's last query sees the most keys; earlier ones get zero weight beyond their own.
        let visible = first_pos + tile_start + rows;
        probs.clear();
        probs.resize(rows * visible, 0.0);
        let tile_queries = Rows::dense(&queries[tile_start * hd..(tile_start + rows) * hd], hd);
        dot_rows(
            isa,
            tile_queries,
            Rows::dense(&keys[..visible * hd], hd),
            hd,
            &mut probs,
        );
        for (r, row) in probs.chunks_exact_mut(visible).enumerate() {
            softmax_causal(row, first_pos + tile_start + r, slope, scale);
        }
        let values = Rows {
            data: &values_t,
            count: hd,
            stride: keys_len,
        };
        let tile_out = &mut out[tile_start * hd..(tile_start + rows) * hd];
        dot_rows(isa, Rows::dense(&probs, visible), values, visible, tile_out);
    }
    out
}

/// Turns raw `q·k_j` of the query at position `pos` into attention weights in place: scaled,
/// ALiBi-biased and normalised over `j ≤ pos`, zero beyond. Shared with the decode kernel.
#[inline(always)]
pub(crate) fn softmax_causal(row: &mut [f32], pos: usize, slope: f32, scale: f32) {
    let (seen, unseen) = row.split_at_mut(pos + 1);
    let mut max = f32::NEG_INFINITY;
    for (j, s) in seen.iter_mut().enumerate() {
        *s = scale * *s + slope * (j as f32 - pos as f32);
        max = max.max(*s);
    }
    let mut sum = 0f32;
    for s in seen.iter_mut() {
        *s = fast_math::exp(*s - max);
        sum += *s;
    }
    let inv = 1.0 / sum;
    seen.iter_mut().for_each(|s| *s *= inv);
    unseen.fill(0.0);
}

/// For every run of at least `MIN_TILED_RUN` tokens, its attention output rows (all heads) as
/// `(run, rows of n_heads · head_dim)`, computed in parallel over (run, head).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_long_runs(
    isa: Isa,
    geom: &KvGeometry,
    layer: &LayerKv,
    slots: &[TokenSlot<'_>],
    long_runs: &[Range<usize>],
    q: &[f32],
    slopes: &[f32],
    scale: f32,
) -> Vec<Vec<f32>> {
    let (hd, nh) = (geom.head_dim, geom.n_heads);
    let per_head: Vec<Vec<f32>> = long_runs
        .par_iter()
        .flat_map_iter(|run| (0..nh).map(move |h| (run.clone(), h)))
        .map(|(run, h)| {
            let queries = &q[run.start * nh * hd..run.end * nh * hd];
            with_isa(
                isa,
                #[inline(always)]
                || attend_run(isa, geom, layer, &slots[run], queries, h, slopes[h], scale),
            )
        })
        .collect();
    long_runs
        .iter()
        .zip(per_head.chunks_exact(nh))
        .map(|(run, heads)| {
            let mut rows = vec![0f32; run.len() * nh * hd];
            for (h, head_out) in heads.iter().enumerate() {
                for (t, src) in head_out.chunks_exact(hd).enumerate() {
                    rows[t * nh * hd + h * hd..][..hd].copy_from_slice(src);
                }
            }
            rows
        })
        .collect()
}
