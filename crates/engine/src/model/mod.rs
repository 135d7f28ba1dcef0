//! The MPT model: checkpoint loading, ALiBi, the paged attention kernel and the forward pass.

pub mod batch;

pub use batch::{LogitsWanted, ModelBatch, SeqChunk};
