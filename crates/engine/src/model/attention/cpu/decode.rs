//! Decode attention on the CPU: one token's query against its sequence's cached keys, per
//! (token, group of heads), streaming the paged blocks in order.

use rayon::prelude::*;

use super::TokenSlot;
use super::softmax::softmax_causal;
use crate::kernels::cpu::isa::{Isa, with_isa};
use crate::kernels::cpu::matmul::{Rows, dot_rows};
use crate::kv::KvGeometry;
use crate::kv::storage::LayerKv;

/// Fills the output rows of every token not marked `tiled`. Tasks are (token, group of heads):
/// whole tokens when there are enough of them to keep every thread busy, smaller head groups for
/// a handful of decodes.
#[allow(clippy::too_many_arguments)]
pub(super) fn attend_tokens(
    isa: Isa,
    geom: &KvGeometry,
    layer: &LayerKv,
    slots: &[TokenSlot<'_>],
    tiled: &[bool],
    q: &[f32],
    slopes: &[f32],
    scale: f32,
    out: &mut [f32],
) {
    let (hd, nh) = (geom.head_dim, geom.n_heads);
    let heads_per_task = heads_per_task(nh, slots.len(), rayon::current_num_threads());
    out.par_chunks_mut(heads_per_task * hd)
        .enumerate()
        .filter(|(i, _)| !tiled[i * heads_per_task / nh])
        .for_each_init(Vec::new, |scores: &mut Vec<f32>, (i, o)| {
            let (t, first_head) = (i * heads_per_task / nh, i * heads_per_task % nh);
            let query = &q[t * nh * hd + first_head * hd..][..heads_per_task * hd];
            with_isa(
                isa,
                #[inline(always)]
                || {
                    attend_heads(
                        isa, geom, layer, slots[t], first_head, query, slopes, scale, scores, o,
                    )
                },
            );
        });
}

/// The largest divisor of `n_heads` that still gives at least four tasks per thread.
fn heads_per_task(n_heads: usize, tokens: usize, threads: usize) -> usize {
    let wanted = (n_heads * tokens)
        .div_ceil(4 * threads.max(1))
        .clamp(1, n_heads);
    (1..=wanted)
        .rev()
        .find(|d| n_heads.is_multiple_of(*d))
        .unwrap_or(1)
}

/// One token's query against heads `heads.start..heads.start + out.len() / head_dim`: softmax
/// over keys `0..=pos`, weighted sum of values into `out` (one `head_dim` row per head).
/// Each pass walks the sequence's blocks in order and, within a block, the heads in order: a
/// block holds all heads' keys (then values) contiguously, so the reads stream instead of
/// jumping between blocks once per head. Inlined into `with_isa` so its loops are vectorised for
/// the CPU at hand.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn attend_heads(
    isa: Isa,
    geom: &KvGeometry,
    layer: &LayerKv,
    slot: TokenSlot<'_>,
    first_head: usize,
    query: &[f32],
    slopes: &[f32],
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let bs = geom.block_size;
    let hd = geom.head_dim;
    let heads = out.len() / hd;
    let len = slot.pos + 1;
    let blocks = &slot.block_table[..len.div_ceil(bs)];
    // Scores laid out [head][key]: a block's keys for one head are `bs` contiguous rows, scored
    // against the query with one tiled product.
    scores.clear();
    scores.resize(heads * len, 0.0);
    for (b, &block) in blocks.iter().enumerate() {
        let n = bs.min(len - b * bs);
        for i in 0..heads {
            let base = geom.offset(block as usize, first_head + i, 0);
            let keys = Rows::dense(&layer.k[base..base + n * hd], hd);
            let q = Rows::dense(&query[i * hd..(i + 1) * hd], hd);
            dot_rows(isa, keys, q, hd, &mut scores[i * len + b * bs..][..n]);
        }
    }
    for (i, head_scores) in scores.chunks_exact_mut(len).enumerate() {
        softmax_causal(head_scores, slot.pos, slopes[first_head + i], scale);
    }
    out.fill(0.0);
    for (b, &block) in blocks.iter().enumerate() {
        let n = bs.min(len - b * bs);
        for (i, head_out) in out.chunks_exact_mut(hd).enumerate() {
            let base = geom.offset(block as usize, first_head + i, 0);
            let probs = &scores[i * len + b * bs..][..n];
            for (value, &p) in layer.v[base..base + n * hd].chunks_exact(hd).zip(probs) {
                for (acc, &x) in head_out.iter_mut().zip(value) {
                    *acc += p * x;
                }
            }
        }
    }
}
