//! The paged KV cache's storage: per layer, one pool of K blocks and one of V blocks. It knows
//! nothing about which sequence owns which block (that is the block allocator's job); it only
//! reads and writes slots named by block tables.
//!
//! CPU layout per layer: `[num_blocks][n_heads][block_size][head_dim]` in f32, so one head's keys in
//! a block are contiguous for the attention kernel. The cache is f32 on CPU whatever the weights'
//! dtype: attention accumulates in f32 anyway and CPU memory is plentiful.
//!
//! Tensor layout (any device, the GPU's): per layer a K and a V candle tensor of shape
//! `[num_blocks, block_size, n_heads, head_dim]` in the model's dtype (token-major, as vLLM's
//! flash-attention backend stores it), so one token's K is one contiguous row of `n_heads ·
//! head_dim` in the `[num_blocks · block_size, n_heads · head_dim]` view that writes scatter into.

use candle_core::{DType, Device, Tensor};

use crate::api::error::{EngineError, Result};
use crate::model::config::MptConfig;

/// K and V pools of one layer.
#[derive(Debug, Clone)]
pub(crate) struct LayerKv {
    pub(crate) k: Vec<f32>,
    pub(crate) v: Vec<f32>,
}

/// Where the pools live.
#[derive(Debug)]
pub(crate) enum KvStorage {
    /// Host memory, read by the CPU attention kernel.
    Cpu(Vec<LayerKv>),
    /// Candle tensors `(k, v)` per layer, `[num_blocks, block_size, n_heads, head_dim]`, read by
    /// the tensor-op attention path (and the CUDA kernels).
    Tensors(Vec<(Tensor, Tensor)>),
}

/// Geometry of the cache, shared by the kernel and the bookkeeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvGeometry {
    /// Blocks in the pool.
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Attention heads.
    pub n_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

impl KvGeometry {
    /// Floats in one block of one layer's K (or V) pool.
    pub fn block_len(&self) -> usize {
        self.n_heads * self.block_size * self.head_dim
    }

    /// Offset of (block, head, slot-in-block) in a layer pool.
    pub fn offset(&self, block: usize, head: usize, in_block: usize) -> usize {
        ((block * self.n_heads + head) * self.block_size + in_block) * self.head_dim
    }
}

/// The preallocated block pool for every layer.
#[derive(Debug)]
pub struct KvCache {
    pub(crate) geometry: KvGeometry,
    pub(crate) storage: KvStorage,
}

impl KvCache {
    /// Allocates `num_blocks` blocks of `block_size` tokens for every layer of `config`: host
    /// f32 pools on the CPU, bf16 tensor pools on any other device (use [`KvCache::new_tensors`]
    /// to choose the dtype).
    pub fn new(
        config: &MptConfig,
        num_blocks: usize,
        block_size: usize,
        device: &Device,
    ) -> Result<Self> {
        match device {
            Device::Cpu => Self::new_cpu(config, num_blocks, block_size),
            other => Self::new_tensors(config, num_blocks, block_size, other, DType::BF16),
        }
    }

    /// Allocates tensor pools of `dtype` on `device` (any device, the CPU included: that is how
    /// the tensor attention path is tested without a GPU).
    pub fn new_tensors(
        config: &MptConfig,
        num_blocks: usize,
        block_size: usize,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let geometry = Self::geometry_for(config, num_blocks, block_size)?;
        let shape = (num_blocks, block_size, config.n_heads, config.head_dim());
        let layers = (0..config.n_layers)
            .map(|_| {
                Ok((
                    Tensor::zeros(shape, dtype, device)?,
                    Tensor::zeros(shape, dtype, device)?,
                ))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            geometry,
            storage: KvStorage::Tensors(layers),
        })
    }

    fn new_cpu(config: &MptConfig, num_blocks: usize, block_size: usize) -> Result<Self> {
        let geometry = Self::geometry_for(config, num_blocks, block_size)?;
        let len = num_blocks * geometry.block_len();
        let storage = KvStorage::Cpu(
            (0..config.n_layers)
                .map(|_| LayerKv {
                    k: resident_zeros(len),
                    v: resident_zeros(len),
                })
                .collect(),
        );
        Ok(Self { geometry, storage })
    }

    fn geometry_for(
        config: &MptConfig,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<KvGeometry> {
        if block_size == 0 {
            return Err(EngineError::setting("block_size", "must be at least 1"));
        }
        if num_blocks == 0 {
            return Err(EngineError::setting(
                "num_kv_blocks",
                "the KV cache needs at least one block",
            ));
        }
        Ok(KvGeometry {
            num_blocks,
            block_size,
            n_heads: config.n_heads,
            head_dim: config.head_dim(),
        })
    }

    /// Bytes one block takes over all layers (K and V) in the CPU cache (f32).
    pub fn bytes_per_block(config: &MptConfig, block_size: usize) -> u64 {
        Self::bytes_per_block_dtype(config, block_size, DType::F32)
    }

    /// Bytes one block takes over all layers (K and V) with elements of `dtype` (tensor pools).
    pub fn bytes_per_block_dtype(config: &MptConfig, block_size: usize, dtype: DType) -> u64 {
        let elements = 2 * config.n_layers * block_size * config.d_model;
        (elements * dtype.size_in_bytes()) as u64
    }

    /// How many blocks of `dtype` elements fit in `bytes` (tensor pools).
    pub fn blocks_for_bytes_dtype(
        config: &MptConfig,
        block_size: usize,
        dtype: DType,
        bytes: u64,
    ) -> usize {
        (bytes / Self::bytes_per_block_dtype(config, block_size, dtype).max(1)) as usize
    }

    /// How many blocks fit in `bytes`.
    pub fn blocks_for_bytes(config: &MptConfig, block_size: usize, bytes: u64) -> usize {
        (bytes / Self::bytes_per_block(config, block_size).max(1)) as usize
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.geometry.num_blocks
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.geometry.block_size
    }

    /// The cache's shape.
    pub fn geometry(&self) -> KvGeometry {
        self.geometry
    }

    /// Copies block `src` to `dst` in every layer (copy-on-write when sequences fork).
    pub fn copy_block(&mut self, src: u32, dst: u32) -> Result<()> {
        let (src, dst) = (src as usize, dst as usize);
        let n = self.geometry.num_blocks;
        if src >= n || dst >= n {
            return Err(EngineError::setting(
                "block",
                format!("block id out of range: copy {src} -> {dst} with {n} blocks"),
            ));
        }
        let len = self.geometry.block_len();
        match &mut self.storage {
            KvStorage::Cpu(layers) => {
                for layer in layers {
                    layer.k.copy_within(src * len..(src + 1) * len, dst * len);
                    layer.v.copy_within(src * len..(src + 1) * len, dst * len);
                }
            }
            KvStorage::Tensors(layers) => {
                if src != dst {
                    for (k, v) in layers {
                        for pool in [k, v] {
                            // `copy` detaches the source block from the pool's storage, which
                            // `slice_set` requires.
                            let block = pool.narrow(0, src, 1)?.copy()?;
                            pool.slice_set(&block, 0, dst)?;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// `len` zeros, written once: a fresh allocation's pages are only mapped when first touched, so
/// without this the pool would become resident a block at a time as the prefix cache fills it,
/// and the process's memory would creep up for hours. Written now, the memory the server needs
/// is taken (and visible) at startup.
fn resident_zeros(len: usize) -> Vec<f32> {
    let mut zeros = vec![0.0f32; len];
    // Hides that the allocator zeroed the pages, so the writes below are not optimised away.
    std::hint::black_box(zeros.as_mut_slice()).fill(0.0);
    zeros
}
