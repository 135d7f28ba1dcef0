//! The host-side logic that feeds our CUDA attention kernels (`paged_attention.cu`): metadata
//! packing and launch geometry, plain Rust and unit-tested everywhere. The launch (`launch.rs`)
//! exists only with the `cuda` feature.
//!
//! NOT YET RUN ON A GPU. The kernels are selected only when asked for
//! (`Attention::use_cuda_kernels`); the candle tensor-op path stays the default until
//! `bench/gpu-check.sh` has verified them on a real card.
//!
//! Packed metadata (one i32 buffer per forward, uploaded before the layer loop): `q_start`
//! (S + 1 offsets of each sequence's query rows), `ctx_len` (S context lengths after the step),
//! `table_off` (S offsets into `tables`), `tiles` (sequence, first query) pairs for the prefill
//! grid, and `tables`: each sequence's used block ids (`ceil(ctx_len / block_size)` of them) back
//! to back. Invariant: every value fits in i32 and every table covers its context.

#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use candle_core::DType;

use crate::api::error::{EngineError, Result};
use crate::model::batch::ModelBatch;

/// Threads per block of every kernel (`THREADS` in the .cu file).
pub(crate) const THREADS: u32 = 128;
/// Queries per prefill tile (`PREFILL_BLOCK_M`).
pub(crate) const PREFILL_BLOCK_M: usize = 16;
/// Keys per decode split (`DECODE_PARTITION`).
pub(crate) const DECODE_PARTITION: usize = 512;
/// Head dims the kernels are instantiated for (MPT-7B 128, MPT-30B 112).
pub(crate) const HEAD_DIMS: [usize; 3] = [64, 112, 128];

/// The packed kernel metadata of one batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KernelMeta {
    /// Everything, back to back.
    pub(crate) ints: Vec<i32>,
    /// Offset of `q_start` in `ints` (always 0).
    pub(crate) q_start: usize,
    /// Offset of `ctx_len`.
    pub(crate) ctx_len: usize,
    /// Offset of `table_off`.
    pub(crate) table_off: usize,
    /// Offset of `tiles`.
    pub(crate) tiles: usize,
    /// Offset of the block tables.
    pub(crate) tables: usize,
    /// Sequences.
    pub(crate) num_seqs: usize,
    /// Query rows (new tokens).
    pub(crate) num_tokens: usize,
    /// Prefill tiles.
    pub(crate) num_tiles: usize,
    /// Longest context in the batch.
    pub(crate) max_ctx: usize,
    /// Whether every sequence has exactly one new token (the decode kernel applies).
    pub(crate) all_decode: bool,
}

impl KernelMeta {
    /// Packs `batch` for a cache of `block_size`-token blocks.
    pub(crate) fn pack(batch: &ModelBatch, block_size: usize) -> Result<Self> {
        let too_big = |what: &str| {
            EngineError::setting(
                "batch",
                format!("{what} does not fit the kernels' i32 indices"),
            )
        };
        let to_i32 = |x: usize, what: &str| i32::try_from(x).map_err(|_| too_big(what));
        let s = batch.seqs.len();
        let mut q_start = Vec::with_capacity(s + 1);
        let mut ctx_len = Vec::with_capacity(s);
        let mut table_off = Vec::with_capacity(s);
        let mut tiles = Vec::new();
        let mut tables = Vec::new();
        let mut rows = 0usize;
        for (i, seq) in batch.seqs.iter().enumerate() {
            q_start.push(to_i32(rows, "token count")?);
            ctx_len.push(to_i32(seq.context_len(), "context length")?);
            table_off.push(to_i32(tables.len(), "block table size")?);
            let used = seq.context_len().div_ceil(block_size);
            for &b in &seq.block_table[..used] {
                tables.push(i32::try_from(b).map_err(|_| too_big("block id"))?);
            }
            for m0 in (0..seq.tokens.len()).step_by(PREFILL_BLOCK_M) {
                tiles.extend([to_i32(i, "sequence count")?, to_i32(m0, "chunk")?]);
            }
            rows += seq.tokens.len();
        }
        q_start.push(to_i32(rows, "token count")?);
        let mut ints = q_start;
        let ctx_off = ints.len();
        ints.extend(&ctx_len);
        let table_off_off = ints.len();
        ints.extend(&table_off);
        let tiles_off = ints.len();
        let num_tiles = tiles.len() / 2;
        ints.extend(&tiles);
        let tables_off = ints.len();
        ints.extend(&tables);
        Ok(Self {
            ints,
            q_start: 0,
            ctx_len: ctx_off,
            table_off: table_off_off,
            tiles: tiles_off,
            tables: tables_off,
            num_seqs: s,
            num_tokens: rows,
            num_tiles,
            max_ctx: batch
                .seqs
                .iter()
                .map(|q| q.context_len())
                .max()
                .unwrap_or(0),
            all_decode: batch.seqs.iter().all(|q| q.tokens.len() == 1),
        })
    }
}

