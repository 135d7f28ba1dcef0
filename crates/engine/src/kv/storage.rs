//! The paged KV cache's storage: per layer, one pool of K blocks and one of V blocks. It knows
//! nothing about which sequence owns which block (that is the block allocator's job); it only
//! reads and writes slots named by block tables.
//!
//! CPU layout per layer, in the cache's element type (f32, f16 or bf16, `--kv-cache-dtype`;
//! the kernels widen 16-bit elements in registers): per block and head, one contiguous
//! `block_size · head_dim` span; keys stored transposed in it (`[head_dim][block_size]`: a
//! channel's keys are contiguous, one vector load scores `WIDTH` keys), values as rows
//! (`[block_size][head_dim]`). Blocks are `[n_heads]` such spans, so a block holds all heads'
//! keys (then values) contiguously.
//!
//! Tensor layout (any device, the GPU's): per layer a K and a V candle tensor of shape
//! `[num_blocks, block_size, n_heads, head_dim]` in the model's dtype (token-major, as vLLM's
//! flash-attention backend stores it), so one token's K is one contiguous row of `n_heads ·
//! head_dim` in the `[num_blocks · block_size, n_heads · head_dim]` view that writes scatter into.

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};

use crate::api::error::{EngineError, Result};
use crate::kernels::cpu::kv_elem::KvElem;
use crate::model::config::MptConfig;

/// K and V pools of one layer in one element type (layout in the module docs).
#[derive(Debug, Clone)]
pub(crate) struct Pools<T> {
    pub(crate) k: Vec<T>,
    pub(crate) v: Vec<T>,
}

impl<T: KvElem> Pools<T> {
    /// Zeroed pools, resident from the start: a fresh allocation's pages are only mapped when
    /// first touched, so without the writes the pool would become resident a block at a time
    /// as the prefix cache fills it, and the process's memory would creep up for hours.
    /// Written now, the memory the server needs is taken (and visible) at startup.
    fn zeros(len: usize) -> Self {
        let resident = |mut pool: Vec<T>| {
            // Hides that the allocator zeroed the pages, so the writes are not optimised away.
            std::hint::black_box(pool.as_mut_slice()).fill(T::from_f32(0.0));
            pool
        };
        Self {
            k: resident(T::zeros(len)),
            v: resident(T::zeros(len)),
        }
    }

    fn write(&mut self, geom: &KvGeometry, at: (usize, usize, usize), k: &[f32], v: &[f32]) {
        let (block, head, slot) = at;
        let (bs, hd) = (geom.block_size, geom.head_dim);
        let base = geom.head_base(block, head);
        // The key is rounded a run of channels at a time, then stored a channel per
        // `block_size` (transposed).
        const RUN: usize = 64;
        let mut rounded = [T::default(); RUN];
        for (c, channels) in k[..hd].chunks(RUN).enumerate() {
            let run = &mut rounded[..channels.len()];
            T::from_f32_slice(channels, run);
            for (d, &x) in run.iter().enumerate() {
                self.k[base + (c * RUN + d) * bs + slot] = x;
            }
        }
        T::from_f32_slice(&v[..hd], &mut self.v[base + slot * hd..][..hd]);
    }
}

/// K and V pools of one layer on the host, in the cache's element type.
#[derive(Debug, Clone)]
pub(crate) enum LayerKv {
    /// 32-bit floats (the golden tests' exact cache).
    F32(Pools<f32>),
    /// IEEE half precision.
    F16(Pools<f16>),
    /// bfloat16.
    Bf16(Pools<bf16>),
}

impl LayerKv {
    /// Zeroed pools of `len` elements each, of `dtype` (f32, f16 or bf16).
    pub(crate) fn zeros(dtype: DType, len: usize) -> Result<Self> {
        Ok(match dtype {
            DType::F32 => Self::F32(Pools::zeros(len)),
            DType::F16 => Self::F16(Pools::zeros(len)),
            DType::BF16 => Self::Bf16(Pools::zeros(len)),
            other => {
                return Err(EngineError::setting(
                    "kv_cache_dtype",
                    format!("a CPU KV cache holds f32, f16 or bf16, not {other:?}"),
                ));
            }
        })
    }

    /// The element type.
    pub(crate) fn dtype(&self) -> DType {
        match self {
            Self::F32(_) => DType::F32,
            Self::F16(_) => DType::F16,
            Self::Bf16(_) => DType::BF16,
        }
    }

    /// Writes one token's key and value rows of one head (`head_dim` floats each, rounded to
    /// the element type) at `(block, head, slot in block)`.
    pub(crate) fn write(
        &mut self,
        geom: &KvGeometry,
        at: (usize, usize, usize),
        k: &[f32],
        v: &[f32],
    ) {
        match self {
            Self::F32(p) => p.write(geom, at, k, v),
            Self::F16(p) => p.write(geom, at, k, v),
            Self::Bf16(p) => p.write(geom, at, k, v),
        }
    }

    /// Copies block `src` over block `dst` (`len` elements per block) in both pools.
    fn copy_block(&mut self, src: usize, dst: usize, len: usize) {
        fn copy<T: Copy>(p: &mut Pools<T>, src: usize, dst: usize, len: usize) {
            p.k.copy_within(src * len..(src + 1) * len, dst * len);
            p.v.copy_within(src * len..(src + 1) * len, dst * len);
        }
        match self {
            Self::F32(p) => copy(p, src, dst, len),
            Self::F16(p) => copy(p, src, dst, len),
            Self::Bf16(p) => copy(p, src, dst, len),
        }
    }
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
    /// Elements in one block of one layer's K (or V) pool.
    pub fn block_len(&self) -> usize {
        self.n_heads * self.block_size * self.head_dim
    }

