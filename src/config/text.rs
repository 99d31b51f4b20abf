use super::{check, check_dim, check_dims, check_layers, n};
use crate::error::Result;
use std::path::Path;

/// `text_encoder*/config.json` of a transformers CLIP text model.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    /// Width of `text_projection` (absent on models without one).
    #[serde(default)]
    pub projection_dim: Option<usize>,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "n::<77>")]
    pub max_position_embeddings: usize,
    /// `"quick_gelu"` (CLIP-L), `"gelu"` (CLIP-G) or `"gelu_new"`.
    #[serde(default = "dact")]
    pub hidden_act: String,
    #[serde(default = "deps")]
    pub layer_norm_eps: f64,
    /// transformers picks the pooled token by argmax of the ids when this is 2 (legacy configs),
    /// otherwise at the first occurrence of this id.
    #[serde(default = "d2")]
    pub eos_token_id: u32,
}

fn d2() -> u32 {
    2
}
fn dact() -> String {
    "quick_gelu".into()
}
fn deps() -> f64 {
    1e-5
}

impl ClipTextConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    pub fn validate(&self, path: &Path) -> Result<()> {
        check_dims!(
            path,
            self,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_attention_heads,
            max_position_embeddings
        );
        if let Some(p) = self.projection_dim {
            check_dim(path, "projection_dim", p)?;
        }
        check_layers(path, "num_hidden_layers", self.num_hidden_layers)?;
        check(
            path,
            self.hidden_size.is_multiple_of(self.num_attention_heads),
            || {
                format!(
                    "`num_attention_heads` ({}) does not divide `hidden_size` ({})",
                    self.num_attention_heads, self.hidden_size
                )
            },
        )?;
        check(
            path,
            matches!(self.hidden_act.as_str(), "quick_gelu" | "gelu" | "gelu_new"),
            || {
                format!(
                    "`hidden_act` {:?} is not supported (quick_gelu, gelu, gelu_new)",
                    self.hidden_act
                )
            },
        )
    }
}

/// `text_encoder_3/config.json` of a transformers T5 encoder: only the fields we check; the full
/// file is handed to candle-transformers' T5.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct T5Config {
    /// transformers' `model_type`: told apart first, so that another model's config (a CLIP in
    /// the T5's folder) is named as such rather than by a missing field.
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default)]
    pub vocab_size: usize,
    #[serde(default)]
    pub d_model: usize,
    #[serde(default)]
    pub d_kv: usize,
    #[serde(default)]
    pub d_ff: usize,
    #[serde(default)]
    pub num_layers: usize,
    #[serde(default)]
    pub num_heads: usize,
    #[serde(default = "n::<32>")]
    pub relative_attention_num_buckets: usize,
}

impl T5Config {
    pub fn validate(&self, path: &Path) -> Result<()> {
        if let Some(t) = self.model_type.as_deref() {
            check(path, matches!(t, "t5" | "umt5" | "mt5"), || {
                format!("is a `{t}` model where the T5 encoder belongs (transformers' T5EncoderModel); this folder holds another model's text encoder")
            })?;
        }
        check_dims!(
            path,
            self,
            vocab_size,
            d_model,
            d_kv,
            d_ff,
            num_heads,
            relative_attention_num_buckets
        );
        check_layers(path, "num_layers", self.num_layers)
    }
}

/// `text_encoder/config.json` of a transformers `Qwen3ForCausalLM` (FLUX.2 [klein]'s text
/// encoder): the fields its layers need.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Qwen3Config {
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default)]
    pub vocab_size: usize,
    #[serde(default)]
    pub hidden_size: usize,
    #[serde(default)]
    pub intermediate_size: usize,
    #[serde(default)]
    pub num_hidden_layers: usize,
    #[serde(default)]
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: usize,
    /// Absent: hidden_size / num_attention_heads.
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "qwen_eps")]
    pub rms_norm_eps: f64,
    /// transformers 4 writes `rope_theta`, transformers 5 `rope_parameters.rope_theta`.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "qwen_act")]
    pub hidden_act: String,
}

