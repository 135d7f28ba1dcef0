//! Paged attention on the CPU: writes the step's new K/V into their cache slots ([`store_kv`]),
//! then computes causal ALiBi attention for every new token by reading keys and values through
//! its sequence's block table ([`paged_attention`]). Nothing is concatenated or copied per
//! step. Decode tokens and short chunks go to `decode.rs`, prompt chunks to `prefill.rs`; both
//! normalise scores with `softmax.rs`.
//!
//! For a query at absolute position `p` the keys are positions `0..=p` of the same sequence (all
//! already in the cache once this step's tokens are written), and the score of key `j` is
//! `scale · q·k_j + slope_h · (j − p)`.

mod decode;
mod prefill;
mod softmax;
#[cfg(test)]
mod tests;

use std::ops::Range;

use crate::kernels::cpu::isa::detect_isa;
use crate::kv::KvGeometry;
use crate::kv::storage::LayerKv;

/// Runs shorter than this go through the per-token kernel: gathering would not pay off.
const MIN_TILED_RUN: usize = 8;

/// Where one new token sits: its sequence's block table and its absolute position.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TokenSlot<'a> {
    /// Index of the token's sequence in the step's batch (tells sequences apart).
    pub(crate) seq: usize,
    /// Block ids of the token's sequence, covering positions `0..=pos`.
    pub(crate) block_table: &'a [u32],
    /// Absolute position of the token.
    pub(crate) pos: usize,
}

/// Writes new tokens' keys and values (rows of width `n_heads · head_dim`) into the layer pool.
pub(crate) fn store_kv(
    geom: &KvGeometry,
    layer: &mut LayerKv,
    slots: &[TokenSlot<'_>],
    k: &[f32],
    v: &[f32],
) {
    let hd = geom.head_dim;
    let width = geom.n_heads * hd;
    for (t, slot) in slots.iter().enumerate() {
        let block = slot.block_table[slot.pos / geom.block_size] as usize;
        let in_block = slot.pos % geom.block_size;
        for h in 0..geom.n_heads {
            let dst = geom.offset(block, h, in_block);
            let src = t * width + h * hd;
            layer.k[dst..dst + hd].copy_from_slice(&k[src..src + hd]);
            layer.v[dst..dst + hd].copy_from_slice(&v[src..src + hd]);
        }
    }
}

/// Attention output (rows of width `n_heads · head_dim`) for every new token's query. Runs of at
/// least `MIN_TILED_RUN` consecutive tokens of one sequence (prompt chunks) go through the tiled
/// kernel of `prefill.rs`; decode tokens and short chunks through `decode.rs`, one (token, group
/// of heads) at a time.
pub(crate) fn paged_attention(
    geom: &KvGeometry,
    layer: &LayerKv,
    slots: &[TokenSlot<'_>],
    q: &[f32],
    slopes: &[f32],
    scale: f32,
) -> Vec<f32> {
    let width = geom.n_heads * geom.head_dim;
    let long_runs: Vec<Range<usize>> = runs(slots)
        .into_iter()
        .filter(|run| run.len() >= MIN_TILED_RUN)
        .collect();
    let mut tiled = vec![false; slots.len()];
    for run in &long_runs {
        tiled[run.clone()].fill(true);
    }
    let isa = detect_isa();
    let mut out = vec![0f32; slots.len() * width];
    decode::attend_tokens(isa, geom, layer, slots, &tiled, q, slopes, scale, &mut out);
    let long_out = prefill::attend_long_runs(isa, geom, layer, slots, &long_runs, q, slopes, scale);
    for (run, rows) in long_runs.iter().zip(long_out) {
        out[run.start * width..run.end * width].copy_from_slice(&rows);
    }
    out
}

/// Ranges of `slots` that are consecutive positions of one sequence (same block table).
pub(crate) fn runs(slots: &[TokenSlot<'_>]) -> Vec<Range<usize>> {
    let mut runs: Vec<Range<usize>> = Vec::new();
    for (i, slot) in slots.iter().enumerate() {
        let continues = i > 0 && {
            let prev = slots[i - 1];
            prev.seq == slot.seq && prev.pos + 1 == slot.pos
        };
        match runs.last_mut() {
            Some(run) if continues => run.end = i + 1,
            _ => runs.push(i..i + 1),
        }
    }
    runs
}
