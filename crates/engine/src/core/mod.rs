//! The engine thread: loading ([`load`]), the step loop ([`engine`]) that schedules, runs the
//! model and samples, and the per-request bookkeeping that turns logits into events
//! ([`request`], [`emit`]), with the grammar masks of structured outputs prepared alongside
//! the forward pass ([`constrain`]). [`crate::api::handle`] starts it and talks to it through
//! [`channel`]; [`admission`] is what `submit` checks before anything is queued.

pub(crate) mod admission;
pub(crate) mod channel;
mod constrain;
mod emit;
pub(crate) mod engine;
pub(crate) mod load;
mod request;
mod speculate;
