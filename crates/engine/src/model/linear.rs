//! Linear layers. Decode steps multiply a few activation rows (one per running sequence) by
//! large weight matrices, where candle's general GEMM leaves much of the memory bandwidth and FMA
//! throughput unused. So f32 on the CPU goes to our register-tiled kernel
//! (`kernels::cpu::matmul`): for every row count when the forward pass is batch-invariant (the
//! default, [`RowRouting::BatchInvariant`]), else only up to 32 rows, with prefill chunks going to
//! candle's GEMM, whose per-element sums depend on the row count. Other dtypes and devices go to
//! candle's matmul. Quantized weights ([`Weight`]) go to our int8 Q8_0 kernel
//! (`kernels::cpu::q8_0`) on the CPU, and to candle's quantized matmul for the other ggml formats
//! and on CUDA; bf16 weights on the CPU to our bf16 kernel (`kernels::cpu::bf16`), or, on CPUs
//! with AMX, packed into tile order at load ([`Weight::Bf16Tiles`]) for `kernels::cpu::bf16_tiles`
//! (about 4× the prefill speed of the AVX-512 kernel, the same decode speed).
//!
//! Invariant: a [`Weight`] is `(out, in)`; whatever its storage, `forward` returns activations
//! in the input's dtype. Batch invariance: with [`RowRouting::BatchInvariant`], a row's output on
//! the CPU is bitwise independent of the other rows for f32, bf16 and Q8_0 weights (our kernels
//! fix each element's reduction order); f16 weights and the other ggml formats go through candle
//! and carry no such promise.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Module, Shape, Tensor};

use crate::kernels::cpu::bf16::{Bf16Dot, bf16_matmul_nt};
use crate::kernels::cpu::bf16_tiles::Bf16Tiles;
use crate::kernels::cpu::isa::detect_isa;
use crate::kernels::cpu::matmul::matmul_nt;
use crate::kernels::cpu::q8_0::{Int8Dot, Q8Matrix};
use crate::kernels::cpu::thread_team::map_elements;

/// Row counts that use the skinny kernel under [`RowRouting::Fastest`]. Measured on a 2-core
/// AVX-512 EPYC against candle 0.11.1
/// (`linear_speed_report` below, f32, the ~125M model's shapes): 1.4–2.2× faster at 1 row (the
/// tied 50432 × 768 logits GEMV reaches 30 GB/s against candle's 22), 1.4–11× at 2–16 rows,
/// level at 24–32 on the 3072 × 768 shape; beyond 32 rows candle's packed GEMM wins.
const SKINNY_ROWS: std::ops::RangeInclusive<usize> = 1..=32;

/// Which f32 CPU kernel serves which row count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum RowRouting {
    /// Our tiled kernel for every row count: a row's result never depends on its neighbours.
    #[default]
    BatchInvariant,
    /// Our kernel up to [`SKINNY_ROWS`], candle's GEMM above (not invariant).
    Fastest,
}

/// A weight matrix `(out, in)` in one of the storages the kernels take.
#[derive(Debug, Clone)]
pub(crate) enum Weight {
    /// A plain tensor (f32, f16 or bf16) on the model's device.
    Dense(Tensor),
    /// ggml Q8_0 repacked for our int8 kernel (CPU).
    Q8(Arc<Q8Matrix>),
    /// bf16 packed for AMX tiles (CPUs with AMX).
    Bf16Tiles(Arc<Bf16Tiles>),
    /// Any ggml format through candle's quantized matmul (CPU or CUDA).
    Ggml(Arc<QTensor>),
}

impl Weight {
    /// `(out, in)`.
    pub(crate) fn dims(&self) -> (usize, usize) {
        match self {
            Self::Dense(t) => t.dims2().unwrap_or((0, 0)),
            Self::Q8(m) => (m.rows(), m.k()),
            Self::Bf16Tiles(t) => (t.rows(), t.k()),
            Self::Ggml(q) => q.shape().dims2().unwrap_or((0, 0)),
        }
    }

    /// The storage kind's name for logs and tallies (`f32`, `bf16`, `q8_0`, `q4k`, ...).
    pub(crate) fn kind(&self) -> String {
        match self {
            Self::Dense(t) => format!("{:?}", t.dtype()).to_lowercase(),
            Self::Q8(_) => "q8_0".into(),
            Self::Bf16Tiles(_) => "bf16".into(),
            Self::Ggml(q) => format!("{:?}", q.dtype()).to_lowercase(),
        }
    }

