//! Our own CUDA attention kernels (`paged_attention.cu`, compiled to PTX by build.rs): the
//! host-side metadata and launch geometry ([`meta`], plain Rust, tested everywhere) and the
//! launch itself ([`launch`], `cuda` feature only).
//!
//! NOT YET RUN ON A GPU: compiled, never launched (see docs/gpu.md).

#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
pub(crate) mod launch;
pub(crate) mod meta;