    /// Offset of one head's span (`block_size · head_dim` elements) of a block in a CPU pool.
    pub fn head_base(&self, block: usize, head: usize) -> usize {
        (block * self.n_heads + head) * self.block_size * self.head_dim
    }

    /// Offset of the value row of (block, head, slot-in-block) in a CPU pool.
    pub fn offset(&self, block: usize, head: usize, in_block: usize) -> usize {
        self.head_base(block, head) + in_block * self.head_dim
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
    /// f32 pools on the CPU, bf16 tensor pools on any other device (use [`KvCache::with_dtype`]
    /// to choose the dtype).
    pub fn new(
        config: &MptConfig,
        num_blocks: usize,
        block_size: usize,
        device: &Device,
    ) -> Result<Self> {
        let dtype = if device.is_cpu() {
            DType::F32
        } else {
            DType::BF16
        };
        Self::with_dtype(config, num_blocks, block_size, device, dtype)
    }

    /// Allocates the pools with elements of `dtype`: host pools (f32, f16 or bf16) read by our
    /// kernels on the CPU, tensor pools on any other device.
    pub fn with_dtype(
        config: &MptConfig,
        num_blocks: usize,
        block_size: usize,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        match device {
            Device::Cpu => Self::new_cpu(config, num_blocks, block_size, dtype),
            other => Self::new_tensors(config, num_blocks, block_size, other, dtype),
        }
    }

    /// The pools' element type.
    pub fn dtype(&self) -> DType {
        match &self.storage {
            KvStorage::Cpu(layers) => layers.first().map_or(DType::F32, LayerKv::dtype),
            KvStorage::Tensors(layers) => layers.first().map_or(DType::F32, |(k, _)| k.dtype()),
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

    fn new_cpu(
        config: &MptConfig,
        num_blocks: usize,
        block_size: usize,
        dtype: DType,
    ) -> Result<Self> {
        let geometry = Self::geometry_for(config, num_blocks, block_size)?;
        let len = num_blocks * geometry.block_len();
        let storage = KvStorage::Cpu(
            (0..config.n_layers)
                .map(|_| LayerKv::zeros(dtype, len))
                .collect::<Result<_>>()?,
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

    /// Bytes one block takes over all layers (K and V) with elements of `dtype`.
    pub fn bytes_per_block_dtype(config: &MptConfig, block_size: usize, dtype: DType) -> u64 {
        let elements = 2 * config.n_layers * block_size * config.d_model;
        (elements * dtype.size_in_bytes()) as u64
    }

    /// How many blocks of `dtype` elements fit in `bytes`.
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
                    layer.copy_block(src, dst, len);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> MptConfig {
        MptConfig::from_json(crate::model::demo::CONFIG_JSON).expect("demo config")
    }

    #[test]
    fn sixteen_bit_pools_take_half_the_bytes_and_hold_twice_the_blocks() {
        let cfg = config();
        let f32_block = KvCache::bytes_per_block_dtype(&cfg, 16, DType::F32);
        assert_eq!(f32_block, (2 * cfg.n_layers * 16 * cfg.d_model * 4) as u64);
        for dtype in [DType::F16, DType::BF16] {
            assert_eq!(
                KvCache::bytes_per_block_dtype(&cfg, 16, dtype) * 2,
                f32_block
            );
            let blocks = KvCache::blocks_for_bytes_dtype(&cfg, 16, dtype, 100 * f32_block);
            assert_eq!(blocks, 200);
            let cache = KvCache::with_dtype(&cfg, 3, 16, &Device::Cpu, dtype).expect("allocates");
            assert_eq!(cache.dtype(), dtype);
        }
        let err = KvCache::with_dtype(&cfg, 3, 16, &Device::Cpu, DType::U8).expect_err("u8");
        assert!(err.to_string().contains("kv_cache_dtype"), "{err}");
    }

    #[test]
    fn writes_round_to_the_element_type_and_copies_move_whole_blocks() {
        let cfg = config();
        let mut cache = KvCache::with_dtype(&cfg, 4, 4, &Device::Cpu, DType::F16).expect("cache");
        let geom = cache.geometry();
        let hd = geom.head_dim;
        let k: Vec<f32> = (0..hd).map(|i| 1.0 + i as f32 / 3.0).collect();
        let v: Vec<f32> = (0..hd).map(|i| -(i as f32) * 1e5).collect();
        let KvStorage::Cpu(layers) = &mut cache.storage else {
            panic!("host pools on the CPU")
        };
        layers[0].write(&geom, (1, 0, 2), &k, &v);
        cache.copy_block(1, 3).expect("in range");
        let KvStorage::Cpu(layers) = &cache.storage else {
            panic!("host pools on the CPU")
        };
        let LayerKv::F16(p) = &layers[0] else {
            panic!("an f16 pool")
        };
        for block in [1, 3] {
            let base = geom.head_base(block, 0);
            for d in 0..hd {
                // Keys are stored transposed: channel d of slot 2 at d · block_size + 2.
                assert_eq!(p.k[base + d * 4 + 2].to_f32(), f16::from_f32(k[d]).to_f32());
                // Values beyond f16's range saturate instead of becoming infinite.
                let want = f16::from_f32(v[d].max(-65504.0)).to_f32();
                assert_eq!(p.v[geom.offset(block, 0, 2) + d].to_f32(), want);
            }
        }
        assert!(cache.copy_block(0, 4).is_err());
    }
}
