//! Paged causal ALiBi attention over the KV cache, with one entry point for the model whatever
//! computes it ([`Backend`]): our CPU kernels over host pools (`cpu/`), candle tensor ops over
//! device pools (`tensor_ops.rs`, any candle device), or our CUDA kernels (`cuda/`, only when
//! asked for).
//!
//! Per forward pass the model asks for a [`StepPlan`] once, before the layer loop, then calls
//! [`Attention::forward`] per layer; each layer's call first writes the step's new K/V into
//! their cache slots, then attends over every sequence's cached context.

pub(crate) mod cpu;
pub(crate) mod cuda;
pub(crate) mod tensor_ops;

use candle_core::{DType, Device, Tensor};

use self::cpu::TokenSlot;
use self::tensor_ops::TensorPlan;
use super::batch::ModelBatch;
use crate::api::error::{EngineError, Result};
use crate::kv::KvCache;
use crate::kv::storage::KvStorage;

/// Which implementation computes attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    /// Our SIMD kernels over host-memory pools; whenever the cache lives in host memory.
    Cpu,
    /// candle tensor ops over device pools (correct by construction; the GPU's default).
    TensorOps,
    /// Our paged CUDA kernels over device pools (`--attention-kernels custom`).
    CudaKernels,
}

/// A model's attention: its ALiBi slopes, softmax scale and the choice of CUDA kernels.
#[derive(Debug)]
pub(crate) struct Attention {
    slopes: Vec<f32>,
    scale: f32,
    cuda_kernels: bool,
}

/// What one forward pass's attention needs, prepared once before the layer loop.
pub(crate) enum StepPlan<'a> {
    /// Where each new token sits, for the CPU kernels.
    Cpu(Vec<TokenSlot<'a>>),
    /// Index and bias tensors (or the CUDA kernels' metadata), already on the device.
    Tensors(TensorPlan),
}

impl Attention {
    /// Attention with these per-head ALiBi slopes and softmax scale, on candle ops off the CPU.
    pub(crate) fn new(slopes: Vec<f32>, scale: f32) -> Self {
        Self {
            slopes,
            scale,
            cuda_kernels: false,
        }
    }

    /// Selects our own CUDA attention kernels instead of candle tensor ops for device pools.
    /// Fails unless built with the `cuda` feature, on a CUDA device, for a dtype and head dim
    /// the kernels are instantiated for (f32/f16/bf16; 64, 112, 128).
    pub(crate) fn use_cuda_kernels(
        &mut self,
        on: bool,
        device: &Device,
        dtype: DType,
        head_dim: usize,
    ) -> Result<()> {
        if on {
            let refuse = |why: String| Err(EngineError::setting("attention_kernels", why));
            if !cfg!(feature = "cuda") {
                return refuse(
                    "this build has no CUDA kernels (build with --features cuda)".into(),
                );
            }
            if !device.is_cuda() {
                return refuse("the CUDA attention kernels need a CUDA device".into());
            }
            if cuda::meta::kernel_suffix(dtype, head_dim).is_none() {
                return refuse(format!("no kernel for {dtype:?} with head dim {head_dim}"));
            }
        }
        self.cuda_kernels = on;
        Ok(())
    }

    /// The implementation that serves `cache`.
    pub(crate) fn backend(&self, cache: &KvCache) -> Backend {
        match (&cache.storage, self.cuda_kernels) {
            (KvStorage::Cpu(_), _) => Backend::Cpu,
            (KvStorage::Tensors(_), false) => Backend::TensorOps,
            (KvStorage::Tensors(_), true) => Backend::CudaKernels,
        }
    }

    /// Prepares `batch` for every layer: token slots on the CPU, uploaded index tensors on a
    /// device.
    pub(crate) fn plan<'a>(
        &self,
        batch: &'a ModelBatch,
        cache: &KvCache,
        device: &Device,
    ) -> Result<StepPlan<'a>> {
        let backend = self.backend(cache);
        if backend == Backend::Cpu {
            let slots = batch
                .seqs
                .iter()
                .enumerate()
                .flat_map(|(seq, chunk)| {
                    (chunk.start_pos..chunk.context_len()).map(move |pos| TokenSlot {
                        seq,
                        block_table: &chunk.block_table,
                        pos,
                    })
                })
                .collect();
            return Ok(StepPlan::Cpu(slots));
        }
        let kernels = backend == Backend::CudaKernels;
        let plan = TensorPlan::new(batch, &cache.geometry, &self.slopes, device, kernels)?;
        Ok(StepPlan::Tensors(plan))
    }

    /// Writes one layer's new K/V (`(tokens, d_model)` each) into `cache` and returns the
    /// attention output for queries `q` of the same shape, in `q`'s dtype and device.
    pub(crate) fn forward(
        &self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        plan: &StepPlan<'_>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let geometry = cache.geometry;
        match (&mut cache.storage, plan) {
            (KvStorage::Cpu(layers), StepPlan::Cpu(slots)) => {
                let pool = &mut layers[layer];
                cpu::store_kv(&geometry, pool, slots, &host_f32(k)?, &host_f32(v)?);
                let out = cpu::paged_attention(
                    &geometry,
                    pool,
                    slots,
                    &host_f32(q)?,
                    &self.slopes,
                    self.scale,
                );
                let out = Tensor::from_vec(out, q.dims(), &Device::Cpu)?;
                Ok(out.to_dtype(q.dtype())?.to_device(q.device())?)
            }
            (KvStorage::Tensors(layers), StepPlan::Tensors(plan)) => {
                let (k_pool, v_pool) = &layers[layer];
                tensor_ops::scatter_kv(plan, k_pool, v_pool, k, v)?;
                tensor_ops::attention(plan, k_pool, v_pool, q, self.scale)
            }
            _ => Err(EngineError::setting(
                "batch",
                "attention plan made for another KV cache (this is a bug)",
            )),
        }
    }
}

/// `t` as a host vector of f32.
fn host_f32(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(DType::F32)?
        .contiguous()?
        .flatten_all()?
        .to_vec1::<f32>()
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
