//! The library's error type. Every variant says what went wrong and what to do next, so the CLI can
//! print one line and exit non-zero.

use std::path::PathBuf;

/// Everything the library can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request parameter is out of range; the message names the parameter and the valid values.
    #[error("{0}")]
    InvalidRequest(String),

    /// A config file is missing fields, has wrong types or absurd values.
    #[error("invalid config {path}: {msg}; the model files are damaged or not an SD3/Flux model, re-download them")]
    InvalidConfig { path: PathBuf, msg: String },

    /// A model folder or file is missing a part.
    #[error("{0}")]
    MissingFile(String),

    /// A weight file cannot be read or is malformed.
    #[error("bad weight file {path}: {msg}; delete it and download it again")]
    BadWeights { path: PathBuf, msg: String },

    /// A tensor is missing or has the wrong shape for the config.
    #[error("tensor `{name}`: {msg}; the weights do not match the config, check that the model files belong together")]
    Tensor { name: String, msg: String },

    /// Tokenizer files could not be loaded or used.
    #[error("tokenizer {path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },

    /// A Hugging Face Hub download failed.
    #[error("{0}")]
    Hub(String),

    /// A non-finite value appeared while sampling.
    #[error("non-finite value in the {what} at step {step}: the model overflowed in {dtype}; run again with `--dtype bf16` or `--dtype f32`")]
    NonFinite {
        what: &'static str,
        step: usize,
        dtype: String,
    },

    /// The requested device is not available.
    #[error("{0}")]
    Device(String),

    /// An I/O error on a named path.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// An error from the tensor library (a bug or an out-of-memory, not bad input).
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),

    /// The user interrupted the run (Ctrl-C).
    #[error("interrupted; no image was written")]
    Interrupted,

    /// Image encoding failed.
    #[error("image encoding failed: {0}")]
    Image(String),
}

/// The library's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn config(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::InvalidConfig {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn request(msg: impl Into<String>) -> Self {
        Error::InvalidRequest(msg.into())
    }
}
