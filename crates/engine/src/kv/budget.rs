//! How many KV blocks the engine allocates, and why (`--gpu-memory-utilization`, vLLM's
//! semantics).
//!
//! On a CUDA device with no explicit size ([`KvCacheSize::Auto`]) the pool gets what is left of
//! `total × fraction` once the memory in use after loading the weights (CUDA context, weights,
//! other processes) and the activation peak of one profiling forward pass are taken away. The
//! peak is measured, not estimated: the profile batch is the worst step the scheduler can build
//! (`max_num_batched_tokens` new tokens, each chunk at the end of a `max_model_len` context,
//! logits for every row as prompt logprobs ask), and free device memory is read before and after
//! it while the stream-ordered memory pool keeps what the pass freed. An explicit block count or
//! byte size always wins; on the CPU `Auto` means [`DEFAULT_CPU_KV_CACHE_BYTES`].
//!
//! Invariants: [`gpu_kv_cache_blocks`] is pure arithmetic and never returns a pool that cannot
//! hold one `max_model_len` sequence; the profile batch only references blocks of its own
//! temporary cache and ids inside the vocabulary.

use crate::api::config::{DEFAULT_CPU_KV_CACHE_BYTES, KvCacheSize};
use crate::api::error::{EngineError, Result};
use crate::model::{LogitsWanted, ModelBatch, SeqChunk};
use crate::sched::sequence::blocks_for;

/// Bytes in a GiB, for messages and logs.
const GIB: f64 = (1u64 << 30) as f64;

/// Formats bytes as GiB with two decimals.
pub fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / GIB)
}

/// Device memory facts measured at startup, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuMemory {
    /// The card's memory.
    pub total: u64,
    /// In use after the weights are loaded: `total − free` (CUDA context, weights, other processes).
    pub used_after_weights: u64,
    /// Extra memory one profiling forward pass of the largest step needed.
    pub activation_peak: u64,
}

/// What the pool must hold at least, and the settings a message should name.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PoolNeeds {
    /// Bytes of one block over all layers, K and V.
    pub bytes_per_block: u64,
    /// Tokens per block.
    pub block_size: usize,
    /// Longest sequence: the pool must hold one.
    pub max_model_len: usize,
    /// Tokens of the profiled step (named in the error message).
    pub max_num_batched_tokens: usize,
}

/// Blocks of a GPU pool sized by `fraction` of the card (vLLM's `--gpu-memory-utilization`).
/// Fails, saying what to change, when the result cannot hold one `max_model_len` sequence.
pub fn gpu_kv_cache_blocks(memory: &GpuMemory, fraction: f64, needs: &PoolNeeds) -> Result<usize> {
    let setting = "gpu_memory_utilization";
    if !(fraction > 0.0 && fraction <= 1.0) {
        return Err(EngineError::setting(
            setting,
            format!("must be in (0, 1], got {fraction}"),
        ));
    }
    let allowed = (memory.total as f64 * fraction) as u64;
    let taken = memory
        .used_after_weights
        .saturating_add(memory.activation_peak);
    let left = allowed.saturating_sub(taken);
    let blocks = (left / needs.bytes_per_block.max(1)) as usize;
    let needed = blocks_for(needs.max_model_len, needs.block_size);
    if blocks >= needed.max(1) {
        return Ok(blocks);
    }
    let what = format!(
        "{fraction} × {} = {} may be used; {} is in use after loading the weights and a forward \
         pass of {} tokens peaks at {} more, which leaves {} for the KV cache",
        gib(memory.total),
        gib(allowed),
        gib(memory.used_after_weights),
        needs.max_num_batched_tokens,
        gib(memory.activation_peak),
        gib(left),
    );
    let fix = "Raise --gpu-memory-utilization (if the card is not shared), lower --max-model-len \
               or --max-num-batched-tokens, or use a card with more memory";
    let message = if blocks == 0 {
        format!("no memory is left for the KV cache: {what}. {fix}.")
    } else {
        format!(
            "the KV cache would hold {} tokens ({blocks} blocks), less than one sequence of \
             --max-model-len {} tokens ({needed} blocks of {} = {}): {what}. {fix}.",
            blocks * needs.block_size,
            needs.max_model_len,
            needs.block_size,
            gib(needed as u64 * needs.bytes_per_block),
        )
    };
    Err(EngineError::setting(setting, message))
}