    /// Bytes the weight occupies.
    pub(crate) fn bytes(&self) -> usize {
        match self {
            Self::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Self::Q8(m) => m.bytes(),
            Self::Bf16Tiles(t) => t.bytes(),
            Self::Ggml(q) => q.storage_size_in_bytes(),
        }
    }

    /// Rows `ids` as a `(ids.len(), in)` tensor of `dtype` on `device` (embedding look-up).
    pub(crate) fn rows(
        &self,
        ids: &[u32],
        dtype: DType,
        device: &candle_core::Device,
    ) -> candle_core::Result<Tensor> {
        let (n, k) = self.dims();
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= n) {
            candle_core::bail!("row {bad} is outside the matrix of {n} rows");
        }
        match self {
            Self::Dense(t) => t
                .index_select(&Tensor::new(ids, device)?, 0)?
                .to_dtype(dtype),
            Self::Q8(m) => {
                let out = rows_f32(ids, k, |id, row| m.dequantize_row(id, row));
                Tensor::from_vec(out, (ids.len(), k), device)?.to_dtype(dtype)
            }
            Self::Bf16Tiles(t) => {
                let out = rows_f32(ids, k, |id, row| t.row_f32(id, row));
                Tensor::from_vec(out, (ids.len(), k), device)?.to_dtype(dtype)
            }
            Self::Ggml(q) => q
                .embedding(&Tensor::new(ids, &q.device())?)?
                .to_device(device)?
                .to_dtype(dtype),
        }
    }
}

/// Rows `ids` of a repacked matrix, each widened to f32 by `row(id, out)`, one after another.
fn rows_f32(ids: &[u32], k: usize, row: impl Fn(usize, &mut [f32])) -> Vec<f32> {
    let mut out = vec![0f32; ids.len() * k];
    for (dst, &id) in out.chunks_exact_mut(k.max(1)).zip(ids) {
        row(id as usize, dst);
    }
    out
}

/// `y = x · Wᵀ + b` with `W` stored as `(out, in)`, as in PyTorch checkpoints.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

impl Linear {
    /// Wraps a `(out, in)` weight and an optional `(out,)` bias.
    #[cfg(test)]
    pub(crate) fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self::with_weight(Weight::Dense(weight), bias)
    }

    /// Wraps a weight of any storage and an optional `(out,)` bias.
    pub(crate) fn with_weight(weight: Weight, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// The weight.
    pub(crate) fn weight(&self) -> &Weight {
        &self.weight
    }

    /// Applies the layer to `x` of shape `(rows, in)`.
    pub(crate) fn forward(&self, x: &Tensor, routing: RowRouting) -> candle_core::Result<Tensor> {
        let y = match &self.weight {
            Weight::Dense(w) => dense_forward(x, w, routing)?,
            Weight::Q8(m) => {
                let dtype = x.dtype();
                let rows = x.dim(0)?;
                let xf = x.to_dtype(DType::F32)?.contiguous()?;
                let values = xf.flatten_all()?.to_vec1::<f32>()?;
                if values.len() != rows * m.k() {
                    candle_core::bail!(
                        "q8_0 linear: input has {} values, not {rows} x {}",
                        values.len(),
                        m.k()
                    );
                }
                let out = m.matmul(Int8Dot::detect(), &values, rows);
                Tensor::from_vec(out, (rows, m.rows()), x.device())?.to_dtype(dtype)?
            }
            Weight::Bf16Tiles(t) => x.contiguous()?.apply_op1_no_bwd(&TilesMatmul(t))?,
            Weight::Ggml(q) => {
                let dtype = x.dtype();
                let mm = QMatMul::from_arc(Arc::clone(q))?;
                mm.forward(&x.to_dtype(DType::F32)?.contiguous()?)?
                    .to_dtype(dtype)?
            }
        };
        match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?),
            None => Ok(y),
        }
    }
}

/// `x (m, k) · Wᵀ → (m, n)` for AMX-packed bf16 weights, the result in `x`'s dtype; f32 rows
/// are rounded to bf16 first, as [`Bf16Matmul`] rounds them.
struct TilesMatmul<'a>(&'a Bf16Tiles);

impl CustomOp1 for TilesMatmul<'_> {
    fn name(&self) -> &'static str {
        "bf16-tiles-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = self.0;
        let (m, k) = l.shape().dims2()?;
        if k != w.k() {
            candle_core::bail!("bf16 tiles: input has {k} values per row, not {}", w.k());
        }
        let out = if let CpuStorage::F32(_) = s {
            CpuStorage::F32(w.matmul_f32(contiguous::<f32>(s, l)?, m))
        } else {
            let out = w.matmul(contiguous::<half::bf16>(s, l)?, m);
            CpuStorage::BF16(map_elements(&out, |&v| half::bf16::from_f32(v)))
        };
        Ok((out, Shape::from((m, w.rows()))))
    }
}

