//! The server's view of the engine: start it, submit requests, read stats, shut it down.
//!
//! Invariants: `submit` never blocks — it validates the request, then `try_send`s it into a
//! bounded channel; at most `max_queue_size` requests are accepted but not yet scheduled
//! (`QueueFull` beyond that). After `begin_shutdown` every submit is `ShuttingDown`. Each request
//! gets its own unbounded event channel, so the engine thread never waits on a slow client;
//! dropping the receiver cancels the request. The engine thread is joined when the last clone
//! of the handle is dropped.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use candle_core::{DType, Device};

use crate::config::{
    AttentionKernels, DTypeSpec, DUMMY_WEIGHTS_SEED, DeviceSpec, EngineConfig, LoadFormat,
    ModelSource, MptConfig,
};
use crate::error::{EngineError, Result};
use crate::kv_budget::{fixed_kv_cache_blocks, gib};
use crate::kv_cache::KvCache;
use crate::model::Mpt;
use crate::sampling::MAX_TOP_LOGPROBS;
use crate::scheduler::{Scheduler, SchedulerConfig};
use crate::sequence::blocks_for;
use crate::step_loop::{self, Command, Submission};
use crate::tokenizer::Tokenizer;
use crate::types::{EngineStats, Event, GenerateRequest, ModelInfo, SubmitError};

/// Events of one request, in order; dropping it cancels the request.
pub type EventStream = tokio::sync::mpsc::UnboundedReceiver<Event>;

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

/// What `submit` checks a request against.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) max_model_len: usize,
    pub(crate) vocab_size: usize,
    pub(crate) num_blocks: usize,
    pub(crate) block_size: usize,
    pub(crate) max_queue_size: usize,
}

/// Marks the engine dead when the engine thread ends, even by panic.
pub(crate) struct AliveGuard(pub(crate) Arc<Shared>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::SeqCst);
    }
}

/// What the engine thread reports back once loaded.
pub(crate) struct Ready {
    pub(crate) tokenizer: Arc<Tokenizer>,
    pub(crate) model_info: ModelInfo,
    pub(crate) limits: Limits,
}

/// Everything the engine thread owns, freshly loaded.
pub(crate) struct Loaded {
    pub(crate) model: Mpt,
    pub(crate) cache: KvCache,
    pub(crate) sched: Scheduler,
    pub(crate) tokenizer: Arc<Tokenizer>,
    pub(crate) eos: u32,
}

