//! Linear layers. Decode steps multiply a few activation rows (one per running sequence) by
//! large weight matrices, where candle's general GEMM leaves much of the memory bandwidth and FMA
//! throughput unused. So for f32 on the CPU with up to 32 rows we use our register-tiled kernel
//! (`kernels::cpu::matmul`); prefill chunks and other dtypes and devices go to candle's matmul.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

use crate::kernels::cpu::isa::detect_isa;
use crate::kernels::cpu::matmul::matmul_nt;

/// Row counts that use the skinny kernel. Measured on a 2-core AVX-512 EPYC against candle 0.11.1
/// (`linear_speed_report` below, f32, the ~125M model's shapes): 1.4–2.2× faster at 1 row (the
/// tied 50432 × 768 logits GEMV reaches 30 GB/s against candle's 22), 1.4–11× at 2–16 rows,
/// level at 24–32 on the 3072 × 768 shape; beyond 32 rows candle's packed GEMM wins.
const SKINNY_ROWS: std::ops::RangeInclusive<usize> = 1..=32;

/// `y = x · Wᵀ + b` with `W` stored as `(out, in)`, as in PyTorch checkpoints.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Wraps a `(out, in)` weight and an optional `(out,)` bias.
    pub(crate) fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// Applies the layer to `x` of shape `(rows, in)`.
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let skinny = x.device().is_cpu()
            && x.dtype() == DType::F32
            && self.weight.dtype() == DType::F32
            && SKINNY_ROWS.contains(&x.dim(0)?);
        let y = if skinny {
            x.contiguous()?
                .apply_op2_no_bwd(&self.weight, &SkinnyMatmul)?
        } else {
            x.matmul(&self.weight.t()?)?
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// `x (m, k) · w (n, k)ᵀ → (m, n)` for small `m`, f32, CPU.
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
        let x = contiguous_f32(s1, l1)?;
        let w = contiguous_f32(s2, l2)?;
        Ok((
            CpuStorage::F32(matmul_nt(detect_isa(), x, m, k, w, n)),
            Shape::from((m, n)),
        ))
    }
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&s.as_slice::<f32>()?[start..end]),
        None => candle_core::bail!("skinny-matmul needs contiguous operands"),
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
        for rows in [1, 2, 7, *SKINNY_ROWS.end(), SKINNY_ROWS.end() + 5] {
            let x = Tensor::randn(0f32, 1.0, (rows, 80), &dev)?;
            let want = x.matmul(&w.t()?)?.broadcast_add(&b)?;
            let diff = (layer.forward(&x)? - want)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-4, "rows={rows}: max diff {diff}");
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
        for m in [1, 4, 8, 16, 32] {
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