/// transformers' `Mistral3ForConditionalGeneration` config (FLUX.2 [dev]'s text encoder, Mistral
/// Small 3.1): its language model's fields are `text_config` (the same fields as Qwen3's, without
/// the per-head q/k norms); the vision tower is never run.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Mistral3Config {
    #[serde(default)]
    pub model_type: Option<String>,
    /// Always present once validated.
    #[serde(default)]
    pub text_config: Option<Qwen3Config>,
}

impl Mistral3Config {
    /// The language model's config (checked present by [`Self::validate`]).
    pub fn text(&self) -> &Qwen3Config {
        self.text_config
            .as_ref()
            .expect("validated Mistral 3 configs have a text_config")
    }

    pub fn validate(&self, path: &Path) -> Result<()> {
        let Some(text) = &self.text_config else {
            let t = self.model_type.as_deref().unwrap_or("?");
            return Err(crate::error::Error::InvalidConfig {
                path: path.to_path_buf(),
                msg: format!("is a `{t}` model where the Mistral 3 text encoder belongs (transformers' Mistral3ForConditionalGeneration, with a `text_config`); this folder holds another model's text encoder"),
            });
        };
        let types = (self.model_type.as_deref(), text.model_type.as_deref());
        check(
            path,
            matches!(types, (None | Some("mistral3"), None | Some("mistral"))),
            || {
                format!("is a `{}` model where the Mistral 3 text encoder belongs (transformers' Mistral3ForConditionalGeneration); this folder holds another model's text encoder", types.0.or(types.1).unwrap_or("?"))
            },
        )?;
        text.check_decoder(path)
    }
}

/// transformers 5's `rope_parameters`.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct RopeParameters {
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_type: Option<String>,
}

fn qwen_eps() -> f64 {
    1e-6
}

fn qwen_act() -> String {
    "silu".into()
}

impl Qwen3Config {
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The RoPE base (transformers' default 10000 when the config gives none).
    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|r| r.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10000.0)
    }

    pub fn validate(&self, path: &Path) -> Result<()> {
        if let Some(t) = self.model_type.as_deref() {
            check(path, t == "qwen3", || {
                format!("is a `{t}` model where the Qwen3 text encoder belongs (transformers' Qwen3ForCausalLM); this folder holds another model's text encoder")
            })?;
        }
        self.check_decoder(path)
    }

    /// The decoder's shapes and choices (Qwen3's, or a Mistral `text_config`'s).
    pub fn check_decoder(&self, path: &Path) -> Result<()> {
        check_dims!(
            path,
            self,
            hidden_size,
            intermediate_size,
            num_attention_heads,
            num_key_value_heads
        );
        check_dim(path, "head_dim", self.head_dim())?;
        // Language models' vocabularies are far larger than any width (Qwen's 151936).
        check(path, (1..=1 << 20).contains(&self.vocab_size), || {
            format!(
                "`vocab_size` is {}, expected 1..={}",
                self.vocab_size,
                1 << 20
            )
        })?;
        check_layers(path, "num_hidden_layers", self.num_hidden_layers)?;
        check(
            path,
            self.num_attention_heads
                .is_multiple_of(self.num_key_value_heads),
            || {
                format!(
                    "`num_key_value_heads` ({}) does not divide `num_attention_heads` ({})",
                    self.num_key_value_heads, self.num_attention_heads
                )
            },
        )?;
        check(path, self.head_dim().is_multiple_of(2), || {
            format!("`head_dim` {} is odd; RoPE needs pairs", self.head_dim())
        })?;
        let rope_type = self
            .rope_parameters
            .as_ref()
            .and_then(|r| r.rope_type.as_deref());
        check(path, matches!(rope_type, None | Some("default")), || {
            format!("RoPE type {rope_type:?} is not supported (default only)")
        })?;
        check(path, self.hidden_act == "silu", || {
            format!("`hidden_act` {:?} is not supported (silu)", self.hidden_act)
        })?;
        check(
            path,
            self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0,
            || format!("`rms_norm_eps` is {}, expected above 0", self.rms_norm_eps),
        )?;
        let theta = self.rope_theta();
        check(path, theta.is_finite() && theta > 1.0, || {
            format!("`rope_theta` is {theta}, expected above 1")
        })
    }
}
