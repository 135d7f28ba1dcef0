//! The engine's boundary: the plain data the server sends and receives ([`types`]), the handle
//! that starts the engine thread and submits to it ([`handle`]), its settings ([`config`]) and
//! its errors ([`error`]). Nothing here knows about HTTP, OpenAI wire formats or tensors.

pub mod config;
pub mod error;
pub mod handle;
pub mod types;