struct Inner {
    sender: Option<SyncSender<Command>>,
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
    tokenizer: Arc<Tokenizer>,
    model_info: ModelInfo,
    limits: Limits,
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

fn invalid(message: String, param: &str, code: Option<&str>) -> SubmitError {
    SubmitError::Invalid {
        message,
        param: Some(param.to_string()),
        code: code.map(str::to_string),
    }
}

impl EngineHandle {
    /// Loads the model on a new std::thread and blocks until it is ready or failed.
    pub fn start(config: EngineConfig) -> Result<EngineHandle> {
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
        let (sender, receiver) = std::sync::mpsc::sync_channel(config.max_queue_size.max(1));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("mpt-engine".into())
            .spawn(move || step_loop::run(config, receiver, thread_shared, ready_tx))
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

    /// Validates the request, then a bounded `try_send` into the engine; dropping the returned
    /// stream cancels the request.
    pub fn submit(&self, request: GenerateRequest) -> Result<EventStream, SubmitError> {
        let inner = &self.inner;
        if inner.shared.shutting_down.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        if !self.is_alive() {
            return Err(SubmitError::EngineStopped);
        }
        validate(&request, &inner.limits)?;
        let pending = &inner.shared.pending;
        if pending.fetch_add(1, Ordering::SeqCst) >= inner.limits.max_queue_size {
            pending.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull);
        }
        let (events, stream) = tokio::sync::mpsc::unbounded_channel();
        let submission = Submission {
            request,
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
                pending.fetch_sub(1, Ordering::SeqCst);
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

/// Rejects what can never run, with vLLM's wording for the context limit.
pub(crate) fn validate(req: &GenerateRequest, limits: &Limits) -> Result<(), SubmitError> {
    let p = req.prompt_token_ids.len();
    let m = req.stop.max_tokens;
    if p == 0 {
        return Err(invalid(
            "the prompt must contain at least one token".into(),
            "prompt",
            None,
        ));
    }
    if let Some(&bad) = req
        .prompt_token_ids
        .iter()
        .find(|&&t| t as usize >= limits.vocab_size)
    {
        return Err(invalid(
            format!(
                "token id {bad} is out of vocabulary (vocab size {})",
                limits.vocab_size
            ),
            "prompt",
            None,
        ));
    }
    if p + m > limits.max_model_len {
        return Err(invalid(
            format!(
                "This model's maximum context length is {} tokens. However, you requested {} tokens ({p} in the prompt, {m} for the completion). Please reduce the length of the prompt or completion.",
                limits.max_model_len,
                p + m
            ),
            if m == 0 { "prompt" } else { "max_tokens" },
            Some("context_length_exceeded"),
        ));
    }
    let needed = blocks_for(p + m, limits.block_size);
    if needed > limits.num_blocks {
        return Err(invalid(
            format!(
                "the request needs {} tokens of KV cache ({p} in the prompt, {m} for the completion) but the whole cache holds {}",
                p + m,
                limits.num_blocks * limits.block_size
            ),
            "max_tokens",
            Some("context_length_exceeded"),
        ));
    }
    if req.n == 0 {
        return Err(invalid("n must be at least 1".into(), "n", None));
    }
    if req.best_of < req.n {
        return Err(invalid(
            format!("best_of ({}) must be at least n ({})", req.best_of, req.n),
            "best_of",
            None,
        ));
    }
    for (value, param) in [
        (req.logprobs, "logprobs"),
        (req.prompt_logprobs, "prompt_logprobs"),
    ] {
        if value.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
            return Err(invalid(
                format!("{param} must be at most {MAX_TOP_LOGPROBS}"),
                param,
                None,
            ));
        }
    }
    let s = &req.sampling;
    if !(s.temperature >= 0.0
        && s.top_p > 0.0
        && s.top_p <= 1.0
        && s.min_p >= 0.0
        && s.min_p <= 1.0)
    {
        return Err(invalid(
            "temperature must be ≥ 0, top_p in (0, 1], min_p in [0, 1]".into(),
            "temperature",
            None,
        ));
    }
    if s.repetition_penalty <= 0.0 {
        return Err(invalid(
            "repetition_penalty must be > 0".into(),
            "repetition_penalty",
            None,
        ));
    }
    Ok(())
}

fn resolve_device(spec: DeviceSpec) -> Result<Device> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(i) => Ok(Device::new_cuda(i)?),
    }
}

fn resolve_dtype(spec: DTypeSpec, device: &Device) -> DType {
    match spec {
        DTypeSpec::Auto if device.is_cpu() => DType::F32,
        DTypeSpec::Auto => DType::BF16,
        DTypeSpec::F32 => DType::F32,
        DTypeSpec::F16 => DType::F16,
        DTypeSpec::Bf16 => DType::BF16,
    }
}

/// `chat_template` from `tokenizer_config.json` (a string, or the entry named `default`).
fn read_chat_template(dir: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("tokenizer_config.json")).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    match json.get("chat_template")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => None,
    }
}

/// The model's weights from the checkpoint or, with `--load-format dummy`, random ones of the
/// shapes in `config.json`.
fn load_model(config: &EngineConfig, device: &Device, dtype: DType) -> Result<Mpt> {
    let mcfg = match (config.load_format, &config.model) {
        (LoadFormat::Auto, source) => return Mpt::load(source, device, dtype),
        (LoadFormat::Dummy, ModelSource::Demo) => MptConfig::from_json(crate::demo::CONFIG_JSON)?,
        (LoadFormat::Dummy, ModelSource::Dir(dir)) => {
            let path = dir.join("config.json");
            if !path.is_file() {
                return Err(EngineError::setting(
                    "load_format",
                    format!(
                        "--load-format dummy builds the model from {} alone, and it is missing",
                        path.display()
                    ),
                ));
            }
            MptConfig::from_dir(dir)?
        }
    };
    tracing::warn!(
        d_model = mcfg.d_model,
        n_layers = mcfg.n_layers,
        "--load-format dummy: random weights of the checkpoint's shapes; the output is noise"
    );
    Mpt::dummy(mcfg, device, dtype, DUMMY_WEIGHTS_SEED)
}

/// KV blocks for `config` and a sentence on how they were chosen; on a GPU with no explicit
/// size this runs the profiling forward pass (see [`crate::kv_budget`]).
fn kv_pool_blocks(
    config: &EngineConfig,
    model: &Mpt,
    bytes_per_block: u64,
    max_model_len: usize,
) -> Result<(usize, String)> {
    if let Some(fixed) =
        fixed_kv_cache_blocks(config.kv_cache, !model.device().is_cpu(), bytes_per_block)
    {
        return Ok(fixed);
    }
    measured_kv_pool_blocks(config, model, bytes_per_block, max_model_len)
}

