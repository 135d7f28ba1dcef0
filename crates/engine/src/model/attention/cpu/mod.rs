//! Paged attention on the CPU: writes the step's new K/V into their cache slots ([`store_kv`],
//! rounding to the cache's element type), then computes causal ALiBi attention for every new
//! token by reading keys and values through its sequence's block table ([`paged_attention`]).
//! Nothing is concatenated or copied per step, and no score matrix is built: both paths below run
//! the flash-style tile kernel of `kernels::cpu::attention_tile` (online softmax over tiles of
//! keys, bias from positions), which also widens f16/bf16 pools in registers.
//!
//! Prompt chunks (runs of at least `MIN_TILED_RUN` consecutive positions of one sequence) go to
//! `prefill.rs`, parallel over (run, head, query tile); decode tokens and short chunks to
//! `decode.rs`, parallel over (token, head, key segment) so that one long context keeps every
//! thread busy (flash-decoding). For a query at absolute position `p` the keys are positions
//! `0..=p` of the same sequence (all in the cache once this step's tokens are written), scored
//! `scale · q·k_j + slope_h · (j − p)`.
//!
//! Batch invariance: both paths compute, per (query, head), exactly the definition in
//! `attention_tile`'s docs (fixed segments and tiles at absolute key positions, merged left to
//! right), so a token's attention output is bitwise the same whether it came in a long chunk, a
//! short one, a decode step, or next to any other sequences, and whatever the thread count.

mod decode;
mod prefill;
#[cfg(test)]
mod tests;

use std::ops::Range;

use crate::kernels::cpu::attention_tile::HeadPools;
use crate::kernels::cpu::isa::{Isa, detect_isa};
use crate::kernels::cpu::kv_elem::KvElem;
use crate::kv::KvGeometry;
use crate::kv::storage::{LayerKv, Pools};

/// Runs at least this long go through the query-tiled path; shorter ones go token by token
/// (whose key segments spread over the threads instead).
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
            let src = t * width + h * hd;
            let at = (block, h, in_block);
            layer.write(geom, at, &k[src..src + hd], &v[src..src + hd]);
        }
    }
}

/// Attention output (rows of width `n_heads · head_dim`) for every new token's query.
pub(crate) fn paged_attention(
    geom: &KvGeometry,
    layer: &LayerKv,
    slots: &[TokenSlot<'_>],
    q: &[f32],
    slopes: &[f32],
    scale: f32,
) -> Vec<f32> {
    attention_with(detect_isa(), geom, layer, slots, q, slopes, scale)
}

/// [`paged_attention`] with the instruction set chosen by the caller (tests compare them).
fn attention_with(
    isa: Isa,
    geom: &KvGeometry,
    layer: &LayerKv,
    slots: &[TokenSlot<'_>],
    q: &[f32],
    slopes: &[f32],
    scale: f32,
) -> Vec<f32> {
    let step = Step {
        geom,
        slots,
        q,
        slopes,
        scale,
    };
    match layer {
        LayerKv::F32(pools) => attend(isa, &step, pools),
        LayerKv::F16(pools) => attend(isa, &step, pools),
        LayerKv::Bf16(pools) => attend(isa, &step, pools),
    }
}

/// One layer's attention inputs for a step.
#[derive(Clone, Copy)]
struct Step<'a> {
    geom: &'a KvGeometry,
    slots: &'a [TokenSlot<'a>],
    /// Queries, rows of `n_heads · head_dim`, one per slot.
    q: &'a [f32],
    slopes: &'a [f32],
    scale: f32,
}

impl<'a> Step<'a> {
    /// Head `head` of `pools` as the tile kernel reads it, for the sequence of slot `t`.
    fn head<T: KvElem>(&self, pools: &'a Pools<T>, t: usize, head: usize) -> HeadPools<'a, T> {
        let g = self.geom;
        HeadPools {
            k: &pools.k,
            v: &pools.v,
            block_table: self.slots[t].block_table,
            block_size: g.block_size,
            head_dim: g.head_dim,
            block_stride: g.block_len(),
            head_offset: g.head_base(0, head),
            slope: self.slopes[head],
        }
    }

    /// Query of slot `t`, head `head`, multiplied by the softmax scale, into `dst`.
    fn scaled_query(&self, t: usize, head: usize, dst: &mut [f32]) {
        let hd = self.geom.head_dim;
        let row = &self.q[(t * self.geom.n_heads + head) * hd..][..hd];
        for (d, &x) in dst.iter_mut().zip(row) {
            *d = x * self.scale;
        }
    }
}

fn attend<T: KvElem>(isa: Isa, step: &Step<'_>, pools: &Pools<T>) -> Vec<f32> {
    let width = step.geom.n_heads * step.geom.head_dim;
    let (long, short): (Vec<Range<usize>>, Vec<Range<usize>>) = runs(step.slots)
        .into_iter()
        .partition(|run| run.len() >= MIN_TILED_RUN);
    let mut out = vec![0f32; step.slots.len() * width];
    let singles: Vec<usize> = short.into_iter().flatten().collect();
    decode::attend_tokens(isa, step, pools, &singles, &mut out);
    prefill::attend_runs(isa, step, pools, &long, &mut out);
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
