//! Paged attention on the CPU: writes the step's new K/V into their cache slots, then computes
//! causal ALiBi attention for every new token by reading keys and values through its sequence's
//! block table. Nothing is concatenated or copied per step; work is spread over (token, head)
//! pairs with rayon.
//!
//! For a query at absolute position `p` the keys are positions `0..=p` of the same sequence (all
//! already in the cache once this step's tokens are written), and the score of key `j` is
//! `scale · q·k_j + slope_h · (j − p)`.

use std::ops::Range;

use rayon::prelude::*;

use super::attention_prefill::{MIN_TILED_RUN, attend_long_runs, runs, softmax_causal};
use super::skinny_kernel::{Isa, Rows, detect_isa, dot_rows, with_isa};

use crate::kv_cache::KvGeometry;
use crate::kv_cache::cache::LayerKv;

/// Where one new token sits: its sequence's block table and its absolute position.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TokenSlot<'a> {
    /// Block ids of the token's sequence, covering positions `0..=pos`.
    pub(crate) block_table: &'a [u32],
    /// Absolute position of the token.
    pub(crate) pos: usize,
}

/// Writes new tokens' keys and values (rows of width `n_heads · head_dim`) into the layer pool.
pub(crate) fn write_kv(
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

/// Attention output (rows of width `n_heads · head_dim`) for every new token's query. Prompt
/// chunks of at least `MIN_TILED_RUN` tokens go through the tiled kernel of
/// `attention_prefill.rs`; decode tokens and short chunks are computed one (token, head) at a time.
pub(crate) fn paged_attention(
    geom: &KvGeometry,
    layer: &LayerKv,
    slots: &[TokenSlot<'_>],
    q: &[f32],
    slopes: &[f32],
    scale: f32,
) -> Vec<f32> {
    let hd = geom.head_dim;
    let nh = geom.n_heads;
    let long_runs: Vec<Range<usize>> = runs(slots)
        .into_iter()
        .filter(|run| run.len() >= MIN_TILED_RUN)
        .collect();
    let mut tiled = vec![false; slots.len()];
    for run in &long_runs {
        tiled[run.clone()].fill(true);
    }
    let isa = detect_isa();
    let mut out = vec![0f32; slots.len() * nh * hd];
    // Tasks are (token, group of heads): whole tokens when there are enough of them to keep
    // every thread busy, smaller head groups for a handful of decodes.
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
    let long_out = attend_long_runs(isa, geom, layer, slots, &long_runs, q, slopes, scale);
    for (run, rows) in long_runs.iter().zip(long_out) {
        out[run.start * nh * hd..run.end * nh * hd].copy_from_slice(&rows);
    }
    out
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

/// Deterministic values in [-1, 1] for kernel tests (xorshift), shared by the attention tests.
#[cfg(test)]
pub(crate) fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Naive contiguous attention for one sequence, straight from the definition.
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        nh: usize,
        hd: usize,
        slopes: &[f32],
        scale: f32,
    ) -> Vec<f32> {
        let t = q.len() / (nh * hd);
        let mut out = vec![0f32; q.len()];
        for i in 0..t {
            for h in 0..nh {
                let qi = &q[i * nh * hd + h * hd..][..hd];
                let s: Vec<f32> = (0..=i)
                    .map(|j| {
                        let kj = &k[j * nh * hd + h * hd..][..hd];
                        scale * qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>()
                            + slopes[h] * (j as f32 - i as f32)
                    })
                    .collect();
                let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f32 = e.iter().sum();
                for (j, p) in e.iter().enumerate() {
                    for d in 0..hd {
                        out[i * nh * hd + h * hd + d] += p / z * v[j * nh * hd + h * hd + d];
                    }
                }
            }
        }
        out
    }

    #[test]
    fn paged_matches_contiguous_for_scattered_blocks_and_chunks() {
        let (nh, hd, bs, len) = (3, 12, 4, 11);
        let geom = KvGeometry {
            num_blocks: 8,
            block_size: bs,
            n_heads: nh,
            head_dim: hd,
        };
        let q = pseudo_random(len * nh * hd, 1);
        let k = pseudo_random(len * nh * hd, 2);
        let v = pseudo_random(len * nh * hd, 3);
        let slopes = [0.5, 0.25, 0.125];
        let expected = reference(&q, &k, &v, nh, hd, &slopes, 0.3);

        // Blocks deliberately out of order; the prompt arrives in two chunks (7 then 4 tokens).
        let table = [5u32, 0, 6];
        let mut layer = LayerKv {
            k: vec![0.0; 8 * geom.block_len()],
            v: vec![0.0; 8 * geom.block_len()],
        };
        let mut got = Vec::new();
        for range in [0..7, 7..len] {
            let slots: Vec<TokenSlot<'_>> = range
                .clone()
                .map(|pos| TokenSlot {
                    block_table: &table,
                    pos,
                })
                .collect();
            let w = nh * hd;
            let rows = |x: &[f32]| x[range.start * w..range.end * w].to_vec();
            write_kv(&geom, &mut layer, &slots, &rows(&k), &rows(&v));
            got.extend(paged_attention(
                &geom,
                &layer,
                &slots,
                &rows(&q),
                &slopes,
                0.3,
            ));
        }
        for (a, b) in got.iter().zip(&expected) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn tiled_prompt_chunks_match_contiguous_in_a_mixed_batch() {
        // Sequence A: a 5-token chunk (per-token path), then 70 tokens (tiled path, three query
        // tiles, reading A's cached prefix) batched with sequence B's whole 9-token prompt and
        // a decode token of sequence C. Head dim 20 exercises the kernels' vector tails.
        let (nh, hd, bs) = (3, 20, 4);
        let (len_a, len_b, len_c) = (75, 9, 6);
        let geom = KvGeometry {
            num_blocks: 32,
            block_size: bs,
            n_heads: nh,
            head_dim: hd,
        };
        let w = nh * hd;
        let slopes = [0.5, 0.25, 0.0625];
        let seq = |len: usize, seed: u32| {
            let (q, k, v) = (
                pseudo_random(len * w, seed),
                pseudo_random(len * w, seed + 1),
                pseudo_random(len * w, seed + 2),
            );
            let expected = reference(&q, &k, &v, nh, hd, &slopes, 0.2);
            (q, k, v, expected)
        };
        let (a, b, c) = (seq(len_a, 10), seq(len_b, 20), seq(len_c, 30));
        let table_a: Vec<u32> = (0..19).map(|i| 31 - i).collect();
        let table_b = [2u32, 0, 1];
        let table_c = [5u32, 4];
        let mut layer = LayerKv {
            k: vec![0.0; 32 * geom.block_len()],
            v: vec![0.0; 32 * geom.block_len()],
        };
        fn slot(block_table: &[u32], pos: usize) -> TokenSlot<'_> {
            TokenSlot { block_table, pos }
        }
        let (table_a, table_b, table_c) = (&table_a[..], &table_b[..], &table_c[..]);
        let rows = |x: &[f32], r: Range<usize>| x[r.start * w..r.end * w].to_vec();

        // Step 1: A's first 5 tokens and C's first 5 tokens.
        let mut slots: Vec<TokenSlot<'_>> = (0..5).map(|p| slot(table_a, p)).collect();
        slots.extend((0..5).map(|p| slot(table_c, p)));
        let cat = |x: &[f32], y: &[f32]| [x, y].concat();
        let (q1, k1, v1) = (
            cat(&rows(&a.0, 0..5), &rows(&c.0, 0..5)),
            cat(&rows(&a.1, 0..5), &rows(&c.1, 0..5)),
            cat(&rows(&a.2, 0..5), &rows(&c.2, 0..5)),
        );
        write_kv(&geom, &mut layer, &slots, &k1, &v1);
        let first = paged_attention(&geom, &layer, &slots, &q1, &slopes, 0.2);

        // Step 2: A's remaining 70, all of B, C's decode token.
        let mut slots: Vec<TokenSlot<'_>> = (5..len_a).map(|p| slot(table_a, p)).collect();
        slots.extend((0..len_b).map(|p| slot(table_b, p)));
        slots.push(slot(table_c, 5));
        let part = |i: usize| {
            [
                rows(&[&a.0, &a.1, &a.2][i][..], 5..len_a),
                rows(&[&b.0, &b.1, &b.2][i][..], 0..len_b),
                rows(&[&c.0, &c.1, &c.2][i][..], 5..6),
            ]
            .concat()
        };
        write_kv(&geom, &mut layer, &slots, &part(1), &part(2));
        let second = paged_attention(&geom, &layer, &slots, &part(0), &slopes, 0.2);

        let check = |got: &[f32], want: &[f32], what: &str| {
            assert_eq!(got.len(), want.len(), "{what}");
            for (i, (g, e)) in got.iter().zip(want).enumerate() {
                assert!((g - e).abs() < 1e-5, "{what} at {i}: {g} vs {e}");
            }
        };
        check(
            &[&first[..5 * w], &second[..(len_a - 5) * w]].concat(),
            &a.3,
            "sequence A",
        );
        let b_rows = (len_a - 5) * w..(len_a - 5 + len_b) * w;
        check(&second[b_rows.clone()], &b.3, "sequence B");
        check(
            &[&first[5 * w..], &second[b_rows.end..]].concat(),
            &c.3,
            "sequence C",
        );
    }
}
