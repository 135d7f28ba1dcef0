//! CPU kernels: run-time instruction-set detection ([`isa`]), the register-tiled f32 matmul
//! ([`matmul`]), vectorisable `exp`/`erf` ([`fast_math`]) and the exact-erf GELU ([`gelu`]).
//! Code that uses SIMD intrinsics lives here and nowhere else.

pub(crate) mod fast_math;
pub(crate) mod gelu;
#[allow(unsafe_code)]
pub(crate) mod isa;
#[allow(unsafe_code)]
pub(crate) mod matmul;