#[cfg(feature = "cuda")]
fn measured_kv_pool_blocks(
    config: &EngineConfig,
    model: &Mpt,
    bytes_per_block: u64,
    max_model_len: usize,
) -> Result<(usize, String)> {
    use crate::kv_budget::{PoolNeeds, gpu_kv_cache_blocks, measure_gpu, profile_batch};
    let (batch, profile_blocks) = profile_batch(
        config.max_num_batched_tokens,
        max_model_len,
        config.max_num_seqs,
        config.block_size,
        model.config().vocab_size,
    );
    let memory = measure_gpu(model, &batch, profile_blocks, config.block_size)?;
    let fraction = config.gpu_memory_utilization;
    let needs = PoolNeeds {
        bytes_per_block,
        block_size: config.block_size,
        max_model_len,
        max_num_batched_tokens: config.max_num_batched_tokens,
    };
    let blocks = gpu_kv_cache_blocks(&memory, fraction, &needs)?;
    let how = format!(
        "--gpu-memory-utilization {fraction}: {fraction} × {} total − {} in use after loading \
         the weights − {} activation peak of a {}-token step",
        gib(memory.total),
        gib(memory.used_after_weights),
        gib(memory.activation_peak),
        batch.num_tokens(),
    );
    Ok((blocks, how))
}

#[cfg(not(feature = "cuda"))]
fn measured_kv_pool_blocks(
    _config: &EngineConfig,
    _model: &Mpt,
    _bytes_per_block: u64,
    _max_model_len: usize,
) -> Result<(usize, String)> {
    Err(EngineError::setting(
        "gpu_memory_utilization",
        "device memory can only be measured in a build with --features cuda",
    ))
}

/// Loads the model, tokenizer and KV cache described by `config`.
pub(crate) fn load(config: &EngineConfig) -> Result<(Loaded, Ready)> {
    let device = resolve_device(config.device)?;
    let dtype = resolve_dtype(config.dtype, &device);
    let mut model = load_model(config, &device, dtype)?;
    model.set_cuda_attention_kernels(config.attention_kernels == AttentionKernels::Custom)?;
    let (tokenizer, model_dir) = match &config.model {
        ModelSource::Demo => (Tokenizer::from_bytes(crate::demo::TOKENIZER_JSON)?, None),
        ModelSource::Dir(dir) => (
            Tokenizer::from_file(&dir.join("tokenizer.json"))?,
            Some(dir.clone()),
        ),
    };
    let mcfg = model.config().clone();
    let max_model_len = config.max_model_len.unwrap_or(mcfg.max_seq_len);
    if max_model_len == 0 {
        return Err(EngineError::setting("max_model_len", "must be at least 1"));
    }
    // The CPU cache is f32 host memory whatever the weights are; on a GPU the pools hold the
    // model's dtype.
    let kv_dtype = if device.is_cpu() { DType::F32 } else { dtype };
    let bytes_per_block = KvCache::bytes_per_block_dtype(&mcfg, config.block_size, kv_dtype);
    let (num_blocks, how) = kv_pool_blocks(config, &model, bytes_per_block, max_model_len)?;
    tracing::info!(
        blocks = num_blocks,
        tokens = num_blocks * config.block_size,
        size = %gib(num_blocks as u64 * bytes_per_block),
        dtype = ?kv_dtype,
        sized_by = %how,
        "KV cache pool"
    );
    let cache = if device.is_cpu() {
        KvCache::new(&mcfg, num_blocks, config.block_size, &device)?
    } else {
        KvCache::new_tensors(&mcfg, num_blocks, config.block_size, &device, dtype)?
    };
    let sched = Scheduler::new(SchedulerConfig {
        num_blocks,
        block_size: config.block_size,
        max_num_seqs: config.max_num_seqs,
        max_num_batched_tokens: config.max_num_batched_tokens,
        enable_prefix_caching: config.enable_prefix_caching,
    });
    let eos = tokenizer.token_to_id("<|endoftext|>").unwrap_or(0);
    let model_info = ModelInfo {
        max_model_len,
        vocab_size: mcfg.vocab_size,
        eos_token_id: eos,
        chat_template: model_dir.as_deref().and_then(read_chat_template),
        model_dir,
    };
    let limits = Limits {
        max_model_len,
        vocab_size: mcfg.vocab_size,
        num_blocks,
        block_size: config.block_size,
        max_queue_size: config.max_queue_size,
    };
    let tokenizer = Arc::new(tokenizer);
    let loaded = Loaded {
        model,
        cache,
        sched,
        tokenizer: Arc::clone(&tokenizer),
        eos,
    };
    Ok((
        loaded,
        Ready {
            tokenizer,
            model_info,
            limits,
        },
    ))
}
