//! The CPU attention kernels against a naive contiguous reference, over scattered blocks,
//! chunked prompts and mixed batches.

use std::ops::Range;

use super::*;
use crate::model::attention::pseudo_random;

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
                seq: 0,
                block_table: &table,
                pos,
            })
            .collect();
        let w = nh * hd;
        let rows = |x: &[f32]| x[range.start * w..range.end * w].to_vec();
        store_kv(&geom, &mut layer, &slots, &rows(&k), &rows(&v));
        got.extend(paged_attention(
            &geom,
            &layer,
            &slots,
            &rows(&q),
            &slopes,
            0.3,
        ));
    }
    assert_eq!(got.len(), expected.len());
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
    fn slot(seq: usize, block_table: &[u32], pos: usize) -> TokenSlot<'_> {
        TokenSlot {
            seq,
            block_table,
            pos,
        }
    }
    let (table_a, table_b, table_c) = (&table_a[..], &table_b[..], &table_c[..]);
    let rows = |x: &[f32], r: Range<usize>| x[r.start * w..r.end * w].to_vec();

    // Step 1: A's first 5 tokens and C's first 5 tokens.
    let mut slots: Vec<TokenSlot<'_>> = (0..5).map(|p| slot(0, table_a, p)).collect();
    slots.extend((0..5).map(|p| slot(2, table_c, p)));
    let cat = |x: &[f32], y: &[f32]| [x, y].concat();
    let (q1, k1, v1) = (
        cat(&rows(&a.0, 0..5), &rows(&c.0, 0..5)),
        cat(&rows(&a.1, 0..5), &rows(&c.1, 0..5)),
        cat(&rows(&a.2, 0..5), &rows(&c.2, 0..5)),
    );
    store_kv(&geom, &mut layer, &slots, &k1, &v1);
    let first = paged_attention(&geom, &layer, &slots, &q1, &slopes, 0.2);

    // Step 2: A's remaining 70, all of B, C's decode token.
    let mut slots: Vec<TokenSlot<'_>> = (5..len_a).map(|p| slot(0, table_a, p)).collect();
    slots.extend((0..len_b).map(|p| slot(1, table_b, p)));
    slots.push(slot(2, table_c, 5));
    let part = |i: usize| {
        [
            rows(&[&a.0, &a.1, &a.2][i][..], 5..len_a),
            rows(&[&b.0, &b.1, &b.2][i][..], 0..len_b),
            rows(&[&c.0, &c.1, &c.2][i][..], 5..6),
        ]
        .concat()
    };
    store_kv(&geom, &mut layer, &slots, &part(1), &part(2));
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
