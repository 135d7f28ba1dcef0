//! The paged KV cache's storage: per layer, one pool of K blocks and one of V blocks. It knows
//! nothing about which sequence owns which block (that is the block allocator's job); it only
//! reads and writes slots named by block tables.
//!
//! CPU layout per layer: `[num_blocks][n_heads][block_size][head_dim]` in f32, so one head's keys in
//! a block are contiguous for the attention kernel. The cache is f32 on CPU whatever the weights'
//! dtype: attention accumulates in f32 anyway and CPU memory is plentiful.

use candle_core::Device;

use crate::config::MptConfig;
use crate::error::{EngineError, Result};

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
    /// Allocates `num_blocks` blocks of `block_size` tokens for every layer of `config`.
    pub fn new(
        config: &MptConfig,
        num_blocks: usize,
        block_size: usize,
        device: &Device,
    ) -> Result<Self> {
        if block_size == 0 {
            return Err(EngineError::setting("block_size", "must be at least 1"));
        }
        if num_blocks == 0 {
            return Err(EngineError::setting(
                "num_kv_blocks",
                "the KV cache needs at least one block",
            ));
        }
        let geometry = KvGeometry {
            num_blocks,
            block_size,
            n_heads: config.n_heads,
            head_dim: config.head_dim(),
        };
        let storage = match device {
            Device::Cpu => {
                let len = num_blocks * geometry.block_len();
                KvStorage::Cpu(
                    (0..config.n_layers)
                        .map(|_| LayerKv {
                            k: vec![0.0; len],
                            v: vec![0.0; len],
                        })
                        .collect(),
                )
            }
            other => {
                return Err(EngineError::setting(
                    "device",
                    format!("the paged KV cache does not support {other:?} yet"),
                ));
            }
        };
        Ok(Self { geometry, storage })
    }

    /// Bytes one block takes over all layers (K and V).
    pub fn bytes_per_block(config: &MptConfig, block_size: usize) -> u64 {
        let floats = 2 * config.n_layers * block_size * config.d_model;
        (floats * std::mem::size_of::<f32>()) as u64
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
        }
        Ok(())
    }
}
