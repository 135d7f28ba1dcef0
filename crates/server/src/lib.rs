//! mpt-server: the OpenAI-compatible HTTP API over the MPT engine.

pub mod config;
pub mod error;
pub mod metrics;
pub mod openai;
pub mod sse;
pub mod validation;
