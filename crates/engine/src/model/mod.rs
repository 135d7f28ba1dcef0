//! The MPT model: its `config.json` ([`config`]), checkpoint weights ([`weights`], [`demo`]),
//! ALiBi slopes ([`alibi`]), the batch description a step runs ([`batch`]), linear layers over
//! the CPU kernels ([`linear`]), paged attention (`attention/`) and the forward pass ([`mpt`]).

pub mod alibi;
pub(crate) mod attention;
pub mod batch;
pub mod config;
pub mod demo;
pub(crate) mod linear;
pub mod mpt;
pub mod weights;

pub use batch::{LogitsWanted, ModelBatch, SeqChunk};
pub use mpt::Mpt;
