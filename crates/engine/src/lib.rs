//! MPT inference engine: loads MosaicML MPT checkpoints, runs the ALiBi forward pass over a paged
//! KV cache, and (on its own thread) batches many requests continuously.
//!
//! The server talks to the engine only through [`types`] and the engine handle; nothing here
//! knows about HTTP.

pub mod config;
pub mod demo;
pub mod error;
pub mod handle;
pub mod kv_budget;
pub mod kv_cache;
pub mod model;
pub mod sampling;
pub mod scheduler;
pub mod sequence;
mod step_loop;
pub mod stop;
pub mod tokenizer;
pub mod types;

pub use config::{
    AttentionKernels, DTypeSpec, DeviceSpec, EngineConfig, KvCacheSize, LoadFormat, ModelSource,
    MptConfig,
};
pub use error::{EngineError, Result};
pub use handle::{EngineHandle, EventStream};
pub use tokenizer::{IncrementalDecoder, Tokenizer};
pub use types::*;
