//! Continuous batching: the [`scheduler`] decides every step which sequences run with how many
//! tokens, over [`sequence`]s and the KV block bookkeeping of [`crate::kv`]. Pure Rust, no
//! tensors.

pub mod scheduler;
pub mod sequence;
