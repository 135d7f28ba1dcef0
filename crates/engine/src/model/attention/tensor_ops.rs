//! Paged attention built only from candle tensor ops, so it runs on any candle device (the GPU's
//! default path, and the CPU where it is tested against the CPU kernel). Pools are
//! `[num_blocks, block_size, n_heads, head_dim]` tensors (see `kv::storage`).
//!
//! Per forward pass a [`TensorPlan`] is built once, before the layer loop: every index and bias
//! tensor the layers need is uploaded there, so the layer loop itself only launches device work
//! and never waits for the device. Per layer:
//! 1. new K/V rows are written with one `scatter_set` each into the pool viewed as
//!    `[num_blocks · block_size, n_heads · head_dim]` (row = block · block_size + slot);
//! 2. sequences are grouped (all one-token decodes together; each multi-token chunk alone, so a
//!    long prefill never pads the decodes), and per group the queries and the sequences' blocks
//!    are gathered with `index_select` into padded `(seqs, heads, queries, keys)` batches;
//! 3. scores `q·kᵀ` by batched matmul in the model dtype, then in f32: `· scale + slope · (j − p)`
//!    with `−∞` where `j > p` (key after the query, or past the context), softmax, `· V`;
//! 4. group outputs are concatenated and put back in the batch's token order.
//!
//! Invariants: a padded query row repeats real positions, so no softmax row is fully masked;
//! padded key slots read real blocks (block 0 of the pool when the table is short), which hold
//! finite values, and are masked.

use candle_core::{DType, Device, Tensor};

use crate::api::error::Result;
use crate::kv::KvGeometry;
use crate::model::batch::ModelBatch;

/// One group of sequences attended together with padding: host-side index data.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct GroupLayout {
    /// Sequences in the group.
    pub(crate) seqs: usize,
    /// Padded queries per sequence (the longest chunk in the group).
    pub(crate) queries: usize,
    /// Padded blocks per sequence (enough for the longest context in the group).
    pub(crate) blocks: usize,
    /// `seqs · queries` rows of the flattened batch to gather as queries.
    pub(crate) q_rows: Vec<u32>,
    /// `seqs · blocks` block ids to gather as keys and values.
    pub(crate) block_ids: Vec<u32>,
    /// `seqs · queries` absolute positions of the (padded) queries.
    pub(crate) q_pos: Vec<f32>,
}

/// Everything the tensor path needs to know about a batch, as plain host data.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HostPlan {
    /// Per new token, its row in the pool's `[num_blocks · block_size, ...]` view.
    pub(crate) write_rows: Vec<u32>,
    /// Groups in the order their outputs are concatenated.
    pub(crate) groups: Vec<GroupLayout>,
    /// Per new token (batch order), its row in the concatenated group outputs; `None` when that
    /// is the identity.
    pub(crate) unpad: Option<Vec<u32>>,
}

impl HostPlan {
    /// Lays out `batch` for a cache of `block_size`-token blocks.
    pub(crate) fn new(batch: &ModelBatch, block_size: usize) -> Self {
        let mut write_rows = Vec::with_capacity(batch.num_tokens());
        let mut first_row = Vec::with_capacity(batch.seqs.len());
        for seq in &batch.seqs {
            first_row.push(write_rows.len());
            for pos in seq.start_pos..seq.context_len() {
                let block = seq.block_table[pos / block_size] as usize;
                write_rows.push((block * block_size + pos % block_size) as u32);
            }
        }
        // Decodes together (in batch order), then every longer chunk on its own.
        let decodes: Vec<usize> = (0..batch.seqs.len())
            .filter(|&i| batch.seqs[i].tokens.len() == 1)
            .collect();
        let mut members: Vec<Vec<usize>> = Vec::new();
        if !decodes.is_empty() {
            members.push(decodes);
        }
        members.extend(
            (0..batch.seqs.len())
                .filter(|&i| batch.seqs[i].tokens.len() > 1)
                .map(|i| vec![i]),
        );
        let mut groups = Vec::with_capacity(members.len());
        let mut out_row = vec![0u32; write_rows.len()];
        let mut next_out = 0usize;
        for seqs in &members {
            let queries = seqs
                .iter()
                .map(|&i| batch.seqs[i].tokens.len())
                .max()
                .expect("groups are never empty: this is a bug");
            let blocks = seqs
                .iter()
                .map(|&i| batch.seqs[i].context_len().div_ceil(block_size))
                .max()
                .expect("groups are never empty: this is a bug");
            let mut g = GroupLayout {
                seqs: seqs.len(),
                queries,
                blocks,
                q_rows: Vec::with_capacity(seqs.len() * queries),
                block_ids: Vec::with_capacity(seqs.len() * blocks),
                q_pos: Vec::with_capacity(seqs.len() * queries),
            };
            for &i in seqs {
                let seq = &batch.seqs[i];
                let n = seq.tokens.len();
                for t in 0..queries {
                    // Padding repeats the last real query (its row is dropped afterwards).
                    let real = t.min(n - 1);
                    g.q_rows.push((first_row[i] + real) as u32);
                    g.q_pos.push((seq.start_pos + real) as f32);
                    if t < n {
                        out_row[first_row[i] + t] = next_out as u32;
                    }
                    next_out += 1;
                }
                let used = seq.context_len().div_ceil(block_size);
                g.block_ids.extend_from_slice(&seq.block_table[..used]);
                g.block_ids.extend(std::iter::repeat_n(0, blocks - used));
            }
            groups.push(g);
        }
        let identity =
            next_out == out_row.len() && out_row.iter().enumerate().all(|(i, &r)| r as usize == i);
        Self {
            write_rows,
            groups,
            unpad: (!identity).then_some(out_row),
        }
    }
}