/// Blocks for the sizes that need no measurement, with how they were chosen; `None` for
/// [`KvCacheSize::Auto`] on a GPU (measure, then call [`gpu_kv_cache_blocks`]). On the CPU
/// `Auto` is [`DEFAULT_CPU_KV_CACHE_BYTES`], raised to one `max_model_len` sequence when that
/// is more (so a chat request that asks for the whole context can always run); an explicit
/// size that cannot hold one such sequence is refused, saying what to change.
pub fn fixed_kv_cache_blocks(
    size: KvCacheSize,
    on_gpu: bool,
    needs: &PoolNeeds,
) -> Option<Result<(usize, String)>> {
    let per = needs.bytes_per_block.max(1);
    let needed = blocks_for(needs.max_model_len, needs.block_size).max(1);
    let (blocks, how, flag) = match size {
        KvCacheSize::Blocks(n) => (n, "--num-kv-blocks".to_string(), "--num-kv-blocks"),
        KvCacheSize::Bytes(bytes) => (
            (bytes / per) as usize,
            format!("--kv-cache-memory {}", gib(bytes)),
            "--kv-cache-memory",
        ),
        KvCacheSize::Auto if on_gpu => return None,
        KvCacheSize::Auto => {
            let default = (DEFAULT_CPU_KV_CACHE_BYTES / per) as usize;
            let how = if default >= needed {
                format!(
                    "the CPU default of {} (--kv-cache-memory or --num-kv-blocks change it)",
                    gib(DEFAULT_CPU_KV_CACHE_BYTES)
                )
            } else {
                format!(
                    "one --max-model-len {} sequence, {} (more than the CPU default of {}; \
                     --kv-cache-memory or --num-kv-blocks change it)",
                    needs.max_model_len,
                    gib(needed as u64 * per),
                    gib(DEFAULT_CPU_KV_CACHE_BYTES)
                )
            };
            return Some(Ok((default.max(needed), how)));
        }
    };
    if blocks < needed {
        let setting = flag.trim_start_matches("--").replace('-', "_");
        return Some(Err(EngineError::setting(
            setting,
            format!(
                "{flag} gives the KV cache {} tokens ({blocks} blocks of {}), less than one \
                 sequence of --max-model-len {} tokens ({needed} blocks, {}): raise {flag} or \
                 lower --max-model-len",
                blocks * needs.block_size,
                needs.block_size,
                needs.max_model_len,
                gib(needed as u64 * per),
            ),
        )));
    }
    Some(Ok((blocks, how)))
}

/// The worst step the scheduler can build, for measuring the activation peak: together
/// `max_num_batched_tokens` new tokens (at most `max_num_seqs` chunks of at most
/// `max_model_len`), each chunk at the end of a `max_model_len` context so attention spans the
/// longest range, with logits for every row. All chunks share one block table over blocks
/// `0..n` of a temporary cache; returns the batch and `n`.
pub fn profile_batch(
    max_num_batched_tokens: usize,
    max_model_len: usize,
    max_num_seqs: usize,
    block_size: usize,
    vocab_size: usize,
) -> (ModelBatch, usize) {
    let chunk = max_num_batched_tokens.min(max_model_len).max(1);
    let num_blocks = blocks_for(max_model_len.max(1), block_size.max(1));
    let block_table: Vec<u32> = (0..num_blocks as u32).collect();
    let mut left = max_num_batched_tokens.max(1);
    let mut seqs = Vec::new();
    while left > 0 && seqs.len() < max_num_seqs.max(1) {
        let len = left.min(chunk);
        let start_pos = max_model_len.saturating_sub(len);
        seqs.push(SeqChunk {
            tokens: (0..len)
                .map(|i| ((start_pos + i) % vocab_size.max(1)) as u32)
                .collect(),
            start_pos,
            block_table: block_table.clone(),
            logits: LogitsWanted::All,
        });
        left -= len;
    }
    (ModelBatch { seqs }, num_blocks)
}

