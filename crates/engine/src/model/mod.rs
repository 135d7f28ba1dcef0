//! The MPT model: checkpoint loading, ALiBi, the paged attention kernel and the forward pass.

pub mod alibi;
mod attention;
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod attention_cuda;
mod attention_kernels;
mod attention_prefill;
mod attention_tensor;
pub mod batch;
mod fast_math;
mod gelu;
mod linear;
pub mod loader;
pub mod mpt;
#[allow(unsafe_code)]
mod skinny_kernel;

pub use batch::{LogitsWanted, ModelBatch, SeqChunk};
pub use mpt::Mpt;
