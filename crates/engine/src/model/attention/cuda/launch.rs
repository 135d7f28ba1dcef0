//! Launches of our CUDA attention kernels (`meta.rs` has the host-side logic and its tests): a
//! candle `CustomOp1` on the queries that reads the pools, metadata and slopes from tensors it
//! holds. Kernel launches are FFI, hence the `unsafe` blocks.
//!
//! NOT YET RUN ON A GPU: compiled, never launched (see docs/gpu.md).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorageSlice, WrapErr};
use candle_core::{CudaStorage, CustomOp1, DType, Device, Layout, Shape, Storage, Tensor};

use super::meta::{KernelMeta, Launch, LaunchPlan, kernel_suffix};
use crate::api::error::{EngineError, Result};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/paged_attention.ptx"));
const MODULE: &str = "mpt_paged_attention";

/// A batch's kernel inputs on the device, built once per forward.
#[derive(Debug)]
pub(crate) struct KernelInputs {
    meta: KernelMeta,
    /// `meta.ints` on the device (i32).
    ints: Tensor,
    /// ALiBi slopes (f32, heads).
    slopes: Tensor,
}

impl KernelInputs {
    /// Uploads the packed metadata and the slopes.
    pub(crate) fn new(meta: KernelMeta, slopes: &[f32], device: &Device) -> Result<Self> {
        let ints = Tensor::from_slice(&meta.ints, meta.ints.len(), device)?;
        let slopes = Tensor::from_slice(slopes, slopes.len(), device)?;
        Ok(Self { meta, ints, slopes })
    }
}

/// Attention output `(tokens, heads · head_dim)` for `q` of that shape, by our kernels.
pub(crate) fn attention(
    inputs: &KernelInputs,
    k_pool: &Tensor,
    v_pool: &Tensor,
    q: &Tensor,
    scale: f32,
) -> Result<Tensor> {
    let (_, block_size, heads, head_dim) = k_pool.dims4()?;
    if kernel_suffix(q.dtype(), head_dim).is_none() || k_pool.dtype() != q.dtype() {
        return Err(EngineError::setting(
            "attention_kernels",
            format!(
                "no kernel for {:?} queries, {:?} cache, head dim {head_dim}",
                q.dtype(),
                k_pool.dtype()
            ),
        ));
    }
    let n = q.dim(0)?;
    let q = q.reshape((n, heads, head_dim))?.contiguous()?;
    let op = PagedAttention {
        inputs,
        k_pool,
        v_pool,
        scale,
        heads,
        head_dim,
        block_size,
    };
    Ok(q.apply_op1_no_bwd(&op)?.reshape((n, heads * head_dim))?)
}

struct PagedAttention<'a> {
    inputs: &'a KernelInputs,
    k_pool: &'a Tensor,
    v_pool: &'a Tensor,
    scale: f32,
    heads: usize,
    head_dim: usize,
    block_size: usize,
}

/// An uninitialised device buffer of `like`'s element type.
///
/// # Safety
/// The caller must write every element before it is read.
unsafe fn alloc_like<T: DeviceRepr>(
    dev: &CudaDevice,
    _like: &CudaView<'_, T>,
    len: usize,
) -> candle_core::Result<CudaSlice<T>> {
    // SAFETY: forwarded to the caller.
    unsafe { dev.alloc::<T>(len) }
}

fn cuda_of<'g>(
    guard: &'g candle_core::StorageRef<'_>,
    what: &str,
) -> candle_core::Result<&'g CudaStorage> {
    match &**guard {
        Storage::Cuda(c) => Ok(c),
        _ => candle_core::bail!("paged attention kernels: {what} is not on a CUDA device"),
    }
}

