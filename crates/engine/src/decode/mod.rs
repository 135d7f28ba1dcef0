//! From logits to text, per sequence: the [`sampler`] picks tokens, the [`detokenizer`] turns
//! them into streamable text, and [`stop`] decides when a sequence ends and which text may be
//! sent.

pub mod detokenizer;
pub mod sampler;
pub mod stop;
