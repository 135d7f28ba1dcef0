//! Shared application state: the engine handle (set once the model is loaded), the served
//! model's facts, metrics, the chat template, and the admission/drain bookkeeping.
//!
//! Invariants: `engine` is set at most once, and `/ready` is 200 only while it is set and the
//! server is not draining; `inflight` counts admitted engine requests and is decremented exactly
//! once per admission (by [`Admission`]'s `Drop`), so draining can wait for it to reach zero; at
//! most `max_inflight` requests are admitted at once, the rest get 429 before any tokenizing.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use mpt_engine::EngineHandle;
use tokio::sync::Notify;

use crate::chat_template::ChatTemplate;
use crate::config::Timeouts;
use crate::error::ApiError;
use crate::metrics::Metrics;

/// Largest request body accepted (bytes).
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// Settings the HTTP layer needs (a subset of the server config).
#[derive(Clone)]
pub struct StateConfig {
    /// Name clients use in `model`.
    pub model_name: String,
    /// Required bearer token on /v1/*.
    pub api_key: Option<String>,
    /// Most engine requests admitted at once (running + queued).
    pub max_inflight: usize,
    /// CORS origins (`*` for any); empty disables CORS.
    pub cors_allow_origin: Vec<String>,
    /// Client timeouts and the keep-alive interval of streams.
    pub timeouts: Timeouts,
    /// Log and ignore unrecognized request fields instead of answering 400.
    pub allow_unknown_fields: bool,
}

/// What exists only after the model loaded.
pub struct Loaded {
    /// The engine.
    pub engine: EngineHandle,
    /// The chat template (the model's own, or ChatML).
    pub chat_template: ChatTemplate,
    /// `<|im_end|>`'s id when the vocabulary has it.
    pub im_end_id: Option<u32>,
}

struct Shared {
    config: StateConfig,
    loaded: OnceLock<Loaded>,
    metrics: Metrics,
    draining: AtomicBool,
    inflight: AtomicUsize,
    idle: Notify,
    created: u64,
}

/// Cheaply clonable handle to the shared state.
#[derive(Clone)]
pub struct AppState {
    shared: Arc<Shared>,
}

/// Unix time in seconds.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One admitted engine request (or several, for multi-prompt completions); releases its slots on drop.
pub struct Admission {
    state: AppState,
    slots: usize,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let shared = &self.state.shared;
        if shared.inflight.fetch_sub(self.slots, Ordering::AcqRel) == self.slots {
            shared.idle.notify_waiters();
        }
    }
}

impl AppState {
    /// State with no engine yet (`/ready` is 503 until [`AppState::set_loaded`]).
    pub fn new(config: StateConfig) -> Self {
        let metrics = Metrics::new(&config.model_name);
        Self {
            shared: Arc::new(Shared {
                config,
                loaded: OnceLock::new(),
                metrics,
                draining: AtomicBool::new(false),
                inflight: AtomicUsize::new(0),
                idle: Notify::new(),
                created: unix_now(),
            }),
        }
    }

    /// Installs the loaded engine; later calls are ignored.
    pub fn set_loaded(&self, loaded: Loaded) {
        let info = loaded.engine.model_info();
        let (dtype, bytes) = (info.kv_cache_dtype, info.kv_cache_bytes);
        self.shared.metrics.set_kv_cache(dtype, bytes);
        let _ = self.shared.loaded.set(loaded);
    }

    /// The engine and friends, or 503 while loading / draining.
    pub fn loaded(&self) -> Result<&Loaded, ApiError> {
        if self.is_draining() {
            return Err(ApiError::ShuttingDown);
        }
        self.shared.loaded.get().ok_or(ApiError::NotReady)
    }

    /// The engine, if loaded (even while draining).
    pub fn engine(&self) -> Option<&EngineHandle> {
        self.shared.loaded.get().map(|l| &l.engine)
    }

    /// The HTTP settings.
    pub fn config(&self) -> &StateConfig {
        &self.shared.config
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Startup time (for `created` in `/v1/models`).
    pub fn created(&self) -> u64 {
        self.shared.created
    }

    /// True once shutdown began.
    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::Acquire)
    }

    /// Begins draining: readiness and new requests get 503 from now on.
    pub fn start_draining(&self) {
        self.shared.draining.store(true, Ordering::Release);
        if let Some(engine) = self.engine() {
            engine.begin_shutdown();
        }
    }

    /// Engine requests admitted and not yet finished.
    pub fn inflight(&self) -> usize {
        self.shared.inflight.load(Ordering::Acquire)
    }

    /// Waits until no request is in flight.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.shared.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.inflight() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Admits `slots` engine requests or says 429 (queue full) / 503 (draining), before any work.
    pub fn admit(&self, slots: usize) -> Result<Admission, ApiError> {
        if self.is_draining() {
            return Err(ApiError::ShuttingDown);
        }
        let limit = self.shared.config.max_inflight.max(1);
        // A request with more prompts than the limit would otherwise never be admitted.
        let slots = slots.clamp(1, limit);
        let mut current = self.shared.inflight.load(Ordering::Acquire);
        loop {
            if current + slots > limit {
                return Err(ApiError::QueueFull);
            }
            match self.shared.inflight.compare_exchange_weak(
                current,
                current + slots,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Ok(Admission {
                        state: self.clone(),
                        slots,
                    });
                }
                Err(actual) => current = actual,
            }
        }
    }
}
