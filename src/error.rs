//! The library's error type. Every variant says what went wrong and what to do next, so the CLI can
//! print one line and exit non-zero.
//!
//! Errors about what the caller asked for name the parameter as a [`Param`], not as text: the library
//! prints the [`Request`](crate::Request) field's name (`max_sequence_length 600: ...`), the CLI
//! prints its flag (`--max-sequence-length 600: ...`), from the same [`Message`].

use std::path::PathBuf;

/// A parameter a caller sets: a [`Request`](crate::Request) field, or where the model, device and
/// output come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    Model,
    Components,
    Revision,
    Prompt,
    NegativePrompt,
    Steps,
    Guidance,
    TrueCfg,
    Width,
    Height,
    Seed,
    Noise,
    Image,
    Mask,
    Strength,
    EncodeNoise,
    Sampler,
    Cache,
    MaxSequenceLength,
    Device,
    Dtype,
    Output,
    Overwrite,
    Lora,
    Quantize,
    T5,
}

impl Param {
    /// The library's name: the `Request` field (or the argument) it is.
    pub fn name(self) -> &'static str {
        match self {
            Param::Model => "model",
            Param::Components => "components",
            Param::Revision => "revision",
            Param::Prompt => "prompt",
            Param::NegativePrompt => "negative_prompt",
            Param::Steps => "steps",
            Param::Guidance => "guidance",
            Param::TrueCfg => "true_cfg",
            Param::Width => "width",
            Param::Height => "height",
            Param::Seed => "seed",
            Param::Noise => "noise",
            Param::Image => "image",
            Param::Mask => "mask",
            Param::Strength => "strength",
            Param::EncodeNoise => "encode_noise",
            Param::Sampler => "sampler",
            Param::Cache => "cache",
            Param::MaxSequenceLength => "max_sequence_length",
            Param::Device => "device",
            Param::Dtype => "dtype",
            Param::Output => "output",
            Param::Overwrite => "overwrite",
            Param::Lora => "loras",
            Param::Quantize => "quantize",
            Param::T5 => "t5",
        }
    }
}

/// Text that names parameters, kept apart from the words around them so that each reader names them
/// in its own terms ([`Message::render`]); `Display` uses the library's names.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Message(Vec<Piece>);

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    Param(Param),
}

impl Message {
    /// A message that starts with a parameter's name.
    pub fn about(p: Param) -> Self {
        Self(vec![Piece::Param(p)])
    }

    /// Appends words.
    pub fn text(mut self, s: impl Into<String>) -> Self {
        self.0.push(Piece::Text(s.into()));
        self
    }

    /// Appends a parameter's name.
    pub fn param(mut self, p: Param) -> Self {
        self.0.push(Piece::Param(p));
        self
    }

    /// The first parameter the message names (the one it is about).
    pub fn first_param(&self) -> Option<Param> {
        self.0.iter().find_map(|p| match p {
            Piece::Param(p) => Some(*p),
            Piece::Text(_) => None,
        })
    }

    /// The message with each parameter named by `name`.
    pub fn render(&self, name: &dyn Fn(Param) -> String) -> String {
        self.0
            .iter()
            .map(|p| match p {
                Piece::Text(t) => t.clone(),
                Piece::Param(p) => name(*p),
            })
            .collect()
    }
}

impl From<&str> for Message {
    fn from(s: &str) -> Self {
        Self(vec![Piece::Text(s.into())])
    }
}

impl From<String> for Message {
    fn from(s: String) -> Self {
        Self(vec![Piece::Text(s)])
    }
}

impl std::fmt::Display for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.render(&|p| p.name().to_string()))
    }
}

