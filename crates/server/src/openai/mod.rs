//! The OpenAI side of the server: wire types as clients send and receive them ([`types`]), which
//! top-level fields are accepted ([`fields`]), chat messages ([`messages`]), the pure functions that turn a wire request into
//! validated engine requests ([`validation`]), output constraints from `response_format` and
//! `structured_outputs` ([`structured`]), tools as prompt text and grammar ([`tools`]) and tool
//! calls parsed back out of the generated text ([`tool_calls`]).

pub mod fields;
pub mod messages;
pub mod structured;
pub mod tool_calls;
pub mod tools;
pub mod types;
pub mod validation;
