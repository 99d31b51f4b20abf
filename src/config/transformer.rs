use super::{check, check_dim, check_dims, check_layers, n};
use crate::error::Result;
use std::path::Path;

/// `transformer/config.json` of an `SD3Transformer2DModel` (field names and defaults as diffusers).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Sd3TransformerConfig {
    /// Nominal latent size the model was trained at (informational).
    #[serde(default = "n::<128>")]
    pub sample_size: usize,
    /// Side of the square patches the latents are cut into.
    #[serde(default = "n::<2>")]
    pub patch_size: usize,
    /// Latent channels in.
    #[serde(default = "n::<16>")]
    pub in_channels: usize,
    /// Number of joint (MMDiT) blocks; the last one is `context_pre_only`.
    #[serde(default = "n::<18>")]
    pub num_layers: usize,
    #[serde(default = "n::<64>")]
    pub attention_head_dim: usize,
    #[serde(default = "n::<18>")]
    pub num_attention_heads: usize,
    /// Width of the text sequence fed to `context_embedder`.
    #[serde(default = "n::<4096>")]
    pub joint_attention_dim: usize,
    /// Width of the context stream (equals the hidden size in every released model).
    #[serde(default = "n::<1152>")]
    pub caption_projection_dim: usize,
    /// Width of the pooled text vector.
    #[serde(default = "n::<2048>")]
    pub pooled_projection_dim: usize,
    /// Latent channels out.
    #[serde(default = "n::<16>")]
    pub out_channels: usize,
    /// Side of the square position-embedding table (in patches).
    #[serde(default = "n::<96>")]
    pub pos_embed_max_size: usize,
    /// Blocks (by index) that carry a second, image-only attention (MMDiT-X, SD3.5-medium).
    #[serde(default)]
    pub dual_attention_layers: Vec<usize>,
    /// `"rms_norm"` or absent.
    #[serde(default)]
    pub qk_norm: Option<String>,
}

impl Sd3TransformerConfig {
    /// Width of the image stream: heads x head dim.
    pub fn hidden_size(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Whether q/k are RMS-normalised per head.
    pub fn use_qk_norm(&self) -> bool {
        self.qk_norm.as_deref() == Some("rms_norm")
    }

    /// Rejects values no real model has, before any allocation.
    pub fn validate(&self, path: &Path) -> Result<()> {
        check_dims!(
            path,
            self,
            patch_size,
            in_channels,
            attention_head_dim,
            num_attention_heads,
            joint_attention_dim,
            caption_projection_dim,
            pooled_projection_dim,
            out_channels,
            pos_embed_max_size
        );
        check(path, self.patch_size <= 16, || {
            format!("`patch_size` is {}, expected at most 16", self.patch_size)
        })?;
        check_layers(path, "num_layers", self.num_layers)?;
        check_dim(path, "hidden size (heads x head dim)", self.hidden_size())?;
        check(
            path,
            self.caption_projection_dim == self.hidden_size(),
            || {
                format!(
                "`caption_projection_dim` ({}) must equal num_attention_heads x attention_head_dim ({})",
                self.caption_projection_dim,
                self.hidden_size()
            )
            },
        )?;
        check(path, self.pos_embed_max_size <= 1024, || {
            format!(
                "`pos_embed_max_size` is {}, expected at most 1024",
                self.pos_embed_max_size
            )
        })?;
        if let Some(n) = &self.qk_norm {
            check(path, n == "rms_norm", || {
                format!("`qk_norm` is {n:?}; only \"rms_norm\" is supported")
            })?;
        }
        if let Some(&i) = self
            .dual_attention_layers
            .iter()
            .find(|&&i| i >= self.num_layers)
        {
            return Err(crate::Error::config(
                path,
                format!(
                    "`dual_attention_layers` names layer {i} but there are {} layers",
                    self.num_layers
                ),
            ));
        }
        Ok(())
    }
}
