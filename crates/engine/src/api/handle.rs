//! The server's view of the engine: start it, submit requests, read stats, shut it down.
//!
//! Invariants: `submit` never waits for the engine — it validates the request (compiling its
//! constraint when it is not cached yet: bounded work on the caller's thread), then `try_send`s
//! it into a bounded channel; beyond the requests that can start at once, at most
//! `max_queue_size` are accepted but not yet scheduled (`QueueFull` beyond that; 0 means no
//! waiting room, and an idle engine still serves). After `begin_shutdown` every submit is
//! `ShuttingDown`. Each request
//! gets its own unbounded event channel, so the engine thread never waits on a slow client;
//! dropping the receiver cancels the request. The engine thread is joined when the last clone
//! of the handle is dropped.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::Instant;

use super::config::{AttentionKernels, DeviceSpec, EngineConfig};
use super::error::{EngineError, Result};
use super::types::{
    Constraint, EngineStats, Event, GenerateRequest, LoadProgress, ModelInfo, SubmitError,
};
use crate::core::admission::{Limits, validate};
use crate::core::channel::{Command, Shared, Submission};
use crate::core::engine;
use crate::decode::grammar::GrammarCompiler;
use crate::tokenizer::Tokenizer;

/// Events of one request, in order; dropping it cancels the request.
pub type EventStream = tokio::sync::mpsc::UnboundedReceiver<Event>;

struct Inner {
    sender: Option<SyncSender<Command>>,
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
    tokenizer: Arc<Tokenizer>,
    model_info: ModelInfo,
    limits: Limits,
    grammars: GrammarCompiler,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Disconnecting the channel tells the engine thread to abort what is left and exit.
        self.sender.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A cloneable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle")
            .field("model_info", &self.inner.model_info)
            .finish()
    }
}

impl EngineHandle {
    /// Loads the model on a new std::thread and blocks until it is ready or failed.
    pub fn start(config: EngineConfig) -> Result<EngineHandle> {
        Self::start_reporting(config, |_| {})
    }

    /// [`EngineHandle::start`], calling `on_progress` (on the engine thread) after each weight
    /// tensor is read, so the caller can draw a progress bar.
    pub fn start_reporting(
        config: EngineConfig,
        on_progress: impl Fn(LoadProgress) + Send + Sync + 'static,
    ) -> Result<EngineHandle> {
        if config.max_num_seqs == 0 {
            return Err(EngineError::setting("max_num_seqs", "must be at least 1"));
        }
        if config.max_num_batched_tokens == 0 {
            return Err(EngineError::setting(
                "max_num_batched_tokens",
                "must be at least 1",
            ));
        }
        if config.block_size == 0 {
            return Err(EngineError::setting("block_size", "must be at least 1"));
        }
        let fraction = config.gpu_memory_utilization;
        if !(fraction > 0.0 && fraction <= 1.0) {
            return Err(EngineError::setting(
                "gpu_memory_utilization",
                format!("must be in (0, 1], got {fraction}"),
            ));
        }
        if let Some(spec) = &config.speculative
            && let Err((field, why)) = spec.check()
        {
            return Err(EngineError::setting(
                "speculative_config",
                format!("{field} {why}"),
            ));
        }
        // Refuse before a long weight load what can only fail after it.
        if config.attention_kernels == AttentionKernels::Custom && config.device == DeviceSpec::Cpu
        {
            return Err(EngineError::setting(
                "attention_kernels",
                "the custom CUDA attention kernels need --device cuda:N (on the CPU use candle-ops)",
            ));
        }
        let shared = Arc::new(Shared::default());
        shared.alive.store(true, Ordering::SeqCst);
        // Room for the waiting room plus the requests that start at once.
        let capacity = config.max_queue_size + config.max_num_seqs;
        let (sender, receiver) = std::sync::mpsc::sync_channel(capacity);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("mpt-engine".into())
            .spawn(move || engine::run(config, receiver, thread_shared, ready_tx, &on_progress))
            .map_err(|e| {
                EngineError::setting("threads", format!("cannot spawn the engine thread: {e}"))
            })?;
        let ready = ready_rx.recv();
        match ready {
            Ok(Ok(ready)) => Ok(EngineHandle {
                inner: Arc::new(Inner {
                    sender: Some(sender),
                    thread: Some(thread),
                    shared,
                    tokenizer: ready.tokenizer,
                    model_info: ready.model_info,
                    limits: ready.limits,
                    grammars: ready.grammars,
                }),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(EngineError::EngineStopped)
            }
        }
    }

    /// Compiles `constraint` into the grammar cache (or finds it there): blocking, up to
    /// llguidance's limits, so async callers run it on a blocking thread before [`submit`],
    /// which then finds it cached. The error says why the grammar is refused.
    ///
    /// [`submit`]: EngineHandle::submit
    pub fn compile_constraint(&self, constraint: &Constraint) -> Result<(), SubmitError> {
        self.inner
            .grammars
            .compile(constraint)
            .map(drop)
            .map_err(SubmitError::InvalidConstraint)
    }

    /// Validates the request (compiling its constraint if it is not cached), then a bounded
    /// `try_send` into the engine; dropping the returned stream cancels the request.
    pub fn submit(&self, request: GenerateRequest) -> Result<EventStream, SubmitError> {
        let inner = &self.inner;
        if inner.shared.shutting_down.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        if !self.is_alive() {
            return Err(SubmitError::EngineStopped);
        }
        validate(&request, &inner.limits)?;
        let grammar = match &request.constraint {
            Some(c) => Some(
                inner
                    .grammars
                    .compile(c)
                    .map_err(SubmitError::InvalidConstraint)?,
            ),
            None => None,
        };
        let (shared, limits) = (&inner.shared, &inner.limits);
        let seqs = request.best_of;
        if !shared.try_enqueue(seqs, limits.max_num_seqs, limits.max_queue_size) {
            return Err(SubmitError::QueueFull);
        }
        let (events, stream) = tokio::sync::mpsc::unbounded_channel();
        let submission = Submission {
            request,
            grammar,
            events,
            submitted: Instant::now(),
        };
        let sender = inner
            .sender
            .as_ref()
            .expect("sender lives as long as the handle: this is a bug");
        match sender.try_send(Command::Submit(Box::new(submission))) {
            Ok(()) => Ok(stream),
            Err(e) => {
                shared.dequeue(seqs);
                Err(match e {
                    TrySendError::Full(_) => SubmitError::QueueFull,
                    TrySendError::Disconnected(_) => SubmitError::EngineStopped,
                })
            }
        }
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.inner.tokenizer
    }

    /// Static facts about the loaded model.
    pub fn model_info(&self) -> &ModelInfo {
        &self.inner.model_info
    }

    /// Current counters and gauges.
    pub fn stats(&self) -> EngineStats {
        *self
            .inner
            .shared
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// False once the engine thread died.
    pub fn is_alive(&self) -> bool {
        self.inner.shared.alive.load(Ordering::SeqCst)
    }

    /// New submits get `ShuttingDown`; running and queued requests continue.
    pub fn begin_shutdown(&self) {
        self.inner
            .shared
            .shutting_down
            .store(true, Ordering::SeqCst);
    }

    /// Ends every running and waiting request with `FinishReason::Abort`.
    pub fn abort_all(&self) {
        self.inner.shared.abort_all.store(true, Ordering::SeqCst);
        if let Some(sender) = &self.inner.sender {
            // Wake an idle engine; a full queue means it is busy and checks the flag anyway.
            let _ = sender.try_send(Command::Wake);
        }
    }
}
