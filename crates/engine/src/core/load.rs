//! Loading: the device, the weights (checkpoint, GGUF file or dummy; quantized while read when
//! asked), the tokenizer and the KV cache pool,
//! everything the engine thread owns, plus the facts the handle needs ([`Ready`]).

use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device};

use super::admission::Limits;
use crate::api::config::{
    AttentionKernels, DTypeSpec, DUMMY_WEIGHTS_SEED, DeviceSpec, EngineConfig, FaultPlan,
    KvCacheDtype, LoadFormat, ModelSource, NgramSpeculation,
};
use crate::api::error::{EngineError, Result};
use crate::api::types::{LoadProgress, ModelInfo};
use crate::decode::grammar::GrammarCompiler;
use crate::kv::KvCache;
use crate::kv::budget::{PoolNeeds, fixed_kv_cache_blocks, gib};
use crate::model::Mpt;
use crate::model::config::MptConfig;
use crate::model::gguf::GgufFile;
use crate::model::mpt::LoadOptions;
use crate::sched::scheduler::{Scheduler, SchedulerConfig};
use crate::tokenizer::Tokenizer;

/// What the engine thread reports back once loaded.
pub(crate) struct Ready {
    pub(crate) tokenizer: Arc<Tokenizer>,
    pub(crate) model_info: ModelInfo,
    pub(crate) limits: Limits,
    /// Structured outputs over the model's padded vocabulary.
    pub(crate) grammars: GrammarCompiler,
}

