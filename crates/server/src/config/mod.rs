//! Server configuration: one struct built from (in rising precedence) built-in defaults, an
//! optional TOML file (`--config`), environment variables `MPT_SERVER_<NAME>` and command-line
//! flags.
//!
//! Invariants: every flag has an env var and a TOML key of the same name in snake_case; the
//! merged [`ServerConfig`] is fully resolved (no `Option` left for a setting that has a default);
//! the API key never appears in `Debug` output or logs ([`ServerConfig::redacted`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use mpt_engine::{
    AttentionKernels, DTypeSpec, DeviceSpec, EngineConfig, FaultPlan, KvCacheDtype, KvCacheSize,
    LoadFormat, ModelSource, NgramSpeculation, Quantization,
};
use serde::Deserialize;

mod cli;
mod speculative;
mod values;

pub use cli::Cli;
pub use speculative::SpeculativeSpec;
pub use values::parse_size;
use values::*;

/// Default port, as vLLM.
pub const DEFAULT_PORT: u16 = 8000;
/// Default bind address.
pub const DEFAULT_HOST: &str = "0.0.0.0";
/// Name served for the bundled demo model.
pub const DEMO_MODEL_NAME: &str = "mpt-demo";

/// Errors while building the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The `--config` file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The `--config` file is not valid TOML for our keys.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong (names the key).
        message: String,
    },
    /// A value is out of range or inconsistent with another.
    #[error("invalid setting {setting}: {message}")]
    Invalid {
        /// The setting, named as its flag.
        setting: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// The TOML file: the same settings as [`Cli`], keys in snake_case. Unknown keys are errors.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// See `--model`.
    pub model: Option<PathBuf>,
    /// See `--served-model-name`.
    pub served_model_name: Option<String>,
    /// See `--host`.
    pub host: Option<String>,
    /// See `--port`.
    pub port: Option<u16>,
    /// See `--max-model-len`.
    pub max_model_len: Option<usize>,
    /// See `--max-num-seqs`.
    pub max_num_seqs: Option<usize>,
    /// See `--max-num-batched-tokens`.
    pub max_num_batched_tokens: Option<usize>,
    /// See `--block-size`.
    pub block_size: Option<usize>,
    /// See `--num-kv-blocks`.
    pub num_kv_blocks: Option<usize>,
    /// See `--kv-cache-memory` (a string such as "2GiB", or a number of bytes).
    pub kv_cache_memory: Option<SizeValue>,
    /// See `--kv-cache-dtype`.
    pub kv_cache_dtype: Option<String>,
    /// See `--dtype`.
    pub dtype: Option<String>,
    /// See `--quantization`.
    pub quantization: Option<String>,
    /// See `--tokenizer`.
    pub tokenizer: Option<PathBuf>,
    /// See `--device`.
    pub device: Option<String>,
    /// See `--gpu-memory-utilization`.
    pub gpu_memory_utilization: Option<f64>,
    /// See `--load-format`.
    pub load_format: Option<String>,
    /// See `--attention-kernels`.
    pub attention_kernels: Option<String>,
    /// See `--batch-invariant`.
    pub batch_invariant: Option<bool>,
    /// See `--speculative-config` (a table here).
    pub speculative_config: Option<SpeculativeSpec>,
    /// See `--threads`.
    pub threads: Option<usize>,
    /// See `--api-key`.
    pub api_key: Option<String>,
    /// See `--max-queue-size`.
    pub max_queue_size: Option<usize>,
    /// See `--shutdown-timeout`.
    pub shutdown_timeout: Option<u64>,
    /// See `--cors-allow-origin`.
    pub cors_allow_origin: Option<Vec<String>>,
    /// See `--log-format`.
    pub log_format: Option<String>,
    /// See `--allow-unknown-fields`.
    pub allow_unknown_fields: Option<bool>,
}

