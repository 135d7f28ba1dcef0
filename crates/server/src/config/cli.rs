//! The command-line flags of [`Cli`]: one per setting, each also read from the environment
//! variable `MPT_SERVER_<NAME>`. Values stay strings or options here; [`super::ServerConfig`]
//! merges them with the TOML file and checks them.
//!
//! Invariant: every flag's doc comment states its default, as `--help` shows it (README copies
//! that text; CI compares).

use std::path::PathBuf;

use clap::Parser;

/// Command-line flags. Every one also reads `MPT_SERVER_<NAME>` and the TOML key `<name>`.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "mpt-server",
    version,
    about = "OpenAI-compatible HTTP server for MosaicML MPT models"
)]
pub struct Cli {
    /// Model directory (config.json, tokenizer.json, weights) or an MPT .gguf file. Without it the bundled demo model is served.
    #[arg(
        long,
        env = "MPT_SERVER_MODEL",
        value_name = "PATH",
        hide_env_values = true
    )]
    pub model: Option<PathBuf>,
    /// Name clients use in the `model` field [default: the model directory's name, or "mpt-demo"].
    #[arg(
        long,
        env = "MPT_SERVER_SERVED_MODEL_NAME",
        value_name = "NAME",
        hide_env_values = true
    )]
    pub served_model_name: Option<String>,
    /// Address to bind [default: 0.0.0.0].
    #[arg(long, env = "MPT_SERVER_HOST", hide_env_values = true)]
    pub host: Option<String>,
    /// Port to bind; 0 picks a free one [default: 8000].
    #[arg(long, env = "MPT_SERVER_PORT", hide_env_values = true)]
    pub port: Option<u16>,
    /// Longest prompt + completion in tokens; may exceed the checkpoint's max_seq_len (ALiBi) [default: the checkpoint's max_seq_len].
    #[arg(
        long,
        env = "MPT_SERVER_MAX_MODEL_LEN",
        value_name = "N",
        hide_env_values = true
    )]
    pub max_model_len: Option<usize>,
    /// Most sequences running in one engine step [default: 64].
    #[arg(
        long,
        env = "MPT_SERVER_MAX_NUM_SEQS",
        value_name = "N",
        hide_env_values = true
    )]
    pub max_num_seqs: Option<usize>,
    /// Most tokens (prefill + decode) in one engine step [default: 2048].
    #[arg(
        long,
        env = "MPT_SERVER_MAX_NUM_BATCHED_TOKENS",
        value_name = "N",
        hide_env_values = true
    )]
    pub max_num_batched_tokens: Option<usize>,
    /// Tokens per KV-cache block [default: 16].
    #[arg(
        long,
        env = "MPT_SERVER_BLOCK_SIZE",
        value_name = "N",
        hide_env_values = true
    )]
    pub block_size: Option<usize>,
    /// KV cache size in blocks (conflicts with --kv-cache-memory).
    #[arg(
        long,
        env = "MPT_SERVER_NUM_KV_BLOCKS",
        value_name = "N",
        conflicts_with = "kv_cache_memory",
        hide_env_values = true
    )]
    pub num_kv_blocks: Option<usize>,
    /// KV cache size in bytes, e.g. "2GiB", "512MiB", "1000000" [default: 1GiB on the CPU; on a GPU the pool is sized by --gpu-memory-utilization].
    #[arg(
        long,
        env = "MPT_SERVER_KV_CACHE_MEMORY",
        value_name = "SIZE",
        hide_env_values = true
    )]
    pub kv_cache_memory: Option<String>,
    /// KV cache element type: auto (f16 on the CPU, as llama.cpp; on a GPU bf16, or f16 for f16 weights), f32, f16 or bf16 [default: auto].
    #[arg(
        long,
        env = "MPT_SERVER_KV_CACHE_DTYPE",
        value_name = "DTYPE",
        hide_env_values = true
    )]
    pub kv_cache_dtype: Option<String>,
    /// Weight/activation dtype: auto (f32 on CPU, bf16 on GPU), f32, f16 or bf16 [default: auto].
    #[arg(long, env = "MPT_SERVER_DTYPE", hide_env_values = true)]
    pub dtype: Option<String>,
    /// Quantize the linear layers and the embedding while loading: q8_0, q4_k, q6_k or q4_0 (ggml's formats; matrices whose inner dimension is not a whole number of blocks stay at --dtype) [default: none].
    #[arg(
        long,
        env = "MPT_SERVER_QUANTIZATION",
        value_name = "FORMAT",
        hide_env_values = true
    )]
    pub quantization: Option<String>,
    /// tokenizer.json to use instead of the model's (for a .gguf model: the tokenizer.json beside the file, else the one rebuilt from the file's metadata).
    #[arg(
        long,
        env = "MPT_SERVER_TOKENIZER",
        value_name = "PATH",
        hide_env_values = true
    )]
    pub tokenizer: Option<PathBuf>,
    /// Compute device: cpu or cuda:N [default: cpu].
    #[arg(long, env = "MPT_SERVER_DEVICE", hide_env_values = true)]
    pub device: Option<String>,
    /// Fraction F of the GPU's memory this process may use, 0 < F ≤ 1: the KV cache gets what is left of it after the weights and a measured activation peak, unless --kv-cache-memory or --num-kv-blocks is given. No effect on the CPU, where the --kv-cache-memory budget applies [default: 0.9].
    #[arg(
        long,
        env = "MPT_SERVER_GPU_MEMORY_UTILIZATION",
        value_name = "F",
        hide_env_values = true
    )]
    pub gpu_memory_utilization: Option<f64>,
    /// Weights to load: auto (the checkpoint's safetensors or .bin files) or dummy (random weights of the shapes in config.json, for speed and memory tests; tokenizer.json is still read; the output is noise) [default: auto].
    #[arg(
        long,
        env = "MPT_SERVER_LOAD_FORMAT",
        value_name = "FORMAT",
        hide_env_values = true
    )]
    pub load_format: Option<String>,
    /// Attention implementation on a CUDA device: candle-ops (built from candle's CUDA ops) or custom (our paged-attention CUDA kernels, not yet verified on a GPU; refused on the CPU) [default: candle-ops].
    #[arg(
        long,
        env = "MPT_SERVER_ATTENTION_KERNELS",
        value_name = "IMPL",
        hide_env_values = true
    )]
    pub attention_kernels: Option<String>,
    /// Make every token's logits bitwise independent of the other requests in its step, of where chunked prefill splits its prompt, of recomputation and of prefix-cache hits (CPU; f32, bf16 and Q8_0 weights), so a seeded request gives the same text alone or under load; false sends f32 prefill chunks to candle's GEMM, whose sums depend on the batch [default: true].
    #[arg(
        long,
        env = "MPT_SERVER_BATCH_INVARIANT",
        value_name = "BOOL",
        action = clap::ArgAction::Set,
        hide_env_values = true
    )]
    pub batch_invariant: Option<bool>,
    /// Speculative decoding, as vLLM spells it: '{"method":"ngram","num_speculative_tokens":K,"prompt_lookup_max":N,"prompt_lookup_min":M}' drafts up to K tokens per step by finding the sequence's last N..M tokens earlier in its prompt or output, and keeps those the model agrees with (the output is unchanged: bitwise with --batch-invariant). Helps where output repeats its input (quoting, editing, code, summaries); lookup bounds default to 5; drafts are held back when the batch keeps the CPU busy anyway, or, with "disable_by_batch_size":B, once B sequences decode [default: off].
    #[arg(
        long,
        env = "MPT_SERVER_SPECULATIVE_CONFIG",
        value_name = "JSON",
        hide_env_values = true
    )]
    pub speculative_config: Option<String>,
    /// CPU worker threads for the model [default: physical cores].
    #[arg(
        long,
        env = "MPT_SERVER_THREADS",
        value_name = "N",
        hide_env_values = true
    )]
    pub threads: Option<usize>,
    /// Require `Authorization: Bearer KEY` on /v1/* (never logged).
    #[arg(
        long,
        env = "MPT_SERVER_API_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    pub api_key: Option<String>,
    /// Most requests waiting for a slot before new ones get 429; 0: none wait, but a request that can start at once is served [default: 256].
    #[arg(
        long,
        env = "MPT_SERVER_MAX_QUEUE_SIZE",
        value_name = "N",
        hide_env_values = true
    )]
    pub max_queue_size: Option<usize>,
    /// Seconds in-flight requests may take to finish after SIGTERM before they are aborted [default: 30].
    #[arg(
        long,
        env = "MPT_SERVER_SHUTDOWN_TIMEOUT",
        value_name = "SECS",
        hide_env_values = true
    )]
    pub shutdown_timeout: Option<u64>,
    /// Allowed CORS origin ("*" for any); repeat for several. CORS is off when none is given.
    #[arg(
        long,
        env = "MPT_SERVER_CORS_ALLOW_ORIGIN",
        value_name = "ORIGIN",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub cors_allow_origin: Vec<String>,
    /// Log and ignore request fields the API does not know, instead of answering 400 "Unrecognized request argument supplied" (for clients that send harmless extras); also on when the environment variable or the TOML key is true.
    #[arg(
        long,
        env = "MPT_SERVER_ALLOW_UNKNOWN_FIELDS",
        action = clap::ArgAction::SetTrue,
        hide_env_values = true
    )]
    pub allow_unknown_fields: bool,
    /// Log format: text or json [default: text].
    #[arg(long, env = "MPT_SERVER_LOG_FORMAT", hide_env_values = true)]
    pub log_format: Option<String>,
    /// TOML file with any of the settings above (keys in snake_case); flags and env vars override it.
    #[arg(
        long,
        env = "MPT_SERVER_CONFIG",
        value_name = "FILE",
        hide_env_values = true
    )]
    pub config: Option<PathBuf>,
}