/// A group's device tensors.
#[derive(Debug)]
struct GroupTensors {
    seqs: usize,
    queries: usize,
    keys: usize,
    /// `(seqs · queries)` u32.
    q_rows: Tensor,
    /// `(seqs · blocks)` u32.
    block_ids: Tensor,
    /// `(seqs, heads, queries, keys)` f32: ALiBi bias plus the causal/context mask.
    bias: Tensor,
}

/// The per-forward device tensors of the tensor path, built before the layer loop.
#[derive(Debug)]
pub(crate) struct TensorPlan {
    /// Inputs of our CUDA kernels when they compute the attention (then `groups` is empty).
    #[cfg(feature = "cuda")]
    kernels: Option<super::cuda::launch::KernelInputs>,
    /// `(tokens, n_heads · head_dim)` u32 destination rows for `scatter_set`.
    write_rows: Tensor,
    groups: Vec<GroupTensors>,
    /// `(tokens)` u32, see [`HostPlan::unpad`].
    unpad: Option<Tensor>,
}

impl TensorPlan {
    /// Uploads the index and bias tensors for `batch` to `device`; with `cuda_kernels`, the
    /// kernels' packed metadata instead of the gather indices and biases.
    pub(crate) fn new(
        batch: &ModelBatch,
        geom: &KvGeometry,
        slopes: &[f32],
        device: &Device,
        cuda_kernels: bool,
    ) -> Result<Self> {
        #[allow(unused_mut)]
        let mut host = HostPlan::new(batch, geom.block_size);
        #[cfg(feature = "cuda")]
        let kernels = if cuda_kernels {
            use super::cuda::launch::KernelInputs;
            use super::cuda::meta::KernelMeta;
            host.groups.clear();
            host.unpad = None;
            let meta = KernelMeta::pack(batch, geom.block_size)?;
            Some(KernelInputs::new(meta, slopes, device)?)
        } else {
            None
        };
        #[cfg(not(feature = "cuda"))]
        if cuda_kernels {
            return Err(crate::api::error::EngineError::setting(
                "attention_kernels",
                "this build has no CUDA kernels (build with --features cuda)",
            ));
        }
        let width = geom.n_heads * geom.head_dim;
        let n = host.write_rows.len();
        let write_rows = Tensor::from_slice(&host.write_rows, (n, 1), device)?
            .broadcast_as((n, width))?
            .contiguous()?;
        let heads = geom.n_heads;
        let slopes = Tensor::from_slice(slopes, (1, heads, 1, 1), device)?;
        let mut groups = Vec::with_capacity(host.groups.len());
        for g in &host.groups {
            let keys = g.blocks * geom.block_size;
            let key_pos = Tensor::arange(0u32, keys as u32, device)?
                .to_dtype(DType::F32)?
                .reshape((1, 1, 1, keys))?;
            let q_pos = Tensor::from_slice(&g.q_pos, (g.seqs, 1, g.queries, 1), device)?;
            let rel = key_pos.broadcast_sub(&q_pos)?; // (s, 1, q, k): j − p
            let future = rel.gt(0f64)?;
            let neg_inf = Tensor::full(f32::NEG_INFINITY, rel.shape(), device)?;
            let alibi = rel.broadcast_mul(&slopes)?; // (s, h, q, k)
            let bias = future
                .where_cond(&neg_inf, &rel.zeros_like()?)?
                .broadcast_add(&alibi)?
                .contiguous()?;
            groups.push(GroupTensors {
                seqs: g.seqs,
                queries: g.queries,
                keys,
                q_rows: Tensor::from_slice(&g.q_rows, g.q_rows.len(), device)?,
                block_ids: Tensor::from_slice(&g.block_ids, g.block_ids.len(), device)?,
                bias,
            });
        }
        let unpad = match &host.unpad {
            Some(rows) => Some(Tensor::from_slice(rows, rows.len(), device)?),
            None => None,
        };
        Ok(Self {
            #[cfg(feature = "cuda")]
            kernels,
            write_rows,
            groups,
            unpad,
        })
    }
}

