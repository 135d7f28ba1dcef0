//! CPU kernels: run-time instruction-set detection ([`isa`]), the register-tiled f32 matmul
//! ([`matmul`]), vectorisable `exp`/`erf` ([`fast_math`]), the exact-erf GELU ([`gelu`]),
//! flash-style attention tiles ([`attention_tile`]) over f32/f16/bf16 KV pools ([`kv_elem`])
//! with their SIMD vectors ([`vector`]), ggml's block formats ([`quant_formats`], [`k_quants`],
//! [`ggml_scalars`]), the int8 Q8_0 matmul ([`q8_0`], with
//! [`q8_0_avx2`] for CPUs without AVX-512) and the bf16 matmuls ([`bf16`]; [`bf16_tiles`] on
//! [`amx`] tiles where the CPU has them). The
//! matmuls split their work with [`row_split`], sum their tiles with [`lane_sums`] and fetch
//! ahead with [`prefetch`]; the parallel regions of a forward pass run on [`thread_team`].
//! Code that uses SIMD intrinsics lives here and nowhere else.

#[allow(unsafe_code)]
pub(crate) mod amx;
#[allow(unsafe_code)]
pub(crate) mod attention_tile;
#[allow(unsafe_code)]
pub(crate) mod bf16;
#[allow(unsafe_code)]
pub(crate) mod bf16_tiles;
pub(crate) mod fast_math;
pub(crate) mod gelu;
pub(crate) mod ggml_scalars;
#[allow(unsafe_code)]
pub(crate) mod isa;
pub(crate) mod k_quants;
#[allow(unsafe_code)]
pub(crate) mod kv_elem;
#[allow(unsafe_code)]
pub(crate) mod lane_sums;
#[allow(unsafe_code)]
pub(crate) mod matmul;
#[allow(unsafe_code)]
pub(crate) mod prefetch;
#[allow(unsafe_code)]
pub(crate) mod q8_0;
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
pub(crate) mod q8_0_avx2;
pub(crate) mod quant_formats;
#[allow(unsafe_code)]
pub(crate) mod row_split;
#[allow(unsafe_code)]
pub(crate) mod thread_team;
#[allow(unsafe_code)]
pub(crate) mod vector;
