//! CPU kernels: run-time instruction-set detection ([`isa`]), the register-tiled f32 matmul
//! ([`matmul`]), vectorisable `exp`/`erf` ([`fast_math`]), the exact-erf GELU ([`gelu`]), and
//! flash-style attention tiles ([`attention_tile`]) over f32/f16/bf16 KV pools ([`kv_elem`]) with
//! their SIMD vectors ([`vector`]). Code that uses SIMD intrinsics lives here and nowhere else.

#[allow(unsafe_code)]
pub(crate) mod attention_tile;
pub(crate) mod fast_math;
pub(crate) mod gelu;
#[allow(unsafe_code)]
pub(crate) mod isa;
#[allow(unsafe_code)]
pub(crate) mod kv_elem;
#[allow(unsafe_code)]
pub(crate) mod matmul;
#[allow(unsafe_code)]
pub(crate) mod vector;
