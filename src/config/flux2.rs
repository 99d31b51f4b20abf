use super::{check, check_blocks, check_dim, check_dims, check_rope_axes, n};
use crate::error::Result;
use std::path::Path;

/// `transformer/config.json` of a `Flux2Transformer2DModel` (FLUX.2 [klein] and [dev]; field names
/// and defaults as diffusers).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Flux2TransformerConfig {
    #[serde(default = "n::<1>")]
    pub patch_size: usize,
    /// Packed latent channels in (32 latent channels x 2 x 2).
    #[serde(default = "n::<128>")]
    pub in_channels: usize,
    #[serde(default)]
    pub out_channels: Option<usize>,
    /// Double-stream blocks.
    #[serde(default = "n::<8>")]
    pub num_layers: usize,
    /// Single-stream (parallel) blocks.
    #[serde(default = "n::<48>")]
    pub num_single_layers: usize,
    #[serde(default = "n::<128>")]
    pub attention_head_dim: usize,
    #[serde(default = "n::<48>")]
    pub num_attention_heads: usize,
    /// Width of the text encoder's stacked hidden states.
    #[serde(default = "n::<15360>")]
    pub joint_attention_dim: usize,
    #[serde(default = "n::<256>")]
    pub timestep_guidance_channels: usize,
    /// Feed-forward inner width over the model width (SwiGLU).
    #[serde(default = "mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default = "axes")]
    pub axes_dims_rope: Vec<usize>,
    #[serde(default = "theta")]
    pub rope_theta: f64,
    #[serde(default = "eps")]
    pub eps: f64,
    /// [dev] embeds the guidance scale; [klein] does not.
    #[serde(default = "yes")]
    pub guidance_embeds: bool,
}

fn mlp_ratio() -> f64 {
    3.0
}

fn axes() -> Vec<usize> {
    vec![32, 32, 32, 32]
}

fn theta() -> f64 {
    2000.0
}

fn eps() -> f64 {
    1e-6
}

fn yes() -> bool {
    true
}

impl Flux2TransformerConfig {
    pub fn hidden_size(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// The feed-forward's inner width, as diffusers rounds it.
    pub fn mlp_hidden(&self) -> usize {
        (self.hidden_size() as f64 * self.mlp_ratio) as usize
    }

    pub fn validate(&self, path: &Path) -> Result<()> {
        check_dims!(
            path,
            self,
            in_channels,
            attention_head_dim,
            num_attention_heads,
            joint_attention_dim,
            timestep_guidance_channels
        );
        check_dim(path, "out_channels", self.out_channels())?;
        check_dim(path, "hidden size (heads x head dim)", self.hidden_size())?;
        check(path, self.patch_size == 1, || {
            format!(
                "`patch_size` is {}; FLUX.2 packs 2x2 itself and needs 1",
                self.patch_size
            )
        })?;
        check(
            path,
            self.mlp_ratio.is_finite() && self.mlp_ratio > 0.0 && self.mlp_ratio <= 16.0,
            || format!("`mlp_ratio` is {}, expected (0, 16]", self.mlp_ratio),
        )?;
        check_dim(
            path,
            "MLP width (hidden size x mlp_ratio)",
            self.mlp_hidden(),
        )?;
        check(path, self.eps == 1e-6, || {
            format!("`eps` is {}; every FLUX.2 model uses 1e-6", self.eps)
        })?;
        check(
            path,
            self.rope_theta.is_finite() && self.rope_theta > 1.0,
            || format!("`rope_theta` is {}, expected above 1", self.rope_theta),
        )?;
        check_blocks(path, self.num_layers, self.num_single_layers)?;
        check_rope_axes(path, &self.axes_dims_rope, self.attention_head_dim)
    }
}