/// Grid and block dimensions of one launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Launch {
    /// Grid (x, y, z).
    pub(crate) grid: (u32, u32, u32),
    /// Block (x, y, z).
    pub(crate) block: (u32, u32, u32),
}

/// Which kernels a batch runs, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LaunchPlan {
    /// `paged_prefill`: grid (tiles, heads).
    Prefill(Launch),
    /// `paged_decode` over `splits` key partitions, then `paged_decode_reduce`.
    Decode {
        /// The split-K launch: grid (heads, seqs, splits).
        main: Launch,
        /// The merge: grid (heads, seqs).
        reduce: Launch,
        /// Key partitions per sequence (enough for the longest context).
        splits: usize,
    },
}

impl LaunchPlan {
    /// The launches for `meta` with `n_heads` heads.
    pub(crate) fn new(meta: &KernelMeta, n_heads: usize) -> Self {
        let block = (THREADS, 1, 1);
        let (h, s) = (n_heads as u32, meta.num_seqs as u32);
        if meta.all_decode {
            let splits = meta.max_ctx.div_ceil(DECODE_PARTITION).max(1);
            Self::Decode {
                main: Launch {
                    grid: (h, s, splits as u32),
                    block,
                },
                reduce: Launch {
                    grid: (h, s, 1),
                    block,
                },
                splits,
            }
        } else {
            Self::Prefill(Launch {
                grid: (meta.num_tiles as u32, h, 1),
                block,
            })
        }
    }
}

