//! What the handle and the engine thread share: the submission channel's messages and a few
//! atomics and the latest stats, read by the handle without a round trip to the engine thread.
//!
//! Invariants: `pending` counts requests accepted by `submit` and not yet scheduled or dropped;
//! `alive` turns false exactly when the engine thread ends, by return or by panic
//! ([`AliveGuard`]).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
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
    pub(crate) pending: AtomicUsize,
}

/// Marks the engine dead when the engine thread ends, even by panic.
pub(crate) struct AliveGuard(pub(crate) Arc<Shared>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::SeqCst);
    }
}
