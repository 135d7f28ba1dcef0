//! Compiles the CUDA kernels (`src/model/attention/cuda/*.cu`) to PTX with nvcc when the `cuda`
//! feature is on (as candle-kernels does); the PTX is embedded with `include_str!` by
//! `src/model/attention/cuda/launch.rs`. Without the feature this does nothing, so CPU builds
//! need no CUDA toolkit.
//!
//! Reads `NVCC` (default `nvcc` on PATH) and `CUDA_COMPUTE_CAP` (default 80: PTX for sm_80 is
//! JIT-compiled by the driver for A100, H100 and H200 alike).

use std::path::PathBuf;
use std::process::Command;

const KERNELS: [&str; 1] = ["paged_attention"];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap: u32 = cap
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("CUDA_COMPUTE_CAP must be a number like 80 or 90, got {cap:?}"));
    for name in KERNELS {
        let src = format!("src/model/attention/cuda/{name}.cu");
        println!("cargo::rerun-if-changed={src}");
        let ptx = out_dir.join(format!("{name}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", "-lineinfo"])
            .arg(format!("-arch=compute_{cap}"))
            .arg("-o")
            .arg(&ptx)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| {
                panic!("cannot run {nvcc} (set NVCC or PATH; see docs/gpu.md): {e}")
            });
        assert!(status.success(), "{nvcc} failed on {src}");
    }
}
