//! What the handle and the engine thread share: the submission channel's messages and a few
//! atomics and the latest stats, read by the handle without a round trip to the engine thread.
//!
//! Invariants: `pending` counts the requests (and their sequences) accepted by `submit` and not
//! yet scheduled or dropped; a request is accepted when it can start at once (its sequences fit
//! next to the running and pending ones within `max_num_seqs`) or when fewer than
//! `max_queue_size` requests are waiting; `alive` turns false exactly when the engine thread
//! ends, by return or by panic ([`AliveGuard`]).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use crate::api::types::{EngineStats, Event, GenerateRequest};
use crate::decode::grammar::Grammar;

/// A request on its way into the engine.
pub(crate) struct Submission {
    pub(crate) request: GenerateRequest,
    /// The request's constraint, compiled by `submit`.
    pub(crate) grammar: Option<Arc<Grammar>>,
    pub(crate) events: UnboundedSender<Event>,
    pub(crate) submitted: Instant,
}

/// Messages from handles to the engine thread.
pub(crate) enum Command {
    /// A new request.
    Submit(Box<Submission>),
    /// Nothing to do but look at the shared flags.
    Wake,
}

/// State shared by the handle and the engine thread.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// Latest stats, written by the engine thread after every step.
    pub(crate) stats: Mutex<EngineStats>,
    /// False once the engine thread exited (normally or by panic).
    pub(crate) alive: AtomicBool,
    /// Set by `begin_shutdown`.
    pub(crate) shutting_down: AtomicBool,
    /// Set by `abort_all`, cleared by the engine thread when it acted on it.
    pub(crate) abort_all: AtomicBool,
    /// Requests accepted by `submit` and not yet scheduled (or dropped).
    pub(crate) pending: Mutex<Pending>,
    /// Sequence slots the scheduler's running sequences take (forks to come included).
    pub(crate) running_slots: AtomicUsize,
}

/// Accepted requests not yet scheduled.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pending {
    /// How many.
    pub(crate) requests: usize,
    /// Their sequences (`best_of` each).
    pub(crate) seqs: usize,
}

impl Shared {
    /// Takes a place for a request of `seqs` sequences, if it can start at once or the waiting
    /// room of `max_queue_size` requests has space.
    pub(crate) fn try_enqueue(
        &self,
        seqs: usize,
        max_num_seqs: usize,
        max_queue_size: usize,
    ) -> bool {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        let running = self.running_slots.load(Ordering::SeqCst);
        let starts_now = running + pending.seqs + seqs <= max_num_seqs;
        if !starts_now && pending.requests >= max_queue_size {
            return false;
        }
        pending.requests += 1;
        pending.seqs += seqs;
        true
    }

    /// Gives back the place of a request of `seqs` sequences (scheduled, dropped or refused).
    pub(crate) fn dequeue(&self, seqs: usize) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        pending.requests = pending.requests.saturating_sub(1);
        pending.seqs = pending.seqs.saturating_sub(seqs);
    }
}

/// Marks the engine dead when the engine thread ends, even by panic.
pub(crate) struct AliveGuard(pub(crate) Arc<Shared>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::SeqCst);
    }
}
