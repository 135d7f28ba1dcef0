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
use mpt_engine::{DTypeSpec, DeviceSpec, EngineConfig, KvCacheSize, ModelSource};
use serde::Deserialize;

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

/// Command-line flags. Every one also reads `MPT_SERVER_<NAME>` and the TOML key `<name>`.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "mpt-server",
    version,
    about = "OpenAI-compatible HTTP server for MosaicML MPT models"
)]
pub struct Cli {
    /// Model directory (config.json, tokenizer.json, weights). Without it the bundled demo model is served.
    #[arg(
        long,
        env = "MPT_SERVER_MODEL",
        value_name = "DIR",
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
        conflicts_with = "kv_cache_memory"
    )]
    pub num_kv_blocks: Option<usize>,
    /// KV cache size in bytes, e.g. "2GiB", "512MiB", "1000000" [default: 1GiB].
    #[arg(
        long,
        env = "MPT_SERVER_KV_CACHE_MEMORY",
        value_name = "SIZE",
        hide_env_values = true
    )]
    pub kv_cache_memory: Option<String>,
    /// Weight/activation dtype: auto (f32 on CPU, bf16 on GPU), f32, f16 or bf16 [default: auto].
    #[arg(long, env = "MPT_SERVER_DTYPE", hide_env_values = true)]
    pub dtype: Option<String>,
    /// Compute device: cpu or cuda:N [default: cpu].
    #[arg(long, env = "MPT_SERVER_DEVICE", hide_env_values = true)]
    pub device: Option<String>,
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
    /// Most requests waiting for a slot before new ones get 429 [default: 256].
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
        value_delimiter = ','
    )]
    pub cors_allow_origin: Vec<String>,
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
    /// See `--dtype`.
    pub dtype: Option<String>,
    /// See `--device`.
    pub device: Option<String>,
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
    /// Dtype.
    pub dtype: DTypeSpec,
    /// Device.
    pub device: DeviceSpec,
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
            .field("dtype", &self.dtype)
            .field("device", &self.device)
            .field("threads", &self.threads)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("max_queue_size", &self.max_queue_size)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("cors_allow_origin", &self.cors_allow_origin)
            .field("log_format", &self.log_format)
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

/// Parses "2GiB", "512MiB", "1.5GB", "4096" (bytes) and the like.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number.parse().map_err(|_| {
        format!("{text:?} is not a size (expected e.g. \"2GiB\", \"512MiB\" or a number of bytes)")
    })?;
    let multiplier: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "ki" | "kib" => 1024.0,
        "mi" | "mib" => 1024.0 * 1024.0,
        "gi" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "ti" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {text:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            ));
        }
    };
    let bytes = value * multiplier;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("size {text:?} is out of range"));
    }
    Ok(bytes as u64)
}

fn parse_dtype(text: &str) -> Result<DTypeSpec, String> {
    match text.to_ascii_lowercase().as_str() {
        "auto" => Ok(DTypeSpec::Auto),
        "f32" | "float32" | "float" => Ok(DTypeSpec::F32),
        "f16" | "float16" | "half" => Ok(DTypeSpec::F16),
        "bf16" | "bfloat16" => Ok(DTypeSpec::Bf16),
        other => Err(format!(
            "unknown dtype {other:?} (expected auto, f32, f16 or bf16)"
        )),
    }
}

fn parse_device(text: &str) -> Result<DeviceSpec, String> {
    let t = text.to_ascii_lowercase();
    if t == "cpu" {
        return Ok(DeviceSpec::Cpu);
    }
    if t == "cuda" {
        return Ok(DeviceSpec::Cuda(0));
    }
    if let Some(ordinal) = t.strip_prefix("cuda:") {
        return ordinal
            .parse()
            .map(DeviceSpec::Cuda)
            .map_err(|_| format!("bad CUDA ordinal in {text:?} (expected cuda:N)"));
    }
    Err(format!("unknown device {text:?} (expected cpu or cuda:N)"))
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
                model
                    .as_deref()
                    .and_then(|dir| dir.file_name())
                    .map(|n| n.to_string_lossy().into_owned())
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
        let device = match cli.device.or(file.device) {
            Some(t) => parse_device(&t).map_err(invalid("--device"))?,
            None => DeviceSpec::Cpu,
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
            dtype,
            device,
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
        })
    }

    /// The engine settings these flags select.
    pub fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            model: match &self.model {
                Some(dir) => ModelSource::Dir(dir.clone()),
                None => ModelSource::Demo,
            },
            device: self.device,
            dtype: self.dtype,
            max_model_len: self.max_model_len,
            block_size: self.block_size,
            kv_cache: self.kv_cache,
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            max_queue_size: self.max_queue_size,
            threads: self.threads,
            enable_prefix_caching: EngineConfig::default().enable_prefix_caching,
        }
    }

    /// A loggable summary (the API key replaced by `<redacted>`).
    pub fn redacted(&self) -> String {
        format!("{self:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1.5GB"), Ok(1_500_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("2XB").is_err());
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn command_line_overrides_file_which_overrides_defaults() {
        let file = parse_file("port = 9000\nmax_num_seqs = 8\nkv_cache_memory = \"64MiB\"\n")
            .expect("valid");
        let cli = Cli::try_parse_from(["mpt-server", "--port", "9100"]).expect("valid");
        let c = ServerConfig::resolve(cli, file).expect("valid");
        assert_eq!(c.port, 9100);
        assert_eq!(c.max_num_seqs, 8);
        assert_eq!(c.kv_cache, KvCacheSize::Bytes(64 << 20));
        assert_eq!(c.served_model_name, DEMO_MODEL_NAME);
        assert_eq!(c.engine_config().model, ModelSource::Demo);
    }

    #[test]
    fn unknown_toml_key_is_named() {
        let err = parse_file("prot = 1\n").expect_err("unknown key");
        assert!(err.contains("prot"), "{err}");
    }

    #[test]
    fn api_key_is_redacted() {
        let cli = Cli::try_parse_from(["mpt-server", "--api-key", "sekrit-123"]).expect("valid");
        let c = ServerConfig::resolve(cli, FileConfig::default()).expect("valid");
        assert!(!c.redacted().contains("sekrit"));
        assert_eq!(c.api_key.as_deref(), Some("sekrit-123"));
    }

    #[test]
    fn blocks_and_memory_conflict() {
        let file = parse_file("num_kv_blocks = 10\nkv_cache_memory = 100000\n").expect("valid");
        assert!(ServerConfig::resolve(Cli::default(), file).is_err());
        assert!(
            Cli::try_parse_from(["x", "--num-kv-blocks", "4", "--kv-cache-memory", "1MiB"])
                .is_err()
        );
    }

    #[test]
    fn model_dir_names_the_model() {
        let cli = Cli::try_parse_from([
            "x",
            "--model",
            "/models/mpt-7b-instruct",
            "--device",
            "cuda:1",
        ])
        .expect("valid");
        let c = ServerConfig::resolve(cli, FileConfig::default()).expect("valid");
        assert_eq!(c.served_model_name, "mpt-7b-instruct");
        assert_eq!(c.device, DeviceSpec::Cuda(1));
    }
}