/// The worst decode step: `max_num_seqs` one-token decodes, each at the end of a
/// `max_model_len` context over blocks `0..n` (as [`profile_batch`]'s table). The candle-ops
/// attention pads a decode group to its longest context and gathers every sequence's K and V
/// at that length, so this step can need more memory than the largest prefill step.
pub fn decode_profile_batch(
    max_num_seqs: usize,
    max_model_len: usize,
    block_size: usize,
    vocab_size: usize,
) -> ModelBatch {
    let num_blocks = blocks_for(max_model_len.max(1), block_size);
    let block_table: Vec<u32> = (0..num_blocks as u32).collect();
    let start_pos = max_model_len.saturating_sub(1);
    let seqs = (0..max_num_seqs.max(1))
        .map(|i| SeqChunk {
            tokens: vec![(i % vocab_size.max(1)) as u32],
            start_pos,
            block_table: block_table.clone(),
            logits: LogitsWanted::Last,
        })
        .collect();
    ModelBatch { seqs }
}

/// Measures a CUDA device for [`gpu_kv_cache_blocks`]: memory in use now (weights loaded), then
/// the extra memory of forward passes of `batches` (the largest prefill step of
/// [`profile_batch`] and the worst decode step of [`decode_profile_batch`]); the pool keeps
/// what a pass freed, so the memory gone after all of them is the largest peak.
#[cfg(feature = "cuda")]
pub(crate) fn measure_gpu(
    model: &crate::model::Mpt,
    batches: &[&ModelBatch],
    profile_blocks: usize,
    block_size: usize,
) -> Result<GpuMemory> {
    use crate::kv::KvCache;
    let candle_core::Device::Cuda(cuda) = model.device() else {
        return Err(EngineError::setting(
            "device",
            "GPU memory can only be measured on a CUDA device",
        ));
    };
    let context = cuda.cuda_stream().context().clone();
    let driver = |e: candle_core::cuda_backend::cudarc::driver::DriverError| {
        EngineError::setting("gpu_memory_utilization", format!("CUDA driver: {e}"))
    };
    let device = model.device();
    device.synchronize()?;
    let (free, total) = context.mem_get_info().map_err(driver)?;
    let used_after_weights = (total - free) as u64;
    let pooled = context.has_async_alloc();
    if pooled {
        pool::keep_freed_memory(context.cu_device()).map_err(driver)?;
    } else {
        tracing::warn!(
            "this GPU has no stream-ordered allocator: the activation peak is under-measured; \
             size the KV cache with --kv-cache-memory"
        );
    }
    let mut cache = KvCache::new_tensors(
        model.config(),
        profile_blocks,
        block_size,
        device,
        model.dtype(),
    )?;
    device.synchronize()?;
    let (free_before, _) = context.mem_get_info().map_err(driver)?;
    let mut outputs = Vec::with_capacity(batches.len());
    for batch in batches {
        let logits = model.forward(batch, &mut cache).map_err(|e| {
            EngineError::setting(
                "max_num_batched_tokens",
                format!(
                    "the profiling forward pass of the largest step ({} tokens in {} sequences, \
                     contexts up to {}) failed: {e}. Lower --max-num-batched-tokens, \
                     --max-num-seqs or --max-model-len (attention scores grow with their \
                     product), or pick --attention-kernels custom",
                    batch.num_tokens(),
                    batch.seqs.len(),
                    batch
                        .seqs
                        .iter()
                        .map(|s| s.context_len())
                        .max()
                        .unwrap_or(0),
                ),
            )
        })?;
        outputs.push(logits);
    }
    device.synchronize()?;
    let (free_after, _) = context.mem_get_info().map_err(driver)?;
    drop(outputs);
    drop(cache);
    device.synchronize()?;
    if pooled {
        // Hand the profile's memory back so the KV pool is one fresh allocation; the pool grows
        // to the same peak again on the first large step and keeps it.
        pool::trim(context.cu_device()).map_err(driver)?;
    }
    Ok(GpuMemory {
        total: total as u64,
        used_after_weights,
        activation_peak: free_before.saturating_sub(free_after) as u64,
    })
}