/// A size in the TOML file: a string with a unit or a plain number of bytes.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum SizeValue {
    /// Bytes.
    Bytes(u64),
    /// E.g. "2GiB".
    Text(String),
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The fully resolved server configuration.
#[derive(Clone, PartialEq)]
pub struct ServerConfig {
    /// Model directory; `None` serves the bundled demo model.
    pub model: Option<PathBuf>,
    /// Name clients put in `model`.
    pub served_model_name: String,
    /// Bind address.
    pub host: String,
    /// Bind port (0: any free port).
    pub port: u16,
    /// Context limit override.
    pub max_model_len: Option<usize>,
    /// Most running sequences.
    pub max_num_seqs: usize,
    /// Most tokens per step.
    pub max_num_batched_tokens: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV cache size.
    pub kv_cache: KvCacheSize,
    /// KV cache element type.
    pub kv_cache_dtype: KvCacheDtype,
    /// Dtype.
    pub dtype: DTypeSpec,
    /// In-situ weight quantization.
    pub quantization: Option<Quantization>,
    /// A tokenizer.json overriding the model's.
    pub tokenizer: Option<PathBuf>,
    /// Device.
    pub device: DeviceSpec,
    /// Fraction of the GPU's memory to use (sizes an automatic KV cache on a GPU).
    pub gpu_memory_utilization: f64,
    /// Checkpoint weights or random ones.
    pub load_format: LoadFormat,
    /// Attention implementation on a CUDA device.
    pub attention_kernels: AttentionKernels,
    /// Bitwise batch-invariant forward pass on the CPU.
    pub batch_invariant: bool,
    /// N-gram speculative decoding, when on.
    pub speculative: Option<NgramSpeculation>,
    /// CPU threads.
    pub threads: Option<usize>,
    /// API key for /v1/*.
    pub api_key: Option<String>,
    /// Most waiting requests.
    pub max_queue_size: usize,
    /// Drain time after SIGTERM.
    pub shutdown_timeout: Duration,
    /// CORS origins; empty disables CORS.
    pub cors_allow_origin: Vec<String>,
    /// Log format.
    pub log_format: LogFormat,
    /// Log and ignore unknown request fields instead of refusing them.
    pub allow_unknown_fields: bool,
    /// Connection and stream timings (no flags: defaults suit serving; embedders and tests set
    /// them).
    pub timeouts: Timeouts,
    /// Failures the engine injects, for tests of the failure paths; never set from flags, env
    /// vars or the config file.
    pub faults: FaultPlan,
}

/// How long the server waits on clients, and how often idle streams hear from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Longest wait for a client's request headers; the connection is closed after it.
    pub header_read: Duration,
    /// Longest wait for a request body; the request gets 408 after it.
    pub body_read: Duration,
    /// Interval of `: keep-alive` comments on a stream that has nothing else to send (a long
    /// prefill, a long queue), so proxies and clients do not time it out.
    pub sse_keep_alive: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            header_read: Duration::from_secs(30),
            body_read: Duration::from_secs(30),
            sse_keep_alive: Duration::from_secs(10),
        }
    }
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("model", &self.model)
            .field("served_model_name", &self.served_model_name)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("max_model_len", &self.max_model_len)
            .field("max_num_seqs", &self.max_num_seqs)
            .field("max_num_batched_tokens", &self.max_num_batched_tokens)
            .field("block_size", &self.block_size)
            .field("kv_cache", &self.kv_cache)
            .field("kv_cache_dtype", &self.kv_cache_dtype)
            .field("dtype", &self.dtype)
            .field("quantization", &self.quantization)
            .field("tokenizer", &self.tokenizer)
            .field("device", &self.device)
            .field("gpu_memory_utilization", &self.gpu_memory_utilization)
            .field("load_format", &self.load_format)
            .field("attention_kernels", &self.attention_kernels)
            .field("batch_invariant", &self.batch_invariant)
            .field("speculative", &self.speculative)
            .field("threads", &self.threads)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("max_queue_size", &self.max_queue_size)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("cors_allow_origin", &self.cors_allow_origin)
            .field("log_format", &self.log_format)
            .field("timeouts", &self.timeouts)
            .field("faults", &self.faults)
            .field("allow_unknown_fields", &self.allow_unknown_fields)
            .finish()
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self::resolve(Cli::default(), FileConfig::default())
            .expect("defaults are valid; this is a bug")
    }
}

/// Reads and parses a TOML config file (used by `--config` and by tests of `config/*.toml`).
pub fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_file(&text).map_err(|message| ConfigError::Parse {
        path: path.to_path_buf(),
        message,
    })
}

/// Parses TOML text into a [`FileConfig`]; the error names the offending key.
pub fn parse_file(text: &str) -> Result<FileConfig, String> {
    toml::from_str(text).map_err(|e| e.to_string().trim().to_string())
}