/// Everything the library can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request parameter is out of range; the message names the parameter and the valid values.
    #[error("{0}")]
    InvalidRequest(Message),

    /// A config file is missing fields, has wrong types or absurd values.
    #[error("invalid config {path}: {msg}; the model files are damaged or not an SD3, FLUX.1, Chroma or FLUX.2 model, re-download them")]
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

    /// A LoRA file that cannot be read, or does not fit the model; the message says why and what to do.
    #[error("LoRA {path}: {msg}")]
    Lora { path: PathBuf, msg: String },

    /// A non-finite value appeared while sampling.
    #[error("{}", non_finite(what, *step, dtype, &|p| p.name().to_string()))]
    NonFinite {
        what: &'static str,
        step: usize,
        dtype: String,
    },

    /// The requested device is not available.
    #[error("{0}")]
    Device(Message),

    /// An I/O error on a named path.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// An error from the tensor library (a bug or an out-of-memory, not bad input).
    #[error("tensor computation failed: {0}")]
    Candle(candle_core::Error),

    /// The user interrupted the run (Ctrl-C).
    #[error("interrupted; no image was written")]
    Interrupted,

    /// Image encoding failed.
    #[error("image encoding failed: {0}")]
    Image(String),
}

fn non_finite(what: &str, step: usize, dtype: &str, name: &dyn Fn(Param) -> String) -> String {
    let d = name(Param::Dtype);
    format!("non-finite value in the {what} at step {step}: the model overflowed in {dtype}; run again with {d} bf16 or {d} f32")
}

/// The library's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl From<candle_core::Error> for Error {
    /// A tensor that a model asks for and the weights lack is named; everything else from candle is
    /// a computation failure. (Shapes are checked against the file headers before any weight is read,
    /// see `pipeline`; this is the fallback for tensors read outside that check.)
    fn from(e: candle_core::Error) -> Self {
        fn inner(e: &candle_core::Error) -> &candle_core::Error {
            match e {
                candle_core::Error::WithBacktrace { inner: i, .. }
                | candle_core::Error::WithPath { inner: i, .. }
                | candle_core::Error::Context { inner: i, .. } => inner(i),
                e => e,
            }
        }
        match inner(&e) {
            candle_core::Error::CannotFindTensor { path } => Error::Tensor {
                name: path.clone(),
                msg: "missing from the weight files".into(),
            },
            _ => Error::Candle(e),
        }
    }
}

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

    /// A request error whose message names no parameter.
    pub fn request(msg: impl Into<Message>) -> Self {
        Error::InvalidRequest(msg.into())
    }

    /// A request error about `p`: `"<p> <rest>"`.
    pub fn invalid(p: Param, rest: impl Into<String>) -> Self {
        Error::InvalidRequest(Message::about(p).text(rest))
    }

    /// The error's text with each parameter named by `name` (the CLI passes its flags).
    pub fn render(&self, name: &dyn Fn(Param) -> String) -> String {
        match self {
            Error::InvalidRequest(m) | Error::Device(m) => m.render(name),
            Error::NonFinite { what, step, dtype } => non_finite(what, *step, dtype, name),
            e => e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_parameters_in_the_readers_terms() {
        let e = Error::InvalidRequest(
            Message::about(Param::MaxSequenceLength)
                .text(" 600: too long; lower it or raise ")
                .param(Param::Steps),
        );
        assert_eq!(
            e.to_string(),
            "max_sequence_length 600: too long; lower it or raise steps"
        );
        let flag = |p: Param| format!("--{}", p.name().replace('_', "-"));
        assert_eq!(
            e.render(&flag),
            "--max-sequence-length 600: too long; lower it or raise --steps"
        );
        let nf = Error::NonFinite {
            what: "velocity",
            step: 3,
            dtype: "f16".into(),
        };
        assert!(nf
            .to_string()
            .ends_with("run again with dtype bf16 or dtype f32"));
        assert!(nf.render(&flag).ends_with("--dtype bf16 or --dtype f32"));
    }

    #[test]
    fn candle_errors_are_mapped_by_variant() {
        let missing = candle_core::Error::CannotFindTensor {
            path: "a.weight".into(),
        }
        .bt()
        .context("loading");
        match Error::from(missing) {
            Error::Tensor { name, .. } => assert_eq!(name, "a.weight"),
            e => panic!("{e}"),
        }
        assert!(matches!(
            Error::from(candle_core::Error::Msg("x".into())),
            Error::Candle(_)
        ));
    }
}
