//! Configs in two layers: serde structs with the Hub's own field names, read from `config.json`, and
//! `validate()` methods that reject absurd values before anything is allocated. Derived values are methods.

mod flux;
mod flux2;
mod scheduler;
mod text;
mod transformer;
mod vae;

pub use flux::{ChromaTransformerConfig, FluxTransformerConfig};
pub use flux2::Flux2TransformerConfig;
pub use scheduler::SchedulerConfig;
pub use text::{ClipTextConfig, Mistral3Config, Qwen3Config, T5Config};
pub use transformer::Sd3TransformerConfig;
pub use vae::VaeConfig;

use crate::error::{Error, Result};
use serde::de::DeserializeOwned;
use std::path::Path;

/// Upper bound on any layer count, width or channel count read from a config: far above every real model,
/// far below what would make an allocation absurd.
pub(crate) const MAX_DIM: usize = 1 << 16;
pub(crate) const MAX_LAYERS: usize = 512;

/// Serde default of a `usize` field: `#[serde(default = "n::<16>")]`.
pub(crate) fn n<const N: usize>() -> usize {
    N
}

/// Checks that each named field of a config is a plausible dimension (1..=`MAX_DIM`), naming it
/// in the error: `check_dims!(path, self, vocab_size, hidden_size)`.
macro_rules! check_dims {
    ($path:expr, $cfg:expr, $($field:ident),+ $(,)?) => {
        $( $crate::config::check_dim($path, stringify!($field), $cfg.$field)?; )+
    };
}
pub(crate) use check_dims;

/// Reads and parses a JSON config file, naming the file in every error.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::MissingFile(format!(
                "{} is missing; the model folder is incomplete, download it again",
                path.display()
            ))
        } else {
            Error::io(path, e)
        }
    })?;
    serde_json::from_str(&text).map_err(|e| Error::config(path, e.to_string()))
}

/// `model_index.json`: which components a diffusers pipeline folder has. Each component is a
/// `[library, class]` pair, or `[null, null]` when the pipeline was saved without it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ModelIndex {
    #[serde(rename = "_class_name")]
    pub class_name: String,
    #[serde(flatten)]
    pub components: std::collections::BTreeMap<String, serde_json::Value>,
}

impl ModelIndex {
    /// True when the component is present (not absent, not `[null, null]`).
    pub fn has(&self, name: &str) -> bool {
        match self.components.get(name) {
            Some(serde_json::Value::Array(v)) => v.iter().any(|x| !x.is_null()),
            Some(serde_json::Value::Null) | None => false,
            Some(_) => true,
        }
    }
}

/// A config that can check itself; `path` names the file in errors.
pub trait Validate {
    fn validate(&self, path: &Path) -> Result<()>;
}

macro_rules! impl_validate {
    ($($t:ty),*) => {$(
        impl Validate for $t {
            fn validate(&self, path: &Path) -> Result<()> {
                <$t>::validate(self, path)
            }
        }
    )*};
}
impl_validate!(
    Sd3TransformerConfig,
    FluxTransformerConfig,
    ChromaTransformerConfig,
    Flux2TransformerConfig,
    VaeConfig,
    SchedulerConfig,
    ClipTextConfig,
    T5Config,
    Qwen3Config,
    Mistral3Config
);

pub(crate) fn check(path: &Path, ok: bool, msg: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::config(path, msg()))
    }
}

pub(crate) fn check_dim(path: &Path, name: &str, v: usize) -> Result<()> {
    check(path, v > 0 && v <= MAX_DIM, || {
        format!("`{name}` is {v}, expected 1..={MAX_DIM}")
    })
}

/// A layer count `name` (`num_layers`, `num_hidden_layers`): 1..=[`MAX_LAYERS`].
pub(crate) fn check_layers(path: &Path, name: &str, n: usize) -> Result<()> {
    check(path, (1..=MAX_LAYERS).contains(&n), || {
        format!("`{name}` is {n}, expected 1..={MAX_LAYERS}")
    })
}

/// A FLUX-shaped transformer's block counts: each within [`MAX_LAYERS`], at least one block.
pub(crate) fn check_blocks(path: &Path, double: usize, single: usize) -> Result<()> {
    check(
        path,
        double <= MAX_LAYERS && single <= MAX_LAYERS && double + single > 0,
        || {
            format!("{double} double and {single} single blocks: expected 0..={MAX_LAYERS} each, at least one block")
        },
    )
}

/// RoPE axes: even sizes summing to the head dim.
pub(crate) fn check_rope_axes(path: &Path, axes: &[usize], head_dim: usize) -> Result<()> {
    // saturating: absurd axis sizes must fail the check, not overflow
    let sum = axes.iter().fold(0usize, |a, &d| a.saturating_add(d));
    check(
        path,
        sum == head_dim && axes.iter().all(|d| d % 2 == 0) && !axes.is_empty(),
        || {
            format!(
                "`axes_dims_rope` {axes:?} must be even and sum to attention_head_dim {head_dim}"
            )
        },
    )
}
