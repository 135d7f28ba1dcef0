//! The MPT model: its `config.json` ([`config`]), checkpoint weights ([`weights`], [`demo`],
//! GGUF files in [`gguf`] with their tokenizer in `gguf_tokenizer`), ALiBi slopes ([`alibi`]),
//! the batch description a step runs ([`batch`]), linear layers over the CPU kernels
//! ([`linear`]), what each weight becomes at load (`quantize`), paged attention (`attention/`)
//! and the forward pass ([`mpt`]).

pub mod alibi;
pub(crate) mod attention;
pub mod batch;
pub mod config;
pub mod demo;
pub mod gguf;
pub(crate) mod gguf_tokenizer;
pub(crate) mod linear;
#[cfg(test)]
mod linear_speed;
pub mod mpt;
pub(crate) mod quantize;
pub mod weights;

pub use batch::{LogitsWanted, ModelBatch, SeqChunk};
pub use mpt::Mpt;
