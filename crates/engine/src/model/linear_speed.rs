//! Not tests: speed reports that pick the kernels (docs/benchmarks.md quotes them). Run on a
//! quiet machine with `cargo test --release -p mpt-engine --lib -- --ignored --nocapture
//! quantized_linear_speed_report`.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use super::linear::{Linear, RowRouting, Weight};
use crate::kernels::cpu::q8_0::quantize_matrix;

/// Seconds per call of `f`, after one warm-up, over at least 0.5 s.
fn time(f: &dyn Fn() -> candle_core::Result<Tensor>) -> candle_core::Result<f64> {
    f()?;
    let start = std::time::Instant::now();
    let mut reps = 0;
    while start.elapsed().as_secs_f64() < 0.5 {
        f()?;
        reps += 1;
    }
    Ok(start.elapsed().as_secs_f64() / reps as f64)
}

/// Seconds per call of `f(i)` over `copies` distinct matrices `i` (so none sits in cache).
fn time_per_copy(
    copies: usize,
    f: &dyn Fn(usize) -> candle_core::Result<Tensor>,
) -> candle_core::Result<f64> {
    time(&|| {
        let mut last = None;
        for i in 0..copies {
            last = Some(f(i)?);
        }
        Ok(last.expect("at least one copy"))
    })
    .map(|t| t / copies as f64)
}

/// The activation row counts to time: `SPEED_ROWS=1,16,...`, else a spread from 1 to 512.
fn speed_rows() -> Vec<usize> {
    std::env::var("SPEED_ROWS").map_or(vec![1, 4, 16, 32, 128, 512], |v| {
        v.split(',').filter_map(|x| x.parse().ok()).collect()
    })
}

#[test]
#[ignore]
fn quantized_linear_speed_report() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    // Enough distinct matrices that the set (> 100 MB in Q8_0) never sits in the caches.
    for (n, k, copies) in [
        (4096, 4096, 8),
        (16384, 4096, 2),
        (3072, 768, 48),
        (50432, 768, 2),
    ] {
        let mut ours = Vec::new();
        let mut candle_q8 = Vec::new();
        let mut candle_q4k = Vec::new();
        let mut bf16 = Vec::new();
        for _ in 0..copies {
            let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?;
            let values = w.flatten_all()?.to_vec1::<f32>()?;
            ours.push(Linear::with_weight(
                Weight::Q8(Arc::new(quantize_matrix(&values, n, k))),
                None,
            ));
            candle_q8.push(QMatMul::from_arc(Arc::new(QTensor::quantize(
                &w,
                GgmlDType::Q8_0,
            )?))?);
            candle_q4k.push(QMatMul::from_arc(Arc::new(QTensor::quantize(
                &w,
                GgmlDType::Q4K,
            )?))?);
            bf16.push(Linear::with_weight(
                Weight::Dense(w.to_dtype(DType::BF16)?),
                None,
            ));
        }
        let q8_bytes = (n * k / 32 * 34) as f64;
        let q4k_bytes = (n * k / 256 * 144) as f64;
        let bf16_bytes = (n * k * 2) as f64;
        for m in speed_rows() {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let xb = x.to_dtype(DType::BF16)?;
            let each = |f: &dyn Fn(usize) -> candle_core::Result<Tensor>| time_per_copy(copies, f);
            let t_ours = each(&|i| ours[i].forward(&x, RowRouting::default()))?;
            let t_cq8 = each(&|i| candle_q8[i].forward(&x))?;
            let t_cq4k = each(&|i| candle_q4k[i].forward(&x))?;
            let t_bf16 = each(&|i| bf16[i].forward(&xb, RowRouting::default()))?;
            let gflop = 2.0 * (m * n * k) as f64 / 1e9;
            println!(
                "n={n:5} k={k:5} m={m:3}: q8_0 ours {:8.3} ms ({:5.1} GB/s, {:6.1} GFLOP/s) \
                 candle {:8.3} ms ({:5.1} GB/s) | q4_k candle {:8.3} ms ({:5.1} GB/s) | \
                 bf16 ours {:8.3} ms ({:5.1} GB/s, {:6.1} GFLOP/s)",
                t_ours * 1e3,
                q8_bytes / t_ours / 1e9,
                gflop / t_ours,
                t_cq8 * 1e3,
                q8_bytes / t_cq8 / 1e9,
                t_cq4k * 1e3,
                q4k_bytes / t_cq4k / 1e9,
                t_bf16 * 1e3,
                bf16_bytes / t_bf16 / 1e9,
                gflop / t_bf16,
            );
        }
    }
    Ok(())
}

