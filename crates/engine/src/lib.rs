//! MPT inference engine: loads MosaicML MPT checkpoints, runs the ALiBi forward pass over a paged
//! KV cache, and (on its own thread) batches many requests continuously.
//!
//! Layout, each folder one concern, imports running downwards:
//! - [`api`]: the boundary the server uses — plain request/event types, the [`EngineHandle`],
//!   settings and errors. Nothing here knows about HTTP or OpenAI wire formats.
//! - [`core`]: the engine thread — loading, the step loop, per-request bookkeeping.
//! - [`sched`]: the continuous-batching scheduler and its sequences (pure data).
//! - [`kv`]: the paged KV cache — block allocator, prefix cache, storage, pool sizing.
//! - [`decode`]: sampling, stop conditions, streaming detokenization, grammar masks
//!   (structured outputs).
//! - [`spec`]: speculative decoding — the n-gram proposer and when a sequence drafts.
//! - [`model`]: MPT itself — config, weights, the forward pass, paged attention backends.
//! - `kernels`: CPU SIMD kernels (instruction-set detection, matmul, fast maths, GELU).

pub mod api;
pub mod core;
pub mod decode;
mod kernels;
pub mod kv;
pub mod model;
pub mod sched;
pub mod spec;
pub mod tokenizer;

pub use api::config::{
    AttentionKernels, DTypeSpec, DeviceSpec, EngineConfig, FaultPlan, KvCacheDtype, KvCacheSize,
    LoadFormat, MAX_SPECULATIVE_TOKENS, ModelSource, NgramSpeculation, Quantization,
};
pub use api::error::{EngineError, Result};
pub use api::handle::{EngineHandle, EventStream};
pub use api::types::*;
pub use decode::detokenizer::IncrementalDecoder;
pub use model::config::MptConfig;
pub use tokenizer::Tokenizer;