/// Writes the new tokens' K and V (`(tokens, n_heads · head_dim)`) into one layer's pools.
pub(crate) fn scatter_kv(
    plan: &TensorPlan,
    k_pool: &Tensor,
    v_pool: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Result<()> {
    for (pool, new) in [(k_pool, k), (v_pool, v)] {
        let (blocks, block_size, heads, head_dim) = pool.dims4()?;
        let rows = pool.reshape((blocks * block_size, heads * head_dim))?;
        let new = new.to_dtype(pool.dtype())?.contiguous()?;
        rows.scatter_set(&plan.write_rows, &new, 0)?;
    }
    Ok(())
}

/// Attention output `(tokens, n_heads · head_dim)` in `q`'s dtype, for queries `q` of the same
/// shape, over one layer's pools (which already hold this step's K/V).
pub(crate) fn attention(
    plan: &TensorPlan,
    k_pool: &Tensor,
    v_pool: &Tensor,
    q: &Tensor,
    scale: f32,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(inputs) = &plan.kernels {
        return super::cuda::launch::attention(inputs, k_pool, v_pool, q, scale);
    }
    let (_, block_size, heads, head_dim) = k_pool.dims4()?;
    let dtype = q.dtype();
    let q = q.reshape((q.dim(0)?, heads, head_dim))?;
    let mut outputs = Vec::with_capacity(plan.groups.len());
    for g in &plan.groups {
        let gather = |pool: &Tensor| -> candle_core::Result<Tensor> {
            pool.index_select(&g.block_ids, 0)? // (s·b, bs, h, d)
                .reshape((g.seqs, g.keys, heads, head_dim))?
                .transpose(1, 2)? // (s, h, k, d)
                .to_dtype(dtype)?
                .contiguous()
        };
        debug_assert_eq!(g.keys % block_size, 0);
        let qg = q
            .index_select(&g.q_rows, 0)? // (s·q, h, d)
            .reshape((g.seqs, g.queries, heads, head_dim))?
            .transpose(1, 2)? // (s, h, q, d)
            .contiguous()?;
        let k = gather(k_pool)?;
        let v = gather(v_pool)?;
        let scores = qg.matmul(&k.transpose(2, 3)?)?.to_dtype(DType::F32)?; // (s, h, q, k)
        let scores = ((scores * scale as f64)? + &g.bias)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
        let out = probs.matmul(&v)?; // (s, h, q, d)
        outputs.push(
            out.transpose(1, 2)?
                .reshape((g.seqs * g.queries, heads * head_dim))?,
        );
    }
    let all = if outputs.len() == 1 {
        outputs.pop().expect("one output: this is a bug")
    } else {
        Tensor::cat(&outputs, 0)?
    };
    Ok(match &plan.unpad {
        Some(rows) => all.index_select(rows, 0)?,
        None => all,
    }
    .contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::storage::LayerKv;
    use crate::model::attention::cpu::{TokenSlot, paged_attention, store_kv};
    use crate::model::attention::pseudo_random;
    use crate::model::batch::{LogitsWanted, SeqChunk};

    fn chunk(tokens: usize, start_pos: usize, block_table: Vec<u32>) -> SeqChunk {
        SeqChunk {
            tokens: vec![1; tokens],
            start_pos,
            block_table,
            logits: LogitsWanted::Last,
        }
    }

    #[test]
    fn host_plan_groups_decodes_and_unpads() {
        // seq 0: 3-token chunk at 2; seq 1: decode at 5; seq 2: decode at 0; block size 4.
        let batch = ModelBatch {
            seqs: vec![
                chunk(3, 2, vec![7, 3]),
                chunk(1, 5, vec![1, 6]),
                chunk(1, 0, vec![2]),
            ],
        };
        let p = HostPlan::new(&batch, 4);
        // Slots: 7·4+2, 7·4+3, 3·4+0 | 6·4+1 | 2·4+0.
        assert_eq!(p.write_rows, vec![30, 31, 12, 25, 8]);
        assert_eq!(p.groups.len(), 2);
        let d = &p.groups[0];
        assert_eq!((d.seqs, d.queries, d.blocks), (2, 1, 2));
        assert_eq!(d.q_rows, vec![3, 4]);
        assert_eq!(d.block_ids, vec![1, 6, 2, 0]);
        assert_eq!(d.q_pos, vec![5.0, 0.0]);
        let c = &p.groups[1];
        assert_eq!((c.seqs, c.queries, c.blocks), (1, 3, 2));
        assert_eq!(c.q_rows, vec![0, 1, 2]);
        assert_eq!(c.q_pos, vec![2.0, 3.0, 4.0]);
        // Decode outputs come first in the concatenation.
        assert_eq!(p.unpad, Some(vec![2, 3, 4, 0, 1]));
    }

    #[test]
    fn host_plan_identity_needs_no_unpad() {
        let batch = ModelBatch {
            seqs: vec![chunk(1, 3, vec![0]), chunk(1, 9, vec![1, 2, 3])],
        };
        assert_eq!(HostPlan::new(&batch, 4).unpad, None);
        let one_prefill = ModelBatch {
            seqs: vec![chunk(5, 0, vec![4, 1])],
        };
        assert_eq!(HostPlan::new(&one_prefill, 4).unpad, None);
    }

    /// Runs the same steps through the CPU kernel and the tensor path and compares every output:
    /// prefill, a chunk on a cached prefix, and a mixed step of decodes and a chunk.
    #[test]
    fn tensor_path_matches_cpu_kernel_over_mixed_steps() {
        let (nh, hd, bs, nb) = (3, 8, 4, 16);
        let geom = KvGeometry {
            num_blocks: nb,
            block_size: bs,
            n_heads: nh,
            head_dim: hd,
        };
        let slopes = [0.5f32, 0.25, 0.125];
        let scale = 0.35f32;
        let w = nh * hd;
        let mut cpu_pool = LayerKv::zeros(DType::F32, nb * geom.block_len()).unwrap();
        let dev = Device::Cpu;
        let k_pool = Tensor::zeros((nb, bs, nh, hd), DType::F32, &dev).unwrap();
        let v_pool = Tensor::zeros((nb, bs, nh, hd), DType::F32, &dev).unwrap();
        let tables = [vec![9u32, 2, 14, 5], vec![0, 11, 13], vec![6, 3, 8]];
        // (seq, start, len) per step.
        let steps: [&[(usize, usize, usize)]; 4] = [
            &[(0, 0, 7)],
            &[(0, 7, 5), (1, 0, 6)],
            &[(0, 12, 1), (1, 6, 1), (2, 0, 9)],
            &[(2, 9, 1), (0, 13, 1), (1, 7, 3)],
        ];
        for (step, chunks) in steps.iter().enumerate() {
            let batch = ModelBatch {
                seqs: chunks
                    .iter()
                    .map(|&(s, start, len)| chunk(len, start, tables[s].clone()))
                    .collect(),
            };
            let n = batch.num_tokens();
            let q = pseudo_random(n * w, 10 + step as u32);
            let k = pseudo_random(n * w, 20 + step as u32);
            let v = pseudo_random(n * w, 30 + step as u32);
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
            store_kv(&geom, &mut cpu_pool, &slots, &k, &v);
            let expected = paged_attention(&geom, &cpu_pool, &slots, &q, &slopes, scale);

            let plan = TensorPlan::new(&batch, &geom, &slopes, &dev, false).unwrap();
            let t = |x: &[f32]| Tensor::from_slice(x, (n, w), &dev).unwrap();
            scatter_kv(&plan, &k_pool, &v_pool, &t(&k), &t(&v)).unwrap();
            let got = attention(&plan, &k_pool, &v_pool, &t(&q), scale).unwrap();
            assert_eq!(got.dims(), &[n, w]);
            let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(got.len(), expected.len());
            for (i, (a, b)) in got.iter().zip(&expected).enumerate() {
                assert!((a - b).abs() < 1e-5, "step {step} element {i}: {a} vs {b}");
            }
        }
    }
}
