//! The engine's own settings ([`EngineConfig`]), chosen by whoever starts it; the server's flags
//! map onto these. Checked when the engine starts ([`crate::EngineHandle::start`]).

use std::path::PathBuf;

/// Compute device for the model and the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The host CPU (always available).
    #[default]
    Cpu,
    /// NVIDIA GPU with the given ordinal (needs the `cuda` feature).
    Cuda(usize),
}

/// Dtype for weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DTypeSpec {
    /// f32 on CPU, bf16 on GPU.
    #[default]
    Auto,
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
}

/// Element type of the paged KV cache (`--kv-cache-dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCacheDtype {
    /// f16 on the CPU (as llama.cpp does); on a GPU bf16, or f16 when the weights are f16.
    #[default]
    Auto,
    /// 32-bit floats (exact; twice the memory).
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
}

impl KvCacheDtype {
    /// The names accepted on the command line, in order.
    pub const NAMES: [&'static str; 4] = ["auto", "f32", "f16", "bf16"];

    /// Parses one of [`Self::NAMES`].
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "auto" => Self::Auto,
            "f32" => Self::F32,
            "f16" => Self::F16,
            "bf16" => Self::Bf16,
            _ => return None,
        })
    }
}

/// KV cache budget on the CPU when no size is given ([`KvCacheSize::Auto`]).
pub const DEFAULT_CPU_KV_CACHE_BYTES: u64 = 1 << 30;

/// Fraction of a GPU's memory the process may use when no size is given (vLLM's default).
pub const DEFAULT_GPU_MEMORY_UTILIZATION: f64 = 0.9;

/// How big the paged KV cache is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCacheSize {
    /// On a GPU: what `gpu_memory_utilization` of the card leaves after the weights and a
    /// measured activation peak. On the CPU: [`DEFAULT_CPU_KV_CACHE_BYTES`].
    #[default]
    Auto,
    /// Exactly this many blocks.
    Blocks(usize),
    /// As many blocks as fit in this many bytes (K and V, all layers).
    Bytes(u64),
}

/// Where the weights come from (vLLM's `--load-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoadFormat {
    /// The checkpoint's weight files (safetensors, else PyTorch `.bin`).
    #[default]
    Auto,
    /// Random weights of the checkpoint's shapes, built from `config.json` alone (speed and
    /// memory measurements without the download; the output is noise).
    Dummy,
}

/// In-situ weight quantization at load (`--quantization`): ggml's block formats, so weights
/// are byte-identical to llama.cpp's conversion of the same checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Quantization {
    /// 8-bit, blocks of 32 with an f16 scale (8.5 bits per weight).
    Q8_0,
    /// 4-bit K-quant, super-blocks of 256 with 6-bit scales and mins (4.5 bits per weight).
    Q4K,
    /// 6-bit K-quant, super-blocks of 256 (6.5625 bits per weight).
    Q6K,
    /// 4-bit, blocks of 32 with an f16 scale (4.5 bits per weight).
    Q4_0,
}

impl Quantization {
    /// Every format, as `--quantization` lists them.
    pub const ALL: [Quantization; 4] = [Self::Q8_0, Self::Q4K, Self::Q6K, Self::Q4_0];

    /// The name on the command line and in logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Q8_0 => "q8_0",
            Self::Q4K => "q4_k",
            Self::Q6K => "q6_k",
            Self::Q4_0 => "q4_0",
        }
    }

    /// Parses a name (case-insensitive); the error lists the valid ones.
    pub fn parse(text: &str) -> Result<Self, String> {
        let lower = text.to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|q| q.name() == lower)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|q| q.name()).collect();
                format!(
                    "unknown quantization {text:?} (expected one of: {})",
                    names.join(", ")
                )
            })
    }
}

/// Which attention implementation runs on a CUDA device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionKernels {
    /// Gather, batched matmul and softmax from candle's own CUDA ops (correct by construction).
    #[default]
    CandleOps,
    /// Our paged prefill/decode CUDA kernels (`cuda` feature, CUDA device only; not yet
    /// verified on a GPU).
    Custom,
}

/// Longest draft a sequence may propose per step (each drafted token is one more row in the
/// forward pass, verified or not).
pub const MAX_SPECULATIVE_TOKENS: usize = 32;

/// N-gram (prompt lookup) speculative decoding, as vLLM's `--speculative-config` names it:
/// each decoding sequence drafts up to `num_speculative_tokens` tokens by matching its last
/// `prompt_lookup_max` down to `prompt_lookup_min` tokens against its earlier text; the step
/// verifies them and keeps the longest prefix the model agrees with, plus one token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NgramSpeculation {
    /// Most tokens drafted per sequence and step, 1 to [`MAX_SPECULATIVE_TOKENS`].
    pub num_speculative_tokens: usize,
    /// Longest suffix matched, at least `prompt_lookup_min`.
    pub prompt_lookup_max: usize,
    /// Shortest suffix matched, at least 1.
    pub prompt_lookup_min: usize,
    /// Draft only while fewer than this many sequences decode (vLLM's key), instead of
    /// weighing each draft against what the engine measures a row to cost; at least 1.
    pub disable_by_batch_size: Option<usize>,
}