fn invalid(setting: &'static str) -> impl Fn(String) -> ConfigError {
    move |message| ConfigError::Invalid { setting, message }
}

fn positive(setting: &'static str, value: usize) -> Result<usize, ConfigError> {
    if value == 0 {
        return Err(invalid(setting)("must be at least 1".into()));
    }
    Ok(value)
}

impl ServerConfig {
    /// Parses the process arguments and environment, reads `--config`, and merges them.
    pub fn from_args() -> Result<Self, ConfigError> {
        Self::from_cli(Cli::parse())
    }

    /// Merges parsed flags with the `--config` file they name (if any).
    pub fn from_cli(cli: Cli) -> Result<Self, ConfigError> {
        let file = match &cli.config {
            Some(path) => load_file(path)?,
            None => FileConfig::default(),
        };
        Self::resolve(cli, file)
    }

    /// Flags/env (already merged by clap) override the file, which overrides the defaults.
    pub fn resolve(cli: Cli, file: FileConfig) -> Result<Self, ConfigError> {
        let model = cli.model.or(file.model);
        let served_model_name = cli
            .served_model_name
            .or(file.served_model_name)
            .or_else(|| {
                model.as_deref().and_then(|path| {
                    // A GGUF file is named by its stem, a directory by its name.
                    let name = if is_gguf(path) {
                        path.file_stem()
                    } else {
                        path.file_name()
                    };
                    name.map(|n| n.to_string_lossy().into_owned())
                })
            })
            .unwrap_or_else(|| DEMO_MODEL_NAME.to_string());
        if served_model_name.trim().is_empty() {
            return Err(invalid("--served-model-name")("must not be empty".into()));
        }
        let num_kv_blocks = cli.num_kv_blocks.or(file.num_kv_blocks);
        let kv_memory = match cli.kv_cache_memory {
            Some(text) => Some(parse_size(&text).map_err(invalid("--kv-cache-memory"))?),
            None => match file.kv_cache_memory {
                Some(SizeValue::Bytes(b)) => Some(b),
                Some(SizeValue::Text(t)) => {
                    Some(parse_size(&t).map_err(invalid("--kv-cache-memory"))?)
                }
                None => None,
            },
        };
        let kv_cache = match (num_kv_blocks, kv_memory) {
            (Some(_), Some(_)) => {
                return Err(invalid("--num-kv-blocks")(
                    "give either --num-kv-blocks or --kv-cache-memory, not both".into(),
                ));
            }
            (Some(blocks), None) => KvCacheSize::Blocks(positive("--num-kv-blocks", blocks)?),
            (None, Some(bytes)) => KvCacheSize::Bytes(bytes),
            (None, None) => EngineConfig::default().kv_cache,
        };
        let defaults = EngineConfig::default();
        let dtype = match cli.dtype.or(file.dtype) {
            Some(t) => parse_dtype(&t).map_err(invalid("--dtype"))?,
            None => DTypeSpec::Auto,
        };
        let quantization = match cli.quantization.or(file.quantization) {
            Some(t) => Some(Quantization::parse(&t).map_err(invalid("--quantization"))?),
            None => None,
        };
        let tokenizer = cli.tokenizer.or(file.tokenizer);
        let kv_cache_dtype = match cli.kv_cache_dtype.or(file.kv_cache_dtype) {
            Some(t) => parse_kv_cache_dtype(&t).map_err(invalid("--kv-cache-dtype"))?,
            None => defaults.kv_cache_dtype,
        };
        let device = match cli.device.or(file.device) {
            Some(t) => parse_device(&t).map_err(invalid("--device"))?,
            None => DeviceSpec::Cpu,
        };
        let gpu_memory_utilization = parse_fraction(
            cli.gpu_memory_utilization
                .or(file.gpu_memory_utilization)
                .unwrap_or(defaults.gpu_memory_utilization),
        )
        .map_err(invalid("--gpu-memory-utilization"))?;
        let load_format = match cli.load_format.or(file.load_format) {
            Some(t) => parse_load_format(&t).map_err(invalid("--load-format"))?,
            None => defaults.load_format,
        };
        let attention_kernels = match cli.attention_kernels.or(file.attention_kernels) {
            Some(t) => parse_attention_kernels(&t).map_err(invalid("--attention-kernels"))?,
            None => defaults.attention_kernels,
        };
        let log_format = match cli.log_format.or(file.log_format).as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(invalid("--log-format")(format!(
                    "unknown format {other:?} (expected text or json)"
                )));
            }
        };
        let cors_allow_origin = if cli.cors_allow_origin.is_empty() {
            file.cors_allow_origin.unwrap_or_default()
        } else {
            cli.cors_allow_origin
        };
        let max_model_len = cli.max_model_len.or(file.max_model_len);
        if let Some(len) = max_model_len {
            positive("--max-model-len", len)?;
        }
        let threads = cli.threads.or(file.threads);
        if let Some(t) = threads {
            positive("--threads", t)?;
        }
        let speculative_spec = match cli.speculative_config.as_deref().map(str::trim) {
            // Empty or null (e.g. an env var templated to nothing): off, as not giving it.
            Some("" | "null") => None,
            Some(json) => {
                Some(SpeculativeSpec::from_json(json).map_err(invalid("--speculative-config"))?)
            }
            None => file.speculative_config,
        };
        let speculative = speculative_spec
            .map(|spec| spec.resolve())
            .transpose()
            .map_err(invalid("--speculative-config"))?;
        Ok(Self {
            model,
            served_model_name,
            host: cli
                .host
                .or(file.host)
                .unwrap_or_else(|| DEFAULT_HOST.to_string()),
            port: cli.port.or(file.port).unwrap_or(DEFAULT_PORT),
            max_model_len,
            max_num_seqs: positive(
                "--max-num-seqs",
                cli.max_num_seqs
                    .or(file.max_num_seqs)
                    .unwrap_or(defaults.max_num_seqs),
            )?,
            max_num_batched_tokens: positive(
                "--max-num-batched-tokens",
                cli.max_num_batched_tokens
                    .or(file.max_num_batched_tokens)
                    .unwrap_or(defaults.max_num_batched_tokens),
            )?,
            block_size: positive(
                "--block-size",
                cli.block_size
                    .or(file.block_size)
                    .unwrap_or(defaults.block_size),
            )?,
            kv_cache,
            kv_cache_dtype,
            dtype,
            quantization,
            tokenizer,
            device,
            gpu_memory_utilization,
            load_format,
            attention_kernels,
            batch_invariant: cli
                .batch_invariant
                .or(file.batch_invariant)
                .unwrap_or(defaults.batch_invariant),
            speculative,
            threads,
            api_key: cli.api_key.or(file.api_key).filter(|k| !k.is_empty()),
            max_queue_size: cli
                .max_queue_size
                .or(file.max_queue_size)
                .unwrap_or(defaults.max_queue_size),
            shutdown_timeout: Duration::from_secs(
                cli.shutdown_timeout.or(file.shutdown_timeout).unwrap_or(30),
            ),
            cors_allow_origin,
            log_format,
            timeouts: Timeouts::default(),
            faults: FaultPlan::default(),
            // A bare flag can only turn it on: on when any layer says true.
            allow_unknown_fields: cli.allow_unknown_fields
                || file.allow_unknown_fields.unwrap_or(false),
        })
    }

    /// The engine settings these flags select.
    pub fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            model: match &self.model {
                Some(path) if is_gguf(path) => ModelSource::Gguf(path.clone()),
                Some(dir) => ModelSource::Dir(dir.clone()),
                None => ModelSource::Demo,
            },
            device: self.device,
            dtype: self.dtype,
            quantization: self.quantization,
            tokenizer: self.tokenizer.clone(),
            max_model_len: self.max_model_len,
            block_size: self.block_size,
            kv_cache: self.kv_cache,
            kv_cache_dtype: self.kv_cache_dtype,
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            max_queue_size: self.max_queue_size,
            threads: self.threads,
            enable_prefix_caching: EngineConfig::default().enable_prefix_caching,
            load_format: self.load_format,
            attention_kernels: self.attention_kernels,
            batch_invariant: self.batch_invariant,
            speculative: self.speculative,
            gpu_memory_utilization: self.gpu_memory_utilization,
            faults: self.faults,
        }
    }

    /// A loggable summary (the API key replaced by `<redacted>`).
    pub fn redacted(&self) -> String {
        format!("{self:?}")
    }
}

#[cfg(test)]
mod tests;