impl CustomOp1 for PagedAttention<'_> {
    fn name(&self) -> &'static str {
        "mpt-paged-attention"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("the paged attention kernels run on CUDA devices only")
    }

    fn cuda_fwd(&self, q: &CudaStorage, q_l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = q.device().clone();
        let (k_guard, k_l) = self.k_pool.storage_and_layout();
        let (v_guard, v_l) = self.v_pool.storage_and_layout();
        let (i_guard, i_l) = self.inputs.ints.storage_and_layout();
        let (s_guard, s_l) = self.inputs.slopes.storage_and_layout();
        let (k, v) = (cuda_of(&k_guard, "K")?, cuda_of(&v_guard, "V")?);
        let ints = cuda_of(&i_guard, "metadata")?.as_cuda_slice::<i32>()?;
        let slopes = cuda_of(&s_guard, "slopes")?.as_cuda_slice::<f32>()?;
        let ints = ints.slice(i_l.start_offset()..);
        let slopes = slopes.slice(s_l.start_offset()..);
        let meta = &self.inputs.meta;
        let suffix = kernel_suffix(q.dtype(), self.head_dim)
            .ok_or_else(|| candle_core::Error::Msg("unsupported dtype/head dim".into()))?;
        let (h, d) = (self.heads, self.head_dim);
        let n_heads = h as i32;
        let block_size = self.block_size as i32;
        let q_start = ints.slice(meta.q_start..);
        let ctx_len = ints.slice(meta.ctx_len..);
        let table_off = ints.slice(meta.table_off..);
        let tiles = ints.slice(meta.tiles..);
        let tables = ints.slice(meta.tables..);
        let plan = LaunchPlan::new(meta, h);
        let config = |l: Launch| LaunchConfig {
            grid_dim: l.grid,
            block_dim: l.block,
            shared_mem_bytes: 0,
        };
        macro_rules! run {
            ($variant:ident) => {{
                let (
                    CudaStorageSlice::$variant(qs),
                    CudaStorageSlice::$variant(ks),
                    CudaStorageSlice::$variant(vs),
                ) = (&q.slice, &k.slice, &v.slice)
                else {
                    candle_core::bail!("paged attention: q, K and V dtypes differ")
                };
                let qs = qs.slice(q_l.start_offset()..);
                let ks = ks.slice(k_l.start_offset()..);
                let vs = vs.slice(v_l.start_offset()..);
                // SAFETY: every element is written by the kernels below (each (row, head)
                // output row by one block).
                let out = unsafe { alloc_like(&dev, &qs, meta.num_tokens * h * d)? };
                match plan {
                    LaunchPlan::Prefill(launch) => {
                        let name = format!("paged_prefill_{suffix}");
                        let f = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
                        let mut b = f.builder();
                        b.arg(&qs)
                            .arg(&ks)
                            .arg(&vs)
                            .arg(&out)
                            .arg(&tiles)
                            .arg(&q_start);
                        b.arg(&ctx_len).arg(&table_off).arg(&tables).arg(&slopes);
                        b.arg(&self.scale).arg(&n_heads).arg(&block_size);
                        // SAFETY: argument list matches `paged_prefill_*` in the .cu file;
                        // buffers are sized from the same metadata the kernel reads.
                        unsafe { b.launch(config(launch)) }.w()?;
                    }
                    LaunchPlan::Decode {
                        main,
                        reduce,
                        splits,
                    } => {
                        let parts = meta.num_seqs * h * splits;
                        // SAFETY: the decode kernel writes every partial (empty splits too).
                        let part_out = unsafe { dev.alloc::<f32>(parts * d)? };
                        let part_ml = unsafe { dev.alloc::<f32>(parts * 2)? };
                        let name = format!("paged_decode_{suffix}");
                        let f = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
                        let mut b = f.builder();
                        b.arg(&qs).arg(&ks).arg(&vs).arg(&part_out).arg(&part_ml);
                        b.arg(&ctx_len).arg(&table_off).arg(&tables).arg(&slopes);
                        b.arg(&self.scale).arg(&n_heads).arg(&block_size);
                        // SAFETY: as above, for `paged_decode_*`.
                        unsafe { b.launch(config(main)) }.w()?;
                        let ty = suffix.split('_').next().unwrap_or("f32");
                        let name = format!("paged_decode_reduce_{ty}");
                        let f = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
                        let (head_dim, splits) = (d as i32, splits as i32);
                        let mut b = f.builder();
                        b.arg(&part_out).arg(&part_ml).arg(&out).arg(&ctx_len);
                        b.arg(&n_heads).arg(&head_dim).arg(&splits);
                        // SAFETY: as above, for `paged_decode_reduce_*`.
                        unsafe { b.launch(config(reduce)) }.w()?;
                    }
                }
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match q.dtype() {
            DType::BF16 => run!(BF16),
            DType::F16 => run!(F16),
            DType::F32 => run!(F32),
            other => candle_core::bail!("paged attention kernels: no {other:?} variant"),
        };
        Ok((out, Shape::from((meta.num_tokens, h, d))))
    }
}
