//! The OpenAI side of the server: wire types as clients send and receive them ([`types`]) and
//! the pure functions that turn a wire request into validated engine requests ([`validation`]).

pub mod types;
pub mod validation;
