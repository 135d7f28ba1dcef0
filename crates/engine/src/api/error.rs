//! Engine errors. One enum for everything that can go wrong while loading or running a model;
//! the server maps these to HTTP once, in its own `error.rs`.

use std::path::PathBuf;

/// Everything the engine can fail with.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// `config.json` is missing, malformed, or asks for something we do not support.
    #[error("invalid model config ({field}): {message}")]
    Config {
        /// The offending config field, e.g. `attn_config.prefix_lm`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// A weight file could not be read or parsed.
    #[error("cannot read weights from {file}: {message}")]
    WeightFile {
        /// The file that failed.
        file: PathBuf,
        /// Why it failed.
        message: String,
    },
    /// A tensor the model needs is absent from the checkpoint.
    #[error("tensor `{tensor}` is missing from the checkpoint ({file})")]
    MissingTensor {
        /// Checkpoint tensor name.
        tensor: String,
        /// Where we looked for it (a file or the index).
        file: PathBuf,
    },
    /// A tensor exists but has the wrong shape.
    #[error("tensor `{tensor}` in {file} has shape {actual:?}, expected {expected:?}")]
    TensorShape {
        /// Checkpoint tensor name.
        tensor: String,
        /// The file it came from.
        file: PathBuf,
        /// Shape found in the file.
        actual: Vec<usize>,
        /// Shape the config implies.
        expected: Vec<usize>,
    },
    /// The tokenizer could not be loaded or failed on input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The engine settings are inconsistent (e.g. a KV cache too small for one sequence).
    #[error("invalid engine setting ({setting}): {message}")]
    Setting {
        /// The setting, named as on the command line (e.g. `block_size`).
        setting: String,
        /// What is wrong with it.
        message: String,
    },
    /// A tensor operation failed; this is an internal fault.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// Filesystem error outside of weight parsing.
    #[error("i/o error on {path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The engine thread is gone (it panicked or was shut down).
    #[error("the engine thread has stopped")]
    EngineStopped,
}

impl EngineError {
    /// Shorthand for a [`EngineError::Config`] error.
    pub fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Config {
            field: field.into(),
            message: message.into(),
        }
    }

    /// Shorthand for a [`EngineError::Setting`] error.
    pub fn setting(setting: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Setting {
            setting: setting.into(),
            message: message.into(),
        }
    }
}

/// Engine result type.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
