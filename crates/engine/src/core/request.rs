//! Engine-side state of one request and its choices (one sequence each).
//!
//! Invariants: `choices[i]` is choice `i`'s sequence (index 0 is the prompt's own sequence, the
//! others are forked from it once the prompt is computed); a choice's `finish` is set once; with
//! a constraint every choice has its own grammar state, forked from choice 0's.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use crate::api::types::{Delta, Event, FinishReason, GenerateRequest, TokenLogprob};
use crate::decode::constraint::SeqConstraint;
use crate::decode::grammar::Grammar;
use crate::decode::sampler::Sampler;
use crate::decode::stop::OutputText;
use crate::sched::sequence::SeqId;
use crate::spec::tracker::DraftTracker;

/// One choice (sequence) of a request.
pub(super) struct Choice {
    pub(super) seq: SeqId,
    pub(super) sampler: Sampler,
    pub(super) text: OutputText,
    /// Its grammar state, when the request has a constraint (dropped with the choice).
    pub(super) constraint: Option<SeqConstraint>,
    pub(super) finish: Option<FinishReason>,
    pub(super) cum_logprob: f64,
    pub(super) num_tokens: usize,
    /// Output kept until the end when `best_of > n`.
    pub(super) buffer: Delta,
    /// Whether its sequence drafts (speculative decoding).
    pub(super) drafting: DraftTracker,
}

/// Engine-side state of one request.
pub(super) struct Request {
    pub(super) req: GenerateRequest,
    /// The compiled constraint every choice starts from.
    pub(super) grammar: Option<Arc<Grammar>>,
    pub(super) events: UnboundedSender<Event>,
    pub(super) submitted: Instant,
    pub(super) scheduled_at: Option<Instant>,
    pub(super) prefill_done_at: Option<Instant>,
    pub(super) first_token_at: Option<Instant>,
    pub(super) choices: Vec<Choice>,
    pub(super) forked: bool,
    pub(super) seed: u64,
    pub(super) prompt_logprobs: Vec<Option<TokenLogprob>>,
    pub(super) prompt_logprobs_sent: bool,
}

impl Request {
    pub(super) fn buffered(&self) -> bool {
        self.req.best_of > self.req.n
    }

    pub(super) fn send(&self, event: Event) {
        // A closed receiver means the client left; the request is dropped at the next step.
        let _ = self.events.send(event);
    }

    pub(super) fn all_finished(&self) -> bool {
        self.forked && self.choices.iter().all(|c| c.finish.is_some())
    }
}