/// The device's stream-ordered memory pool (candle allocates with `cuMemAllocAsync`).
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod pool {
    use candle_core::cuda_backend::cudarc::driver::{DriverError, result, sys};

    /// Sets the release threshold to "never": memory freed by a forward pass stays reserved for
    /// the next one instead of going back to the driver at every synchronisation. This makes
    /// free memory after the profile pass show its peak, and spares later steps re-mapping it.
    pub(super) fn keep_freed_memory(device: sys::CUdevice) -> Result<(), DriverError> {
        let mut threshold: u64 = u64::MAX;
        // SAFETY: `device` comes from a live CUDA context; the attribute takes a cuuint64_t.
        unsafe {
            let pool = result::device::get_mem_pool(device)?;
            result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            )
        }
    }

    /// Returns the pool's unused memory to the driver.
    pub(super) fn trim(device: sys::CUdevice) -> Result<(), DriverError> {
        // SAFETY: `device` comes from a live CUDA context; trimming only releases unused memory.
        unsafe { result::mem_pool::trim_to(result::device::get_mem_pool(device)?, 0) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB: u64 = 1 << 30;

    fn needs(max_model_len: usize) -> PoolNeeds {
        PoolNeeds {
            // MPT-30B in bf16: 2 × 48 layers × 7168 × 2 bytes per token, 16 tokens per block.
            bytes_per_block: 2 * 48 * 7168 * 2 * 16,
            block_size: 16,
            max_model_len,
            max_num_batched_tokens: 4096,
        }
    }

    #[test]
    fn pool_gets_the_fraction_minus_weights_and_activation_peak() {
        let memory = GpuMemory {
            total: 80 * GB,
            used_after_weights: 60 * GB,
            activation_peak: 2 * GB,
        };
        // (One 8k sequence, 512 blocks, would not fit in what is left: see the next test.)
        let n = needs(4096);
        let blocks = gpu_kv_cache_blocks(&memory, 0.9, &n).expect("fits");
        let left = (80.0 * 0.9 * GB as f64) as u64 - 62 * GB;
        assert_eq!(blocks as u64, left / n.bytes_per_block);
        // ≈ 10 GiB of 21 MiB blocks.
        assert_eq!(blocks, 487);
        // A larger fraction gives more; the whole card is the limit.
        let all = gpu_kv_cache_blocks(&memory, 1.0, &n).expect("fits");
        assert_eq!(all as u64, 18 * GB / n.bytes_per_block);
    }

    #[test]
    fn too_little_room_names_what_to_change() {
        let memory = GpuMemory {
            total: 80 * GB,
            used_after_weights: 70 * GB,
            activation_peak: 2 * GB,
        };
        // 0.9 × 80 = 72 GiB, all taken.
        let err = gpu_kv_cache_blocks(&memory, 0.9, &needs(2048)).expect_err("no room");
        let text = err.to_string();
        assert!(text.contains("no memory is left"), "{text}");
        assert!(text.contains("--gpu-memory-utilization"), "{text}");
        assert!(text.contains("gpu_memory_utilization"), "{text}");
        // Some room, but not for one 8k sequence (512 blocks): the message gives both numbers.
        let err = gpu_kv_cache_blocks(&memory, 0.95, &needs(8192)).expect_err("too small");
        let text = err.to_string();
        assert!(text.contains("--max-model-len 8192"), "{text}");
        assert!(text.contains("512 blocks"), "{text}");
        // The same room is enough for a 2k context.
        assert!(gpu_kv_cache_blocks(&memory, 0.95, &needs(2048)).is_ok());
    }

    #[test]
    fn fraction_out_of_range_is_rejected() {
        let memory = GpuMemory {
            total: 80 * GB,
            used_after_weights: 0,
            activation_peak: 0,
        };
        for bad in [0.0, -0.5, 1.5, f64::NAN] {
            assert!(
                gpu_kv_cache_blocks(&memory, bad, &needs(16)).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn explicit_sizes_win_and_cpu_auto_is_the_default_budget() {
        let needs = |bytes_per_block, max_model_len| PoolNeeds {
            bytes_per_block,
            block_size: 16,
            max_model_len,
            max_num_batched_tokens: 512,
        };
        let fixed = |size, on_gpu, needs: &PoolNeeds| {
            fixed_kv_cache_blocks(size, on_gpu, needs).map(|r| r.expect("fits").0)
        };
        assert_eq!(
            fixed(KvCacheSize::Blocks(7), true, &needs(100, 100)),
            Some(7)
        );
        assert_eq!(
            fixed(KvCacheSize::Bytes(1000), true, &needs(100, 160)),
            Some(10)
        );
        assert!(fixed_kv_cache_blocks(KvCacheSize::Auto, true, &needs(100, 100)).is_none());
        let (blocks, how) = fixed_kv_cache_blocks(KvCacheSize::Auto, false, &needs(1 << 20, 2048))
            .expect("cpu")
            .expect("fits");
        assert_eq!(blocks, 1024);
        assert!(how.contains("CPU default"), "{how}");
    }

    #[test]
    fn cpu_pools_hold_one_full_length_sequence() {
        // MPT-7B in f32: 1 MiB of K and V per token, 16 MiB a block; 2048 tokens need 2 GiB.
        let mpt_7b = PoolNeeds {
            bytes_per_block: 16 << 20,
            block_size: 16,
            max_model_len: 2048,
            max_num_batched_tokens: 2048,
        };
        let (blocks, how) = fixed_kv_cache_blocks(KvCacheSize::Auto, false, &mpt_7b)
            .expect("cpu")
            .expect("the default grows to one sequence");
        assert_eq!(blocks, 128);
        assert!(how.contains("--max-model-len 2048"), "{how}");
        for (size, flag) in [
            (KvCacheSize::Bytes(1 << 30), "--kv-cache-memory"),
            (KvCacheSize::Blocks(100), "--num-kv-blocks"),
        ] {
            let err = fixed_kv_cache_blocks(size, false, &mpt_7b)
                .expect("fixed")
                .expect_err("too small for one sequence");
            let text = err.to_string();
            assert!(
                text.contains(flag) && text.contains("--max-model-len"),
                "{text}"
            );
        }
    }

    #[test]
    fn decode_profile_is_every_sequence_at_the_longest_context() {
        let batch = decode_profile_batch(64, 8192, 16, 50432);
        assert_eq!(batch.seqs.len(), 64);
        assert_eq!(batch.num_tokens(), 64);
        assert!(batch.seqs.iter().all(|s| s.context_len() == 8192));
        assert!(batch.seqs.iter().all(|s| s.block_table.len() == 512));
        assert_eq!(batch.num_logits_rows(), 64);
    }

    #[test]
    fn profile_batch_is_the_largest_step() {
        // One chunk at the end of a full context when the step is shorter than the context.
        let (batch, blocks) = profile_batch(2048, 8192, 64, 16, 50432);
        assert_eq!(blocks, 512);
        assert_eq!(batch.seqs.len(), 1);
        assert_eq!(batch.seqs[0].start_pos, 8192 - 2048);
        assert_eq!(batch.seqs[0].context_len(), 8192);
        assert_eq!(batch.num_logits_rows(), 2048);
        // Several full-length sequences (and a remainder) when the step is longer.
        let (batch, blocks) = profile_batch(5000, 2048, 64, 16, 1024);
        assert_eq!(blocks, 128);
        let lens: Vec<_> = batch.seqs.iter().map(|s| s.tokens.len()).collect();
        assert_eq!(lens, [2048, 2048, 904]);
        assert!(batch.seqs.iter().all(|s| s.context_len() == 2048));
        assert!(batch.seqs.iter().flat_map(|s| &s.tokens).all(|&t| t < 1024));
        // Never more chunks than sequences per step.
        let (batch, _) = profile_batch(5000, 100, 4, 16, 1024);
        assert_eq!(batch.num_tokens(), 400);
    }
}
