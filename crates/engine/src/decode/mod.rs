//! From logits to text, per sequence: the [`sampler`] picks tokens, the [`detokenizer`] turns
//! them into streamable text, and [`stop`] decides when a sequence ends and which text may be
//! sent. Structured outputs: [`grammar`] compiles constraints (off the engine thread, cached),
//! [`constraint`] holds each sequence's grammar state and the token mask it allows next.

pub mod constraint;
pub mod detokenizer;
pub mod grammar;
pub mod sampler;
pub mod stop;