/// A plain weight: our kernels on the CPU where they are faster, else candle's matmul.
fn dense_forward(x: &Tensor, w: &Tensor, routing: RowRouting) -> candle_core::Result<Tensor> {
    let cpu = x.device().is_cpu();
    if cpu && matches!(x.dtype(), DType::BF16 | DType::F32) && w.dtype() == DType::BF16 {
        return x.contiguous()?.apply_op2_no_bwd(w, &Bf16Matmul);
    }
    let skinny = cpu
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && (routing == RowRouting::BatchInvariant || SKINNY_ROWS.contains(&x.dim(0)?));
    if skinny {
        x.contiguous()?.apply_op2_no_bwd(w, &SkinnyMatmul)
    } else {
        x.matmul(&w.t()?)
    }
}

/// `x (m, k) · w (n, k)ᵀ → (m, n)` for bf16 `w` on the CPU: our bf16 kernel, f32 sums, the
/// result in `x`'s dtype. f32 rows are rounded to bf16 first (to nearest even, as llama.cpp
/// rounds its activations for bf16 weights).
pub(crate) struct Bf16Matmul;

impl CustomOp2 for Bf16Matmul {
    fn name(&self) -> &'static str {
        "bf16-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("bf16-matmul: inner dims differ ({k} vs {k2})");
        }
        let w = contiguous::<half::bf16>(s2, l2)?;
        let out = if let CpuStorage::F32(_) = s1 {
            let rounded = map_elements(contiguous::<f32>(s1, l1)?, |&v| half::bf16::from_f32(v));
            CpuStorage::F32(bf16_matmul_nt(Bf16Dot::detect(), &rounded, m, k, w, n))
        } else {
            let x = contiguous::<half::bf16>(s1, l1)?;
            let out = bf16_matmul_nt(Bf16Dot::detect(), x, m, k, w, n);
            // Prefill results are millions of values: rounded on every thread.
            CpuStorage::BF16(map_elements(&out, |&v| half::bf16::from_f32(v)))
        };
        Ok((out, Shape::from((m, n))))
    }
}

/// `x (m, k) · w (n, k)ᵀ → (m, n)`, f32, CPU, through our tiled kernel.
pub(crate) struct SkinnyMatmul;

impl CustomOp2 for SkinnyMatmul {
    fn name(&self) -> &'static str {
        "skinny-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("skinny-matmul: inner dims differ ({k} vs {k2})");
        }
        let x = contiguous::<f32>(s1, l1)?;
        let w = contiguous::<f32>(s2, l2)?;
        Ok((
            CpuStorage::F32(matmul_nt(detect_isa(), x, m, k, w, n)),
            Shape::from((m, n)),
        ))
    }
}

