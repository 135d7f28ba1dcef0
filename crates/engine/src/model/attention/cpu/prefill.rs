//! Paged attention for prompt chunks on the CPU. A chunk is a run of consecutive positions of
//! one sequence; its queries share keys, so per head we gather the sequence's keys and values out
//! of the paged pool once, and compute the scores of a tile of queries against all keys they may
//! see as one register-tiled product (`kernels::cpu::matmul::dot_rows`) instead of one dot product at a
//! time. Same definition as the decode kernel: for a query at position `p`, keys `0..=p`,
//! score `scale · q·k_j + slope · (j − p)`, softmax, weighted sum of values.

use std::ops::Range;

use rayon::prelude::*;

use super::TokenSlot;
use super::softmax::softmax_causal;
use crate::kernels::cpu::isa::{Isa, with_isa};
use crate::kernels::cpu::matmul::{Rows, dot_rows};
use crate::kv::KvGeometry;
use crate::kv::storage::LayerKv;
/// Queries per tile: their scores against up to a few thousand keys stay in L2.
const QUERY_TILE: usize = 32;

/// Attention output of one head for every token of `run` (a chunk of one sequence), as rows of
/// `head_dim` floats. `q` holds all of the step's queries, rows of `n_heads · head_dim`.
/// Inlined into `with_isa` so its loops are vectorised for the CPU at hand.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn attend_run(
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

/// For every run of at least `MIN_TILED_RUN` tokens, its attention output rows (all heads) as
/// `(run, rows of n_heads · head_dim)`, computed in parallel over (run, head).
#[allow(clippy::too_many_arguments)]
pub(super) fn attend_long_runs(
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
