//! The CPU attention kernels against a naive contiguous reference — over every instruction set
//! and KV element type, odd lengths, tile and block edges, head counts that are not powers of
//! two, chunks that start mid-block and contexts spanning several key segments — and the batch
//! invariance the module docs promise: the same bits whatever the chunking, path, neighbours or
//! thread count.

use std::ops::Range;

use candle_core::DType;
use half::{bf16, f16};

use super::*;
use crate::kernels::cpu::isa::Isa;
use crate::model::attention::pseudo_random;

/// Naive contiguous attention for one sequence (rows of `nh · hd`), in f64, from the definition.
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
            let s: Vec<f64> = (0..=i)
                .map(|j| {
                    let kj = &k[j * nh * hd + h * hd..][..hd];
                    let dot: f64 = qi.iter().zip(kj).map(|(&a, &b)| a as f64 * b as f64).sum();
                    scale as f64 * dot + slopes[h] as f64 * (j as f64 - i as f64)
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for d in 0..hd {
                let o: f64 = e
                    .iter()
                    .enumerate()
                    .map(|(j, p)| p * v[j * nh * hd + h * hd + d] as f64)
                    .sum();
                out[i * nh * hd + h * hd + d] = (o / z) as f32;
            }
        }
    }
    out
}

/// `x` rounded to the KV element type, as the cache stores it.
fn rounded(x: &[f32], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F16 => x.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
        DType::BF16 => x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
        _ => x.to_vec(),
    }
}

/// One sequence's data: its block table and all its rows of q, k and v.
struct Seq {
    table: Vec<u32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

/// Shape of a test cache.
#[derive(Clone, Copy, Debug)]
struct Shape {
    nh: usize,
    hd: usize,
    bs: usize,
    blocks: usize,
}

impl Shape {
    fn geom(self) -> KvGeometry {
        KvGeometry {
            num_blocks: self.blocks,
            block_size: self.bs,
            n_heads: self.nh,
            head_dim: self.hd,
        }
    }
    fn slopes(self) -> Vec<f32> {
        crate::model::alibi::alibi_slopes(self.nh, 8.0)
    }
}

/// `count` sequences of the given lengths with disjoint, scrambled block tables.
fn sequences(shape: Shape, lens: &[usize], seed: u32) -> Vec<Seq> {
    let w = shape.nh * shape.hd;
    let mut next = shape.blocks as u32;
    lens.iter()
        .enumerate()
        .map(|(i, &len)| {
            let n = len.div_ceil(shape.bs) as u32;
            // Descending ids, so neighbouring positions live in far-apart blocks.
            let table: Vec<u32> = (0..n).map(|b| next - 1 - b).collect();
            next -= n;
            let s = seed + 10 * i as u32;
            Seq {
                table,
                q: pseudo_random(len * w, s),
                k: pseudo_random(len * w, s + 1),
                v: pseudo_random(len * w, s + 2),
            }
        })
        .collect()
}

/// Runs `steps` (each a list of (sequence, positions) chunks, in batch order) through a fresh
/// cache of `dtype` and returns every sequence's output rows in position order.
fn run(
    isa: Isa,
    shape: Shape,
    dtype: DType,
    seqs: &[Seq],
    steps: &[Vec<(usize, Range<usize>)>],
) -> Vec<Vec<f32>> {
    let geom = shape.geom();
    let w = shape.nh * shape.hd;
    let slopes = shape.slopes();
    let mut layer = LayerKv::zeros(dtype, shape.blocks * geom.block_len()).unwrap();
    let mut outs: Vec<Vec<f32>> = seqs.iter().map(|s| vec![f32::NAN; s.q.len()]).collect();
    for step in steps {
        let mut slots = Vec::new();
        let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
        for (s, range) in step {
            let seq = &seqs[*s];
            for pos in range.clone() {
                slots.push(TokenSlot {
                    seq: *s,
                    block_table: &seq.table,
                    pos,
                });
            }
            let rows = range.start * w..range.end * w;
            q.extend_from_slice(&seq.q[rows.clone()]);
            k.extend_from_slice(&seq.k[rows.clone()]);
            v.extend_from_slice(&seq.v[rows]);
        }
        store_kv(&geom, &mut layer, &slots, &k, &v);
        let out = attention_with(isa, &geom, &layer, &slots, &q, &slopes, 0.3);
        for (slot, row) in slots.iter().zip(out.chunks_exact(w)) {
            outs[slot.seq][slot.pos * w..(slot.pos + 1) * w].copy_from_slice(row);
        }
    }
    outs
}

/// Chunks of `sizes` (the last one repeated) covering `0..len` of sequence `s`, one per step.
fn chunked(s: usize, len: usize, sizes: &[usize]) -> Vec<Vec<(usize, Range<usize>)>> {
    let mut steps = Vec::new();
    let mut at = 0;
    let mut i = 0;
    while at < len {
        let n = sizes[i.min(sizes.len() - 1)].min(len - at);
        steps.push(vec![(s, at..at + n)]);
        at += n;
        i += 1;
    }
    steps
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, e)) in got.iter().zip(want).enumerate() {
        assert!((g - e).abs() <= tol, "{what} at {i}: {g} vs {e}");
    }
}

