//! The feed-forward activation, exact-erf GELU (`nn.GELU()` in mosaicml's MPT). candle's CPU
//! kernel calls libm's scalar `erff` per element, one of the larger costs of a prompt step
//! after the matmuls; for f32 on the CPU this applies `fast_math::gelu` in parallel chunks,
//! vectorised for the CPU at hand. Other dtypes and devices use candle's `gelu_erf`.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::fast_math;
use super::isa::{detect_isa, with_isa};

/// Elements per parallel task: enough to amortise scheduling.
const CHUNK: usize = 16 * 1024;

/// `gelu(x)` elementwise, with the exact (erf) formulation.
pub(crate) fn gelu_erf(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1_no_bwd(&GeluErf)
    } else {
        x.gelu_erf()
    }
}

/// The CPU f32 kernel behind `gelu_erf`.
struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf-f32"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("gelu-erf-f32 needs a contiguous input");
        };
        let input = &storage.as_slice::<f32>()?[start..end];
        let mut out = vec![0f32; input.len()];
        let isa = detect_isa();
        out.par_chunks_mut(CHUNK)
            .zip(input.par_chunks(CHUNK))
            .for_each(|(out, input)| {
                with_isa(
                    isa,
                    #[inline(always)]
                    || {
                        for (o, &x) in out.iter_mut().zip(input) {
                            *o = fast_math::gelu(x);
                        }
                    },
                )
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_candles_exact_gelu() -> candle_core::Result<()> {
        let dev = candle_core::Device::Cpu;
        // More than one chunk, a non-contiguous input, and values far into both tails.
        let x = (Tensor::randn(0f32, 3.0, (CHUNK / 64 + 3, 130), &dev)?.t()? * 2.0)?;
        let ours = gelu_erf(&x)?;
        let candle = x.gelu_erf()?;
        assert_eq!(ours.dims(), candle.dims());
        let diff = (ours - candle)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 5e-6, "max difference {diff}");
        Ok(())
    }
}