/// Streams 1 GiB of f32 once per pass with a plain sum on every thread: the machine's read
/// bandwidth, the ceiling the decode kernels are measured against.
#[test]
#[ignore]
fn memory_read_bandwidth_report() {
    use rayon::prelude::*;
    let data = vec![1f32; 1 << 28];
    // 16 independent partial sums per chunk, so the loop vectorises and is bound by loads.
    let sum16 = |c: &[f32]| {
        let mut acc = [0f32; 16];
        for v in c.chunks_exact(16) {
            for l in 0..16 {
                acc[l] += v[l];
            }
        }
        acc.iter().sum::<f32>()
    };
    let pass = || data.par_chunks(1 << 16).map(sum16).sum::<f32>();
    let _ = pass();
    let start = std::time::Instant::now();
    let reps = 5;
    let mut total = 0.0;
    for _ in 0..reps {
        total += pass();
    }
    let secs = start.elapsed().as_secs_f64() / reps as f64;
    println!(
        "read bandwidth: {:.1} GB/s over {} threads (checksum {total})",
        (data.len() * 4) as f64 / secs / 1e9,
        rayon::current_num_threads()
    );
}

/// bf16 weights: our AVX-512 kernel against the AMX tiles, where the CPU has AMX.
#[test]
#[ignore]
fn bf16_linear_speed_report() -> candle_core::Result<()> {
    use crate::kernels::cpu::amx::Amx;
    use crate::kernels::cpu::bf16_tiles::Bf16Tiles;
    let Some(amx) = Amx::detect() else {
        println!("no AMX on this CPU");
        return Ok(());
    };
    let dev = Device::Cpu;
    for (n, k, copies) in [
        (4096, 4096, 8),
        (3072, 768, 48),
        (768, 3072, 48),
        (2304, 768, 48),
        (50432, 768, 2),
    ] {
        let mut dense = Vec::new();
        let mut tiles = Vec::new();
        for _ in 0..copies {
            let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?.to_dtype(DType::BF16)?;
            let values = w.flatten_all()?.to_vec1::<half::bf16>()?;
            let packed = Bf16Tiles::pack(amx, &values, n, k).expect("whole tiles");
            tiles.push(Linear::with_weight(
                Weight::Bf16Tiles(Arc::new(packed)),
                None,
            ));
            dense.push(Linear::with_weight(Weight::Dense(w), None));
        }
        let bytes = (n * k * 2) as f64;
        for m in speed_rows() {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let each = |layers: &[Linear]| {
                time_per_copy(copies, &|i| layers[i].forward(&x, RowRouting::default()))
            };
            let (t_dense, t_tiles) = (each(&dense)?, each(&tiles)?);
            let gflop = 2.0 * (m * n * k) as f64 / 1e9;
            println!(
                "n={n:5} k={k:5} m={m:3}: avx512-bf16 {:8.3} ms ({:5.1} GB/s, {:6.1} GFLOP/s) | \
                 amx {:8.3} ms ({:5.1} GB/s, {:6.1} GFLOP/s)",
                t_dense * 1e3,
                bytes / t_dense / 1e9,
                gflop / t_dense,
                t_tiles * 1e3,
                bytes / t_tiles / 1e9,
                gflop / t_tiles,
            );
        }
    }
    Ok(())
}