#[test]
fn every_isa_and_dtype_matches_the_reference_over_edges() {
    // (heads, head dim, block size, length, chunk sizes): odd head counts and widths (vector
    // tails), blocks that are not a multiple of the vector width, chunks that start mid-block,
    // one-token chunks (the decode path), and a context past two key segments.
    let cases: [(usize, usize, usize, usize, &[usize]); 6] = [
        (3, 20, 16, 33, &[33]),
        (5, 12, 5, 47, &[13, 1, 1, 9, 30]),
        (2, 7, 3, 19, &[1]),
        (1, 64, 32, 100, &[17, 64, 19]),
        (6, 16, 16, 1100, &[600, 1, 1, 300, 198]),
        (4, 112, 16, 70, &[70]),
    ];
    for isa in Isa::all_supported() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for &(nh, hd, bs, len, sizes) in &cases {
                let shape = Shape {
                    nh,
                    hd,
                    bs,
                    blocks: len.div_ceil(bs) + 3,
                };
                let seqs = sequences(shape, &[len], 7);
                let got = run(isa, shape, dtype, &seqs, &chunked(0, len, sizes));
                let s = &seqs[0];
                let (k, v) = (rounded(&s.k, dtype), rounded(&s.v, dtype));
                let want = reference(&s.q, &k, &v, nh, hd, &shape.slopes(), 0.3);
                let what = format!("{isa:?} {dtype:?} heads {nh} dim {hd} block {bs} len {len}");
                assert_close(&got[0], &want, 2e-5, &what);
            }
        }
    }
}

#[test]
fn chunking_paths_neighbours_and_threads_do_not_change_a_bit() {
    // 700 tokens: past one key segment (512), so decode tokens merge several segments.
    let shape = Shape {
        nh: 3,
        hd: 32,
        bs: 16,
        blocks: 128,
    };
    let seqs = sequences(shape, &[700, 90], 3);
    let whole = vec![vec![(0, 0..700)]];
    let ragged = chunked(0, 700, &[5, 3, 100, 1, 1, 200, 7, 383]);
    let mut decoded = vec![vec![(0, 0..650)]];
    decoded.extend((650..700).map(|p| vec![(0, p..p + 1)]));
    // Sequence 1 shares every step, in front of sequence 0's chunk or behind it.
    let mut crowded = vec![
        vec![(1, 0..40), (0, 0..333)],
        vec![(0, 333..600), (1, 40..41)],
    ];
    crowded.extend(
        (600..700).map(|p| vec![(1, 41 + (p - 600) % 49..42 + (p - 600) % 49), (0, p..p + 1)]),
    );
    crowded.truncate(2 + 49);
    crowded.push(vec![(0, 649..700)]);
    for isa in Isa::all_supported() {
        for dtype in [DType::F32, DType::F16] {
            let base = run(isa, shape, dtype, &seqs, &whole)[0].clone();
            let one_thread = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap();
            let cases = [
                (
                    "ragged chunks",
                    run(isa, shape, dtype, &seqs, &ragged)[0].clone(),
                ),
                (
                    "decode steps",
                    run(isa, shape, dtype, &seqs, &decoded)[0].clone(),
                ),
                (
                    "crowded steps",
                    run(isa, shape, dtype, &seqs, &crowded)[0].clone(),
                ),
                (
                    "one thread",
                    one_thread.install(|| run(isa, shape, dtype, &seqs, &whole))[0].clone(),
                ),
            ];
            for (what, got) in cases {
                for (i, (a, b)) in got.iter().zip(&base).enumerate() {
                    assert!(
                        a.to_bits() == b.to_bits() || (*a == 0.0 && *b == 0.0),
                        "{isa:?} {dtype:?} {what}: element {i} is {a}, {b} in one chunk"
                    );
                }
            }
        }
    }
}

#[test]
fn tiled_prompt_chunks_match_contiguous_in_a_mixed_batch() {
    // Sequence A: a 5-token chunk (per-token path), then 70 tokens (tiled path, three query
    // tiles, reading A's cached prefix) batched with sequence B's whole 9-token prompt and
    // a decode token of sequence C. Head dim 20 exercises the kernels' vector tails.
    let shape = Shape {
        nh: 3,
        hd: 20,
        bs: 4,
        blocks: 40,
    };
    let seqs = sequences(shape, &[75, 9, 6], 10);
    let steps = vec![
        vec![(0, 0..5), (2, 0..5)],
        vec![(0, 5..75), (1, 0..9), (2, 5..6)],
    ];
    let got = run(
        crate::kernels::cpu::isa::detect_isa(),
        shape,
        DType::F32,
        &seqs,
        &steps,
    );
    for (i, s) in seqs.iter().enumerate() {
        let want = reference(&s.q, &s.k, &s.v, 3, 20, &shape.slopes(), 0.3);
        assert_close(&got[i], &want, 2e-5, &format!("sequence {i}"));
    }
}

