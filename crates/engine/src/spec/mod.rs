//! Speculative decoding by n-gram (prompt) lookup: what to draft for a sequence and when to stop
//! drafting for it. Pure data and functions over token ids; the step loop (`core::speculate`)
//! schedules the drafts and verifies them against the model's own choices.

pub mod cost;
pub mod ngram;
pub mod tracker;