impl NgramSpeculation {
    /// Refuses settings that could not draft, naming the field.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        let k = self.num_speculative_tokens;
        if !(1..=MAX_SPECULATIVE_TOKENS).contains(&k) {
            let why = format!("must be between 1 and {MAX_SPECULATIVE_TOKENS}, got {k}");
            return Err(("num_speculative_tokens", why));
        }
        if self.disable_by_batch_size == Some(0) {
            return Err(("disable_by_batch_size", "must be at least 1".into()));
        }
        if self.prompt_lookup_min < 1 {
            return Err(("prompt_lookup_min", "must be at least 1".into()));
        }
        if self.prompt_lookup_max < self.prompt_lookup_min {
            let why = format!(
                "must be at least prompt_lookup_min ({}), got {}",
                self.prompt_lookup_min, self.prompt_lookup_max
            );
            return Err(("prompt_lookup_max", why));
        }
        Ok(())
    }
}

/// Seed of the random weights of [`LoadFormat::Dummy`] (fixed: runs are repeatable).
pub const DUMMY_WEIGHTS_SEED: u64 = 0;

/// Where the model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A Hugging Face style directory: `config.json`, `tokenizer.json`, weights.
    Dir(PathBuf),
    /// A GGUF file as llama.cpp's `convert_hf_to_gguf.py` writes it for MPT.
    Gguf(PathBuf),
    /// The small demo checkpoint compiled into the binary.
    Demo,
}

/// Engine settings chosen by whoever starts it (the server's flags map onto these).
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// The checkpoint to serve.
    pub model: ModelSource,
    /// Compute device.
    pub device: DeviceSpec,
    /// Weight and activation dtype.
    pub dtype: DTypeSpec,
    /// Quantize the linear layers and the embedding to this ggml format while loading.
    pub quantization: Option<Quantization>,
    /// A `tokenizer.json` to use instead of the model's own.
    pub tokenizer: Option<PathBuf>,
    /// Context limit; `None` uses the checkpoint's `max_seq_len`. May exceed it (ALiBi).
    pub max_model_len: Option<usize>,
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV cache size.
    pub kv_cache: KvCacheSize,
    /// KV cache element type.
    pub kv_cache_dtype: KvCacheDtype,
    /// Most sequences in one step.
    pub max_num_seqs: usize,
    /// Most tokens (prefill + decode) in one step.
    pub max_num_batched_tokens: usize,
    /// Most requests waiting for admission before `submit` says `QueueFull`.
    pub max_queue_size: usize,
    /// Worker threads for CPU compute; `None` uses the physical cores.
    pub threads: Option<usize>,
    /// Reuse KV blocks of identical prompt prefixes.
    pub enable_prefix_caching: bool,
    /// Checkpoint weights, or random ones of the same shapes.
    pub load_format: LoadFormat,
    /// Attention implementation on a CUDA device ([`AttentionKernels::Custom`] fails elsewhere).
    pub attention_kernels: AttentionKernels,
    /// Bitwise batch-invariant forward pass on the CPU: a token's logits do not depend on the
    /// other sequences in its step, on chunked-prefill splits, on recomputation or on prefix-cache
    /// hits (f32, bf16 and Q8_0 weights; see `Mpt::set_batch_invariant`). Off, f32 prefill
    /// chunks use candle's GEMM.
    pub batch_invariant: bool,
    /// N-gram speculative decoding; `None` decodes one token per sequence and step.
    pub speculative: Option<NgramSpeculation>,
    /// Fraction of the GPU's memory the process may use, in (0, 1]; sizes a
    /// [`KvCacheSize::Auto`] cache on a GPU, ignored on the CPU.
    pub gpu_memory_utilization: f64,
    /// Failures to inject, for tests of the failure paths; none by default, and no flag, env
    /// var or config key of the server sets one.
    pub faults: FaultPlan,
}

/// Faults the engine injects on purpose (steps count from 1, every scheduled step once).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultPlan {
    /// The forward pass of this step fails, as a real one can (the requests in it fail).
    pub fail_forward_at_step: Option<u64>,
    /// The engine thread panics at this step, outside any recovery, and dies.
    pub kill_engine_at_step: Option<u64>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            model: ModelSource::Demo,
            device: DeviceSpec::Cpu,
            dtype: DTypeSpec::Auto,
            quantization: None,
            tokenizer: None,
            max_model_len: None,
            block_size: 16,
            kv_cache: KvCacheSize::Auto,
            kv_cache_dtype: KvCacheDtype::Auto,
            max_num_seqs: 64,
            max_num_batched_tokens: 2048,
            max_queue_size: 256,
            threads: None,
            enable_prefix_caching: true,
            load_format: LoadFormat::Auto,
            attention_kernels: AttentionKernels::CandleOps,
            batch_invariant: true,
            speculative: None,
            gpu_memory_utilization: DEFAULT_GPU_MEMORY_UTILIZATION,
            faults: FaultPlan::default(),
        }
    }
}
