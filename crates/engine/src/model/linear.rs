//! Linear layers. Decode steps multiply a handful of activation rows by large weight matrices;
//! there the speed is the speed of streaming the weights from memory, and candle's general GEMM
//! leaves much of the bandwidth unused once there are a few rows. So for f32 on the CPU with 2–8 rows we use a
//! "skinny" kernel: each weight row is read once and dotted with every activation row while it
//! is in L1, output columns are split over threads, and the inner loop is compiled for AVX-512 or
//! AVX2+FMA when the CPU has them (checked at run time). Everything else goes to candle's matmul.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Row counts that use the skinny kernel. Measured on a 2-core AVX-512 EPYC against candle 0.11.1
/// (f32, 768-wide weights): at 1 row candle's GEMV is as fast; at 4 and 8 rows the skinny kernel
/// is 1.5–3.5× faster; at 16 rows the work is compute-bound and candle's blocked GEMM wins.
const SKINNY_ROWS: std::ops::RangeInclusive<usize> = 2..=8;
/// Weight rows per parallel task: large enough to amortise scheduling, small enough to balance.
const ROWS_PER_TASK: usize = 32;

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
            CpuStorage::F32(skinny_matmul(x, m, k, w, n)),
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

/// Instruction sets the kernel is compiled for.
#[derive(Clone, Copy)]
enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
    Portable,
}

fn detect_isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            return Isa::Avx512;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Isa::Avx2Fma;
        }
    }
    Isa::Portable
}

/// `(m, k) · (n, k)ᵀ`, returned row-major `(m, n)`.
pub(crate) fn skinny_matmul(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    let isa = detect_isa();
    // Computed transposed, (n, m), so each task owns a contiguous slice of output.
    let mut out_t = vec![0f32; n * m];
    out_t
        .par_chunks_mut(ROWS_PER_TASK * m)
        .zip(w.par_chunks(ROWS_PER_TASK * k))
        .for_each(|(out, rows)| dispatch(isa, rows, x, k, m, out));
    if m == 1 {
        return out_t;
    }
    let mut out = vec![0f32; m * n];
    for (j, row) in out_t.chunks_exact(m).enumerate() {
        for (i, &v) in row.iter().enumerate() {
            out[i * n + j] = v;
        }
    }
    out
}

#[allow(unsafe_code)]
fn dispatch(isa: Isa, rows: &[f32], x: &[f32], k: usize, m: usize, out: &mut [f32]) {
    match isa {
        // SAFETY: `detect_isa` checked at run time that the CPU supports these features.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { rows_avx512(rows, x, k, m, out) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => unsafe { rows_avx2(rows, x, k, m, out) },
        Isa::Portable => rows_dot::<false>(rows, x, k, m, out),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
fn rows_avx512(rows: &[f32], x: &[f32], k: usize, m: usize, out: &mut [f32]) {
    rows_dot::<true>(rows, x, k, m, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn rows_avx2(rows: &[f32], x: &[f32], k: usize, m: usize, out: &mut [f32]) {
    rows_dot::<true>(rows, x, k, m, out)
}

/// For each weight row in `rows`, its dot product with each of the `m` activation rows.
#[inline(always)]
fn rows_dot<const FMA: bool>(rows: &[f32], x: &[f32], k: usize, m: usize, out: &mut [f32]) {
    for (w, out) in rows.chunks_exact(k).zip(out.chunks_exact_mut(m)) {
        let mut i = 0;
        while i + 2 <= m {
            let (a, b) = dot2::<FMA>(w, &x[i * k..][..k], &x[(i + 1) * k..][..k]);
            out[i] = a;
            out[i + 1] = b;
            i += 2;
        }
        if i < m {
            out[i] = dot::<FMA>(w, &x[i * k..][..k]);
        }
    }
}

const LANES: usize = 64;

#[inline(always)]
fn fma<const FMA: bool>(a: f32, b: f32, acc: f32) -> f32 {
    if FMA { a.mul_add(b, acc) } else { acc + a * b }
}

/// Dot product with `LANES` independent accumulators, so it vectorises and pipelines.
#[inline(always)]
fn dot<const FMA: bool>(w: &[f32], x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (cw, cx) = (w.chunks_exact(LANES), x.chunks_exact(LANES));
    let mut tail = 0f32;
    for (a, b) in cw.remainder().iter().zip(cx.remainder()) {
        tail += a * b;
    }
    for (a, b) in cw.zip(cx) {
        for l in 0..LANES {
            acc[l] = fma::<FMA>(a[l], b[l], acc[l]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Two dot products sharing each load of `w`.
#[inline(always)]
fn dot2<const FMA: bool>(w: &[f32], x0: &[f32], x1: &[f32]) -> (f32, f32) {
    const HALF: usize = LANES / 2;
    let (mut a0, mut a1) = ([0f32; HALF], [0f32; HALF]);
    let (cw, c0, c1) = (
        w.chunks_exact(HALF),
        x0.chunks_exact(HALF),
        x1.chunks_exact(HALF),
    );
    let (mut t0, mut t1) = (0f32, 0f32);
    for ((a, b), c) in cw
        .remainder()
        .iter()
        .zip(c0.remainder())
        .zip(c1.remainder())
    {
        t0 += a * b;
        t1 += a * c;
    }
    for ((a, b), c) in cw.zip(c0).zip(c1) {
        for l in 0..HALF {
            a0[l] = fma::<FMA>(a[l], b[l], a0[l]);
            a1[l] = fma::<FMA>(a[l], c[l], a1[l]);
        }
    }
    (a0.iter().sum::<f32>() + t0, a1.iter().sum::<f32>() + t1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|l| x[i * k + l] as f64 * w[j * k + l] as f64)
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    #[test]
    fn skinny_matches_naive_for_odd_shapes() {
        for (m, k, n) in [
            (1, 1, 1),
            (1, 100, 70),
            (3, 65, 33),
            (2, 128, 64),
            (5, 300, 97),
            (17, 64, 40),
        ] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0)
                .collect();
            let got = skinny_matmul(&x, m, k, &w, n);
            let want = naive(&x, m, k, &w, n);
            for (a, b) in got.iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "m={m} k={k} n={n}: {a} vs {b}"
                );
            }
        }
    }

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
}