/// Everything the engine thread owns, freshly loaded.
pub(crate) struct Loaded {
    pub(crate) model: Mpt,
    pub(crate) cache: KvCache,
    pub(crate) sched: Scheduler,
    pub(crate) tokenizer: Arc<Tokenizer>,
    pub(crate) eos: u32,
    pub(crate) faults: FaultPlan,
    /// Speculative decoding settings, checked by the handle.
    pub(crate) speculative: Option<NgramSpeculation>,
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

/// The KV cache's element type: `auto` is f16 on the CPU (llama.cpp's default), and on a GPU
/// the weights' 16-bit dtype (bf16 unless they are f16).
fn resolve_kv_dtype(spec: KvCacheDtype, device: &Device, weights: DType) -> DType {
    match spec {
        KvCacheDtype::Auto if device.is_cpu() => DType::F16,
        KvCacheDtype::Auto if weights == DType::F16 => DType::F16,
        KvCacheDtype::Auto => DType::BF16,
        KvCacheDtype::F32 => DType::F32,
        KvCacheDtype::F16 => DType::F16,
        KvCacheDtype::Bf16 => DType::BF16,
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

/// A dtype as `--kv-cache-dtype` and `--dtype` spell it.
pub(crate) fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "other",
    }
}

/// The model's weights from the checkpoint or, with `--load-format dummy`, random ones of the
/// shapes in `config.json`.
fn load_model(
    config: &EngineConfig,
    gguf: Option<&GgufFile>,
    device: &Device,
    dtype: DType,
    on_progress: &dyn Fn(LoadProgress),
) -> Result<Mpt> {
    let options = LoadOptions {
        quantization: config.quantization,
    };
    let mcfg = match (config.load_format, &config.model) {
        (LoadFormat::Auto, ModelSource::Gguf(_)) => {
            let file = gguf.expect("the GGUF file is opened before the model; this is a bug");
            return Mpt::from_gguf(file, device, dtype, options, on_progress);
        }
        (LoadFormat::Auto, source) => {
            return Mpt::load_with(source, device, dtype, options, on_progress);
        }
        (LoadFormat::Dummy, ModelSource::Gguf(_)) => gguf
            .expect("the GGUF file is opened before the model; this is a bug")
            .config()?,
        (LoadFormat::Dummy, ModelSource::Demo) => {
            MptConfig::from_json(crate::model::demo::CONFIG_JSON)?
        }
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
    Mpt::dummy_with(mcfg, device, dtype, DUMMY_WEIGHTS_SEED, options)
}

/// The tokenizer: `--tokenizer` if given; else the model's `tokenizer.json` (for a GGUF file
/// the one beside it, or the one rebuilt from its metadata); the model's directory, if any.
fn load_tokenizer(
    config: &EngineConfig,
    gguf: Option<&GgufFile>,
) -> Result<(Tokenizer, Option<std::path::PathBuf>)> {
    let dir = match &config.model {
        ModelSource::Demo => None,
        ModelSource::Dir(dir) => Some(dir.clone()),
        ModelSource::Gguf(file) => file.parent().map(std::path::Path::to_path_buf),
    };
    if let Some(path) = &config.tokenizer {
        return Ok((Tokenizer::from_file(path)?, dir));
    }
    let tokenizer = match (&config.model, gguf) {
        (ModelSource::Demo, _) => Tokenizer::from_bytes(crate::model::demo::TOKENIZER_JSON)?,
        (ModelSource::Dir(dir), _) => Tokenizer::from_file(&dir.join("tokenizer.json"))?,
        (ModelSource::Gguf(_), Some(file)) => {
            let beside = dir.as_deref().map(|d| d.join("tokenizer.json"));
            match beside.filter(|p| p.is_file()) {
                Some(path) => {
                    tracing::info!(path = %path.display(), "tokenizer: the tokenizer.json beside the GGUF file");
                    Tokenizer::from_file(&path)?
                }
                None => {
                    tracing::info!(
                        "tokenizer: rebuilt from the GGUF file's tokenizer.ggml.* metadata"
                    );
                    file.tokenizer()?
                }
            }
        }
        (ModelSource::Gguf(_), None) => {
            unreachable!("the GGUF file is opened before the tokenizer; this is a bug")
        }
    };
    Ok((tokenizer, dir))
}

/// KV blocks for `config` and a sentence on how they were chosen; on a GPU with no explicit
/// size this runs the profiling forward pass (see [`crate::kv::budget`]).
fn kv_pool_blocks(
    config: &EngineConfig,
    model: &Mpt,
    bytes_per_block: u64,
    max_model_len: usize,
) -> Result<(usize, String)> {
    let needs = PoolNeeds {
        bytes_per_block,
        block_size: config.block_size,
        max_model_len,
        max_num_batched_tokens: config.max_num_batched_tokens,
    };
    if let Some(fixed) = fixed_kv_cache_blocks(config.kv_cache, !model.device().is_cpu(), &needs) {
        return fixed;
    }
    measured_kv_pool_blocks(config, model, &needs)
}

#[cfg(feature = "cuda")]
fn measured_kv_pool_blocks(
    config: &EngineConfig,
    model: &Mpt,
    needs: &PoolNeeds,
) -> Result<(usize, String)> {
    use crate::kv::budget::{
        decode_profile_batch, gpu_kv_cache_blocks, measure_gpu, profile_batch,
    };
    let vocab_size = model.config().vocab_size;
    let (prefill, profile_blocks) = profile_batch(
        config.max_num_batched_tokens,
        needs.max_model_len,
        config.max_num_seqs,
        config.block_size,
        vocab_size,
    );
    let decode = decode_profile_batch(
        config.max_num_seqs,
        needs.max_model_len,
        config.block_size,
        vocab_size,
    );
    let memory = measure_gpu(
        model,
        &[&prefill, &decode],
        profile_blocks,
        config.block_size,
    )?;
    let fraction = config.gpu_memory_utilization;
    let blocks = gpu_kv_cache_blocks(&memory, fraction, needs)?;
    let how = format!(
        "--gpu-memory-utilization {fraction}: {fraction} × {} total − {} in use after loading \
         the weights − {} activation peak of a {}-token step or {} decodes at {} tokens",
        gib(memory.total),
        gib(memory.used_after_weights),
        gib(memory.activation_peak),
        prefill.num_tokens(),
        decode.seqs.len(),
        needs.max_model_len,
    );
    Ok((blocks, how))
}

#[cfg(not(feature = "cuda"))]
fn measured_kv_pool_blocks(
    _config: &EngineConfig,
    _model: &Mpt,
    _needs: &PoolNeeds,
) -> Result<(usize, String)> {
    Err(EngineError::setting(
        "gpu_memory_utilization",
        "device memory can only be measured in a build with --features cuda",
    ))
}

/// Loads the model, tokenizer and KV cache described by `config`.
pub(crate) fn load(
    config: &EngineConfig,
    on_progress: &dyn Fn(LoadProgress),
) -> Result<(Loaded, Ready)> {
    let device = resolve_device(config.device)?;
    let dtype = resolve_dtype(config.dtype, &device);
    let gguf = match &config.model {
        ModelSource::Gguf(path) => Some(GgufFile::open(path)?),
        _ => None,
    };
    let started = Instant::now();
    let mut model = load_model(config, gguf.as_ref(), &device, dtype, on_progress)?;
    tracing::info!(
        seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
        quantization = config.quantization.map_or("none", |q| q.name()),
        "model weights loaded"
    );
    model.set_cuda_attention_kernels(config.attention_kernels == AttentionKernels::Custom)?;
    model.set_batch_invariant(config.batch_invariant);
    let (tokenizer, model_dir) = load_tokenizer(config, gguf.as_ref())?;
    let chat_template = gguf
        .as_ref()
        .and_then(GgufFile::chat_template)
        .or_else(|| model_dir.as_deref().and_then(read_chat_template));
    drop(gguf);
    let mcfg = model.config().clone();
    let max_model_len = config.max_model_len.unwrap_or(mcfg.max_seq_len);
    if max_model_len == 0 {
        return Err(EngineError::setting("max_model_len", "must be at least 1"));
    }
    let kv_dtype = resolve_kv_dtype(config.kv_cache_dtype, &device, dtype);
    if config.attention_kernels == AttentionKernels::Custom && kv_dtype != dtype {
        return Err(EngineError::setting(
            "kv_cache_dtype",
            format!(
                "--attention-kernels custom reads a KV cache of the weights' dtype ({dtype:?}), \
                 not {kv_dtype:?}: pass --kv-cache-dtype {}",
                dtype_name(dtype)
            ),
        ));
    }
    let bytes_per_block = KvCache::bytes_per_block_dtype(&mcfg, config.block_size, kv_dtype);
    let (num_blocks, how) = kv_pool_blocks(config, &model, bytes_per_block, max_model_len)?;
    tracing::info!(
        blocks = num_blocks,
        tokens = num_blocks * config.block_size,
        size = %gib(num_blocks as u64 * bytes_per_block),
        dtype = dtype_name(kv_dtype),
        bytes_per_token = bytes_per_block / config.block_size as u64,
        sized_by = %how,
        "KV cache pool"
    );
    let cache = KvCache::with_dtype(&mcfg, num_blocks, config.block_size, &device, kv_dtype)?;
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
        chat_template,
        model_dir,
        kv_cache_dtype: dtype_name(kv_dtype),
        kv_cache_bytes: num_blocks as u64 * bytes_per_block,
    };
    let limits = Limits {
        max_model_len,
        vocab_size: mcfg.vocab_size,
        max_num_seqs: config.max_num_seqs,
        max_queue_size: config.max_queue_size,
    };
    let grammars = GrammarCompiler::new(tokenizer.clone(), mcfg.vocab_size, eos);
    let tokenizer = Arc::new(tokenizer);
    let loaded = Loaded {
        model,
        cache,
        sched,
        tokenizer: Arc::clone(&tokenizer),
        eos,
        faults: config.faults,
        speculative: config.speculative,
    };
    Ok((
        loaded,
        Ready {
            tokenizer,
            model_info,
            limits,
            grammars,
        },
    ))
}