/// CPU seconds this process has used (user + system), from /proc: the machine is shared, so the
/// report below divides work by CPU time rather than wall time.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<f64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // Fields 14 and 15 of the file (utime, stime), in clock ticks of 1/100 s.
    (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / 100.0
}

/// Not a test: prints the prompt kernel's rate (useful flops of the causal products) and the
/// decode kernel's KV read rate on the ~125M benchmark model's head shape, one thread, per CPU
/// second. `cargo test --release -p mpt-engine --lib -- --ignored --nocapture
/// attention_speed_report`.
#[test]
#[ignore]
fn attention_speed_report() {
    let shape = Shape {
        nh: 2,
        hd: 64,
        bs: 16,
        blocks: 8192 / 16 * 2 + 4,
    };
    let isa = crate::kernels::cpu::isa::detect_isa();
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let timed = |reps: usize, f: &(dyn Fn() + Sync)| {
        let start = cpu_seconds();
        for _ in 0..reps {
            one.install(f);
        }
        (cpu_seconds() - start) / reps as f64
    };
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let geom = shape.geom();
        let w = shape.nh * shape.hd;
        for (len, reps) in [(512, 400), (2048, 40)] {
            let seqs = sequences(shape, &[len], 1);
            let mut layer = LayerKv::zeros(dtype, shape.blocks * geom.block_len()).unwrap();
            let slots: Vec<TokenSlot<'_>> = (0..len)
                .map(|pos| TokenSlot {
                    seq: 0,
                    block_table: &seqs[0].table,
                    pos,
                })
                .collect();
            store_kv(&geom, &mut layer, &slots, &seqs[0].k, &seqs[0].v);
            let secs = timed(reps, &|| {
                attention_with(isa, &geom, &layer, &slots, &seqs[0].q, &shape.slopes(), 0.3);
            });
            // Q·Kᵀ and P·V over the causal half: 2 products × 2 flops × d × len²/2 per head.
            let flops = 2.0 * 64.0 * (len * len) as f64 * shape.nh as f64;
            println!("{dtype:?} prompt {len}: {:.1} GFLOP/s", flops / secs / 1e9);
        }
        let len = 8192;
        let seqs = sequences(shape, &[len], 1);
        let mut layer = LayerKv::zeros(dtype, shape.blocks * geom.block_len()).unwrap();
        let slots: Vec<TokenSlot<'_>> = (0..len)
            .map(|pos| TokenSlot {
                seq: 0,
                block_table: &seqs[0].table,
                pos,
            })
            .collect();
        store_kv(&geom, &mut layer, &slots, &seqs[0].k, &seqs[0].v);
        let last = &slots[len - 1..];
        let q = &seqs[0].q[(len - 1) * w..];
        let secs = timed(2000, &|| {
            attention_with(isa, &geom, &layer, last, q, &shape.slopes(), 0.3);
        });
        let bytes = if dtype == DType::F32 { 4.0 } else { 2.0 };
        let kv = 2.0 * len as f64 * w as f64 * bytes;
        println!(
            "{dtype:?} decode at {len}: {:.3} ms, {:.1} GB/s of KV",
            secs * 1e3,
            kv / secs / 1e9
        );
    }
    // A decode step of 16 sequences of 256 tokens over 12 layers of the benchmark model's 12
    // heads: ~150 MB of 16-bit KV, far more than the caches hold, in short block runs.
    let shape = Shape {
        nh: 12,
        hd: 64,
        bs: 16,
        blocks: 16 * 256 / 16,
    };
    let (geom, w, len) = (shape.geom(), shape.nh * shape.hd, 256);
    for dtype in [DType::F32, DType::F16] {
        let seqs = sequences(shape, &[len; 16], 3);
        let layers: Vec<LayerKv> = (0..12)
            .map(|_| {
                let mut layer = LayerKv::zeros(dtype, shape.blocks * geom.block_len()).unwrap();
                for (i, seq) in seqs.iter().enumerate() {
                    let slots: Vec<TokenSlot<'_>> = (0..len)
                        .map(|pos| TokenSlot {
                            seq: i,
                            block_table: &seq.table,
                            pos,
                        })
                        .collect();
                    store_kv(&geom, &mut layer, &slots, &seq.k, &seq.v);
                }
                layer
            })
            .collect();
        let last: Vec<TokenSlot<'_>> = seqs
            .iter()
            .enumerate()
            .map(|(i, seq)| TokenSlot {
                seq: i,
                block_table: &seq.table,
                pos: len - 1,
            })
            .collect();
        let q: Vec<f32> = seqs
            .iter()
            .flat_map(|seq| seq.q[(len - 1) * w..].iter().copied())
            .collect();
        let secs = timed(100, &|| {
            for layer in &layers {
                attention_with(isa, &geom, layer, &last, &q, &shape.slopes(), 0.3);
            }
        });
        let bytes = if dtype == DType::F32 { 4.0 } else { 2.0 };
        let kv = 12.0 * 16.0 * 2.0 * len as f64 * w as f64 * bytes;
        println!(
            "{dtype:?} decode step, 16 x {len} tokens, 12 layers: {:.2} ms, {:.1} GB/s of KV",
            secs * 1e3,
            kv / secs / 1e9
        );
    }
}