/// A CPU tensor's values, which must be contiguous.
pub(crate) fn contiguous<'a, T: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&s.as_slice::<T>()?[start..end]),
        None => candle_core::bail!("matmul kernels need contiguous operands"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_agrees_with_candle_matmul_on_both_paths() -> candle_core::Result<()> {
        let dev = candle_core::Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (96, 80), &dev)?;
        let b = Tensor::randn(0f32, 1.0, 96, &dev)?;
        let layer = Linear::new(w.clone(), Some(b.clone()));
        for routing in [RowRouting::BatchInvariant, RowRouting::Fastest] {
            for rows in [1, 2, 7, *SKINNY_ROWS.end(), SKINNY_ROWS.end() + 5, 150] {
                let x = Tensor::randn(0f32, 1.0, (rows, 80), &dev)?;
                let want = x.matmul(&w.t()?)?.broadcast_add(&b)?;
                let diff = (layer.forward(&x, routing)? - want)?
                    .abs()?
                    .max_all()?
                    .to_scalar::<f32>()?;
                assert!(diff < 1e-4, "{routing:?} rows={rows}: max diff {diff}");
            }
        }
        Ok(())
    }

    #[test]
    fn f32_bf16_and_q8_0_rows_do_not_depend_on_the_batch() -> candle_core::Result<()> {
        use crate::kernels::cpu::q8_0::quantize_matrix;
        let dev = candle_core::Device::Cpu;
        let (n, k, total) = (70, 288, 150); // Q8_0: a super-block and a tail block
        let w = Tensor::randn(0f32, 0.3, (n, k), &dev)?;
        let values = w.flatten_all()?.to_vec1::<f32>()?;
        let layers = [
            ("f32", Linear::new(w.clone(), None), DType::F32),
            (
                "bf16",
                Linear::new(w.to_dtype(DType::BF16)?, None),
                DType::BF16,
            ),
            (
                "bf16 weights, f32 rows",
                Linear::new(w.to_dtype(DType::BF16)?, None),
                DType::F32,
            ),
            (
                "q8_0",
                Linear::with_weight(Weight::Q8(Arc::new(quantize_matrix(&values, n, k))), None),
                DType::F32,
            ),
        ];
        let x = Tensor::randn(0f32, 1.0, (total, k), &dev)?;
        for (name, layer, dtype) in layers {
            let x = x.to_dtype(dtype)?;
            let bits = |t: Tensor| -> candle_core::Result<Vec<u32>> {
                let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                Ok(v.into_iter().map(f32::to_bits).collect())
            };
            let all = bits(layer.forward(&x, RowRouting::BatchInvariant)?)?;
            // Single rows (decode), the old skinny limit and past it, prefill-sized chunks.
            for (from, m) in [
                (0, 1),
                (77, 1),
                (3, 5),
                (10, 32),
                (40, 33),
                (1, 100),
                (0, 150),
            ] {
                let got = bits(layer.forward(&x.narrow(0, from, m)?, RowRouting::BatchInvariant)?)?;
                assert!(
                    got == all[from * n..(from + m) * n],
                    "{name}: rows {from}..{} differ from the same rows in a batch of {total}",
                    from + m
                );
            }
        }
        Ok(())
    }

    #[test]
    fn bf16_weights_give_f32_rows_the_bf16_rows_result_before_its_rounding()
    -> candle_core::Result<()> {
        // f32 activations with bf16 weights must be rounded to bf16 exactly as a bf16 tensor
        // is (nearest even), so the two paths differ only in the output's final rounding.
        let dev = candle_core::Device::Cpu;
        let (n, k) = (70, 288);
        let w = Tensor::randn(0f32, 0.3, (n, k), &dev)?.to_dtype(DType::BF16)?;
        let layer = Linear::new(w, None);
        for rows in [1, 5, 33] {
            let x = Tensor::randn(0f32, 1.0, (rows, k), &dev)?;
            let from_f32 = layer.forward(&x, RowRouting::BatchInvariant)?;
            assert_eq!(from_f32.dtype(), DType::F32);
            let from_bf16 = layer.forward(&x.to_dtype(DType::BF16)?, RowRouting::BatchInvariant)?;
            let bits = |t: &Tensor| -> candle_core::Result<Vec<u16>> {
                let v = t
                    .to_dtype(DType::BF16)?
                    .flatten_all()?
                    .to_vec1::<half::bf16>()?;
                Ok(v.into_iter().map(half::bf16::to_bits).collect())
            };
            assert!(
                bits(&from_f32)? == bits(&from_bf16)?,
                "{rows} rows: f32 input rounded differently from a bf16 tensor"
            );
        }
        Ok(())
    }

    #[test]
    fn quantized_weights_compute_with_their_dequantized_values() -> candle_core::Result<()> {
        use candle_core::quantized::GgmlDType;
        let dev = candle_core::Device::Cpu;
        for (dtype, k) in [
            (GgmlDType::Q4_0, 64),
            (GgmlDType::Q4_0, 256),
            (GgmlDType::Q8_0, 96),
            (GgmlDType::Q4K, 256),
            (GgmlDType::Q6K, 512),
        ] {
            let w = Tensor::randn(0f32, 0.3, (40, k), &dev)?;
            let q = Arc::new(QTensor::quantize(&w, dtype)?);
            let dense = q.dequantize(&dev)?;
            let layer = Linear::with_weight(Weight::Ggml(Arc::clone(&q)), None);
            let x = Tensor::randn(0f32, 1.0, (3, k), &dev)?;
            let want = x.matmul(&dense.t()?)?;
            let got = layer.forward(&x, RowRouting::default())?;
            let err = ((got - &want)?.sqr()?.sum_all()?.to_scalar::<f32>()?
                / want.sqr()?.sum_all()?.to_scalar::<f32>()?)
            .sqrt();
            // The activations are quantized to 8 bits inside the matmul: about 1% noise.
            assert!(err < 0.02, "{dtype:?} k={k}: matmul rel err {err}");
            let rows = layer.weight().rows(&[3, 0, 39], DType::F32, &dev)?;
            let want_rows = dense.index_select(&Tensor::new(&[3u32, 0, 39], &dev)?, 0)?;
            let diff = (rows - want_rows)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                diff < 1e-6,
                "{dtype:?} k={k}: embedding rows differ by {diff}"
            );
        }
        Ok(())
    }

    #[test]
    fn q8_0_weights_compute_with_their_dequantized_values() -> candle_core::Result<()> {
        use crate::kernels::cpu::q8_0::quantize_matrix;
        let dev = candle_core::Device::Cpu;
        let (n, k) = (48, 512);
        let w = Tensor::randn(0f32, 0.3, (n, k), &dev)?;
        let values = w.flatten_all()?.to_vec1::<f32>()?;
        let layer = Linear::with_weight(Weight::Q8(Arc::new(quantize_matrix(&values, n, k))), None);
        let ids: Vec<u32> = (0..n as u32).collect();
        let dense = layer.weight().rows(&ids, DType::F32, &dev)?;
        // Decode tiles (1 row), 4 x 4 tiles with leftovers, and more rows than one L2 pass.
        for rows in [1, 5, 32, 33, 70] {
            let x = Tensor::randn(0f32, 1.0, (rows, k), &dev)?;
            let want = x.matmul(&dense.t()?)?;
            let got = layer.forward(&x, RowRouting::default())?;
            let err = ((got - &want)?.sqr()?.sum_all()?.to_scalar::<f32>()?
                / want.sqr()?.sum_all()?.to_scalar::<f32>()?)
            .sqrt();
            assert!(err < 0.02, "rows={rows}: rel err {err}");
        }
        Ok(())
    }

    /// Not a test: prints the kernel's speed against candle's matmul for the ~125M benchmark
    /// model's shapes. `cargo test --release -p mpt-engine --lib -- --ignored --nocapture
    /// linear_speed_report` on a quiet machine.
    #[test]
    #[ignore]
    fn linear_speed_report() -> candle_core::Result<()> {
        let dev = candle_core::Device::Cpu;
        let time = |f: &dyn Fn() -> candle_core::Result<Tensor>| -> candle_core::Result<f64> {
            f()?;
            let start = std::time::Instant::now();
            let mut reps = 0;
            while start.elapsed().as_secs_f64() < 0.3 {
                f()?;
                reps += 1;
            }
            Ok(start.elapsed().as_secs_f64() / reps as f64)
        };
        // Twelve layers' worth of distinct weights, so nothing is served from cache.
        let layers: Vec<Vec<Tensor>> = (0..12)
            .map(|_| {
                [(2304, 768), (768, 768), (3072, 768), (768, 3072)]
                    .iter()
                    .map(|&shape| Tensor::randn(0f32, 1.0, shape, &dev))
                    .collect()
            })
            .collect::<candle_core::Result<_>>()?;
        for m in [1, 4, 8, 16, 32, 64, 128, 512] {
            let x = Tensor::randn(0f32, 1.0, (m, 768), &dev)?;
            let x4 = Tensor::randn(0f32, 1.0, (m, 3072), &dev)?;
            let pass = |skinny: bool| -> candle_core::Result<Tensor> {
                let mut last = x.clone();
                for layer in &layers {
                    for w in layer {
                        let input = if w.dim(1)? == 768 { &x } else { &x4 };
                        last = if skinny {
                            input.apply_op2_no_bwd(w, &SkinnyMatmul)?
                        } else {
                            input.matmul(&w.t()?)?
                        };
                    }
                }
                Ok(last)
            };
            let ours = time(&|| pass(true))?;
            let candle = time(&|| pass(false))?;
            println!(
                "12 layers, m={m:2}: ours {:6.2} ms ({:5.1} GFLOP/s)  candle {:6.2} ms",
                ours * 1e3,
                2.0 * (m * 12 * 12 * 768 * 768) as f64 / 1e9 / ours,
                candle * 1e3
            );
        }
        for (n, k) in [(2304, 768), (3072, 768), (768, 3072), (50432, 768)] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
            for m in [1, 2, 4, 8, 12, 16, 24, 32, 48, 64] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
                let ours = time(&|| x.apply_op2_no_bwd(&w, &SkinnyMatmul))?;
                let candle = time(&|| x.matmul(&w.t()?))?;
                let gflop = 2.0 * (m * n * k) as f64 / 1e9;
                let gb = (n * k * 4) as f64 / 1e9;
                println!(
                    "n={n:5} k={k:4} m={m:2}: ours {:7.3} ms ({:5.1} GFLOP/s, {:4.1} GB/s)  candle {:7.3} ms  ratio {:.2}",
                    ours * 1e3,
                    gflop / ours,
                    gb / ours,
                    candle * 1e3,
                    candle / ours
                );
            }
        }
        Ok(())
    }
}