/// The kernel-name suffix for a dtype and head dim (`bf16_d128`), or `None` when there is no
/// instantiation for them.
pub(crate) fn kernel_suffix(dtype: DType, head_dim: usize) -> Option<String> {
    let ty = match dtype {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::F32 => "f32",
        _ => return None,
    };
    HEAD_DIMS
        .contains(&head_dim)
        .then(|| format!("{ty}_d{head_dim}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::attention::pseudo_random;
    use crate::model::batch::{LogitsWanted, SeqChunk};

    fn chunk(tokens: usize, start_pos: usize, block_table: Vec<u32>) -> SeqChunk {
        SeqChunk {
            tokens: vec![3; tokens],
            start_pos,
            block_table,
            logits: LogitsWanted::Last,
        }
    }

    #[test]
    fn constants_match_the_cuda_source() {
        let src = include_str!("paged_attention.cu");
        for (name, value) in [
            ("THREADS", THREADS as usize),
            ("PREFILL_BLOCK_M", PREFILL_BLOCK_M),
            ("DECODE_PARTITION", DECODE_PARTITION),
        ] {
            let line = format!("#define {name} ");
            let defined = src
                .lines()
                .find_map(|l| l.strip_prefix(&line))
                .unwrap_or_else(|| panic!("{name} not defined in the .cu file"));
            assert_eq!(defined.trim().parse::<usize>().ok(), Some(value), "{name}");
        }
        for d in HEAD_DIMS {
            for kind in ["PREFILL", "DECODE"] {
                assert!(
                    src.contains(&format!("{kind}(TYPE, NAME, {d})")),
                    "{kind} d{d}"
                );
            }
        }
        for ty in ["float, f32", "__half, f16", "__nv_bfloat16, bf16"] {
            assert!(src.contains(&format!("ALL_DIMS({ty})")), "{ty}");
        }
    }

    #[test]
    fn packing_lays_out_offsets_tiles_and_used_table_prefixes() {
        // seq 0: 20-token chunk after 5 cached (ctx 25, 2 tiles), table longer than needed;
        // seq 1: decode at 40 (ctx 41).
        let batch = ModelBatch {
            seqs: vec![chunk(20, 5, vec![4, 9, 1, 7]), chunk(1, 40, vec![2, 3, 8])],
        };
        let m = KernelMeta::pack(&batch, 16).expect("fits");
        assert_eq!(m.ints[m.q_start..m.ctx_len], [0, 20, 21]);
        assert_eq!(m.ints[m.ctx_len..m.table_off], [25, 41]);
        assert_eq!(m.ints[m.table_off..m.tiles], [0, 2]);
        assert_eq!(m.ints[m.tiles..m.tables], [0, 0, 0, 16, 1, 0]);
        assert_eq!(m.ints[m.tables..], [4, 9, 2, 3, 8]);
        assert_eq!(
            (m.num_seqs, m.num_tokens, m.num_tiles, m.max_ctx),
            (2, 21, 3, 41)
        );
        assert!(!m.all_decode);
        assert_eq!(
            LaunchPlan::new(&m, 64),
            LaunchPlan::Prefill(Launch {
                grid: (3, 64, 1),
                block: (128, 1, 1)
            })
        );
    }

    #[test]
    fn decode_batches_split_the_longest_context() {
        let batch = ModelBatch {
            seqs: vec![
                chunk(1, 1500, (0..94).collect()),
                chunk(1, 0, vec![100]),
                chunk(1, 511, (200..232).collect()),
            ],
        };
        let m = KernelMeta::pack(&batch, 16).expect("fits");
        assert!(m.all_decode);
        assert_eq!(m.max_ctx, 1501);
        let LaunchPlan::Decode {
            main,
            reduce,
            splits,
        } = LaunchPlan::new(&m, 32)
        else {
            panic!("decode plan expected");
        };
        assert_eq!(splits, 3); // ceil(1501 / 512)
        assert_eq!(main.grid, (32, 3, 3));
        assert_eq!(reduce.grid, (32, 3, 1));
        // Exactly one partition boundary case: ctx 512 needs one split, 513 two.
        for (pos, want) in [(511, 1), (512, 2)] {
            let b = ModelBatch {
                seqs: vec![chunk(1, pos, (0..40).collect())],
            };
            let plan = LaunchPlan::new(&KernelMeta::pack(&b, 16).expect("fits"), 4);
            assert!(matches!(plan, LaunchPlan::Decode { splits, .. } if splits == want));
        }
    }

    #[test]
    fn suffixes_cover_the_instantiated_kernels_only() {
        assert_eq!(
            kernel_suffix(DType::BF16, 112).as_deref(),
            Some("bf16_d112")
        );
        assert_eq!(kernel_suffix(DType::F16, 128).as_deref(), Some("f16_d128"));
        assert_eq!(kernel_suffix(DType::F32, 64).as_deref(), Some("f32_d64"));
        assert_eq!(kernel_suffix(DType::BF16, 16), None);
        assert_eq!(kernel_suffix(DType::U32, 128), None);
    }

    /// The kernels' algorithm in Rust, read straight off the packed metadata: prefill tiles with
    /// an online softmax over `PREFILL_BLOCK_N`-key tiles, or decode splits merged by their
    /// (max, sum). Checked against the CPU kernel so the metadata's meaning and the merge
    /// arithmetic are right before any GPU runs them.
    fn emulate(
        m: &KernelMeta,
        q: &[f32],
        pool: (&[f32], &[f32]),
        (nh, hd, bs): (usize, usize, usize),
        slopes: &[f32],
        scale: f32,
    ) -> Vec<f32> {
        const BLOCK_N: usize = 32;
        let at = |s: usize, pos: usize, h: usize| {
            let table = &m.ints[m.tables + m.ints[m.table_off + s] as usize..];
            ((table[pos / bs] as usize * bs + pos % bs) * nh + h) * hd
        };
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        let mut out = vec![f32::NAN; m.num_tokens * nh * hd];
        let plan = LaunchPlan::new(m, nh);
        for s in 0..m.num_seqs {
            let (r0, r1) = (m.ints[s] as usize, m.ints[s + 1] as usize);
            let len = m.ints[m.ctx_len + s] as usize;
            for h in 0..nh {
                for r in r0..r1 {
                    let p = len - (r1 - r);
                    let qr: Vec<f32> = q[(r * nh + h) * hd..][..hd]
                        .iter()
                        .map(|x| x * scale)
                        .collect();
                    let score = |j: usize| {
                        dot(&qr, &pool.0[at(s, j, h)..][..hd]) + slopes[h] * (j as f32 - p as f32)
                    };
                    let o = &mut out[(r * nh + h) * hd..][..hd];
                    match plan {
                        LaunchPlan::Prefill(_) => {
                            let (mut mx, mut l, mut acc) =
                                (f32::NEG_INFINITY, 0f32, vec![0f32; hd]);
                            for kb in (0..=p).step_by(BLOCK_N) {
                                let keys: Vec<usize> = (kb..(kb + BLOCK_N).min(p + 1)).collect();
                                let sc: Vec<f32> = keys.iter().map(|&j| score(j)).collect();
                                let m_new = sc.iter().fold(mx, |a, &b| a.max(b));
                                let alpha = (mx - m_new).exp();
                                l *= alpha;
                                acc.iter_mut().for_each(|a| *a *= alpha);
                                for (&j, &x) in keys.iter().zip(&sc) {
                                    let pj = (x - m_new).exp();
                                    l += pj;
                                    let v = &pool.1[at(s, j, h)..][..hd];
                                    acc.iter_mut().zip(v).for_each(|(a, v)| *a += pj * v);
                                }
                                mx = m_new;
                            }
                            o.iter_mut().zip(&acc).for_each(|(o, a)| *o = a / l);
                        }
                        LaunchPlan::Decode { splits, .. } => {
                            let mut parts = Vec::new();
                            for sp in 0..splits {
                                let (k0, k1) = (
                                    sp * DECODE_PARTITION,
                                    ((sp + 1) * DECODE_PARTITION).min(len),
                                );
                                if k0 >= len {
                                    continue;
                                }
                                let sc: Vec<f32> = (k0..k1).map(score).collect();
                                let mx = sc.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                                let mut acc = vec![0f32; hd];
                                let mut sum = 0f32;
                                for (j, x) in (k0..k1).zip(&sc) {
                                    let e = (x - mx).exp();
                                    sum += e;
                                    let v = &pool.1[at(s, j, h)..][..hd];
                                    acc.iter_mut().zip(v).for_each(|(a, v)| *a += e * v);
                                }
                                parts.push((mx, sum, acc));
                            }
                            let big = parts.iter().fold(f32::NEG_INFINITY, |a, p| a.max(p.0));
                            let total: f32 = parts.iter().map(|p| (p.0 - big).exp() * p.1).sum();
                            for (dd, o) in o.iter_mut().enumerate() {
                                let t: f32 =
                                    parts.iter().map(|p| (p.0 - big).exp() * p.2[dd]).sum();
                                *o = t / total;
                            }
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn kernel_algorithm_on_packed_metadata_matches_the_cpu_kernel() {
        use crate::kv::KvGeometry;
        use crate::kv::storage::LayerKv;
        use crate::model::attention::cpu::{TokenSlot, paged_attention};
        let (nh, hd, bs, nb) = (2, 8, 16, 96);
        let slopes = [0.25f32, 0.0625];
        let scale = 0.3;
        // Pools filled with random values in both layouts (token-major for the kernels,
        // head-major for the CPU kernel).
        let km = pseudo_random(nb * bs * nh * hd, 1);
        let vm = pseudo_random(nb * bs * nh * hd, 2);
        let geom = KvGeometry {
            num_blocks: nb,
            block_size: bs,
            n_heads: nh,
            head_dim: hd,
        };
        let mut cpu = LayerKv::zeros(candle_core::DType::F32, nb * geom.block_len()).unwrap();
        for b in 0..nb {
            for o in 0..bs {
                for h in 0..nh {
                    let src = ((b * bs + o) * nh + h) * hd;
                    let rows = (&km[src..src + hd], &vm[src..src + hd]);
                    cpu.write(&geom, (b, h, o), rows.0, rows.1);
                }
            }
        }
        let batches = [
            // Mixed: a 37-token chunk after a 50-token prefix, a decode, a fresh 3-token prompt.
            vec![
                chunk(37, 50, (0..6).rev().collect()),
                chunk(1, 70, (10..15).collect()),
                chunk(3, 0, vec![40]),
            ],
            // Decodes spanning several partitions (contexts 1100, 1, 512, 513).
            vec![
                chunk(1, 1099, (20..89).collect()),
                chunk(1, 0, vec![90]),
                chunk(1, 511, (41..73).collect()),
                chunk(1, 512, (50..83).rev().collect()),
            ],
        ];
        for seqs in batches {
            let batch = ModelBatch { seqs };
            let meta = KernelMeta::pack(&batch, bs).expect("fits");
            let q = pseudo_random(meta.num_tokens * nh * hd, 3);
            let got = emulate(&meta, &q, (&km, &vm), (nh, hd, bs), &slopes, scale);
            let slots: Vec<TokenSlot<'_>> = batch
                .seqs
                .iter()
                .enumerate()
                .flat_map(|(seq, s)| {
                    (s.start_pos..s.context_len()).map(move |pos| TokenSlot {
                        seq,
                        block_table: &s.block_table,
                        pos,
                    })
                })
                .collect();
            let want = paged_attention(&geom, &cpu, &slots, &q, &slopes, scale);
            assert_eq!(got.len(), want.len());
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!((a - b).abs() < 1e-4, "element {i}: {a} vs {b}");
            }
        }
    }
}
