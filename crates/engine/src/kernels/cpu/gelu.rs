//! The feed-forward activation, exact-erf GELU (`nn.GELU()` in mosaicml's MPT). candle's CPU
//! kernel calls libm's scalar `erff` per element, one of the larger costs of a prompt step
//! after the matmuls; for f32 and bf16 on the CPU this applies `fast_math::gelu` in parallel
//! chunks, vectorised for the CPU at hand (bf16 widened to f32 and rounded back per element).
//! Other dtypes and devices use candle's `gelu_erf`.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use half::bf16;

use super::fast_math;
use super::thread_team::map_elements;

/// `gelu(x)` elementwise, with the exact (erf) formulation.
pub(crate) fn gelu_erf(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::BF16) {
        x.contiguous()?.apply_op1_no_bwd(&GeluErf)
    } else {
        x.gelu_erf()
    }
}

/// The CPU f32 / bf16 kernel behind `gelu_erf`.
struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("gelu-erf needs a contiguous input");
        };
        let out = match storage {
            CpuStorage::BF16(values) => CpuStorage::BF16(map_elements(&values[start..end], |x| {
                bf16::from_f32(fast_math::gelu(x.to_f32()))
            })),
            _ => CpuStorage::F32(map_elements(
                &storage.as_slice::<f32>()?[start..end],
                |&x| fast_math::gelu(x),
            )),
        };
        Ok((out, layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::thread_team::ELEMENTS_PER_TASK;

    #[test]
    fn matches_candles_exact_gelu() -> candle_core::Result<()> {
        let dev = candle_core::Device::Cpu;
        // More than one chunk, a non-contiguous input, and values far into both tails.
        let x = (Tensor::randn(0f32, 3.0, (ELEMENTS_PER_TASK / 64 + 3, 130), &dev)?.t()? * 2.0)?;
        let ours = gelu_erf(&x)?;
        let candle = x.gelu_erf()?;
        assert_eq!(ours.dims(), candle.dims());
        let diff = (ours - candle)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 5e-6, "max difference {diff}");
        Ok(())
    }

    #[test]
    fn bf16_rounds_the_f32_result() -> candle_core::Result<()> {
        let dev = candle_core::Device::Cpu;
        let x = (Tensor::randn(0f32, 3.0, (ELEMENTS_PER_TASK / 64 + 3, 130), &dev)?.t()? * 2.0)?
            .to_dtype(DType::BF16)?;
        let ours = gelu_erf(&x)?;
        assert_eq!(ours.dtype(), DType::BF16);
        let want = gelu_erf(&x.to_dtype(DType::F32)?)?.to_dtype(DType::BF16)?;
        let (ours, want) = (
            ours.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
            want.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
        );
        assert_eq!(ours, want);
        // And within bf16 rounding of candle's own bf16 GELU.
        let candle = x
            .gelu_erf()?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for (o, c) in ours.iter().zip(&candle) {
            assert!((o - c).abs() <= 1e-2 * (1.0 + c.abs()), "{o} vs {c}");
        }
        Ok(())
    }
}
