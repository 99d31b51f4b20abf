use super::{check, check_blocks, check_dim, check_dims, check_rope_axes, n, MAX_LAYERS};
use crate::error::Result;
use std::path::Path;

/// `transformer/config.json` of a `FluxTransformer2DModel` (field names and defaults as diffusers).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct FluxTransformerConfig {
    #[serde(default = "n::<1>")]
    pub patch_size: usize,
    /// Packed latent channels in (16 latent channels x 2 x 2).
    #[serde(default = "n::<64>")]
    pub in_channels: usize,
    #[serde(default)]
    pub out_channels: Option<usize>,
    /// Double-stream blocks.
    #[serde(default = "n::<19>")]
    pub num_layers: usize,
    /// Single-stream blocks.
    #[serde(default = "n::<38>")]
    pub num_single_layers: usize,
    #[serde(default = "n::<128>")]
    pub attention_head_dim: usize,
    #[serde(default = "n::<24>")]
    pub num_attention_heads: usize,
    #[serde(default = "n::<4096>")]
    pub joint_attention_dim: usize,
    #[serde(default = "n::<768>")]
    pub pooled_projection_dim: usize,
    /// FLUX.1-dev embeds the guidance scale; schnell does not.
    #[serde(default)]
    pub guidance_embeds: bool,
    #[serde(default = "daxes")]
    pub axes_dims_rope: Vec<usize>,
}

fn daxes() -> Vec<usize> {
    vec![16, 56, 56]
}

impl FluxTransformerConfig {
    pub fn hidden_size(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    pub fn validate(&self, path: &Path) -> Result<()> {
        check_dims!(
            path,
            self,
            in_channels,
            attention_head_dim,
            num_attention_heads,
            joint_attention_dim,
            pooled_projection_dim
        );
        check_dim(path, "out_channels", self.out_channels())?;
        check_dim(path, "hidden size (heads x head dim)", self.hidden_size())?;
        check(path, self.patch_size == 1, || {
            format!(
                "`patch_size` is {}; Flux packs 2x2 itself and needs 1",
                self.patch_size
            )
        })?;
        check(path, self.in_channels.is_multiple_of(4), || {
            format!(
                "`in_channels` ({}) must be 4 x the latent channels",
                self.in_channels
            )
        })?;
        check_blocks(path, self.num_layers, self.num_single_layers)?;
        check_rope_axes(path, &self.axes_dims_rope, self.attention_head_dim)
    }
}

/// `transformer/config.json` of a `ChromaTransformer2DModel`: FLUX.1's shape (its pooled and
/// guidance fields unused) and the approximator that computes every block's modulation.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ChromaTransformerConfig {
    #[serde(flatten)]
    pub flux: FluxTransformerConfig,
    /// Width of the approximator's input: timestep, guidance and modulation-index features, a
    /// quarter, a quarter and a half of it.
    #[serde(default = "n::<64>")]
    pub approximator_num_channels: usize,
    #[serde(default = "n::<5120>")]
    pub approximator_hidden_dim: usize,
    #[serde(default = "n::<5>")]
    pub approximator_layers: usize,
}

impl ChromaTransformerConfig {
    /// Rows of modulation the approximator gives: (shift, scale, gate) per single block, two
    /// (shift, scale, gate) pairs per double block for each stream, and the output norm's
    /// (shift, scale).
    pub fn modulation_rows(&self) -> usize {
        3 * self.flux.num_single_layers + 2 * 6 * self.flux.num_layers + 2
    }

    pub fn validate(&self, path: &Path) -> Result<()> {
        self.flux.validate(path)?;
        check_dims!(
            path,
            self,
            approximator_num_channels,
            approximator_hidden_dim
        );
        check(
            path,
            self.approximator_num_channels.is_multiple_of(4),
            || {
                format!(
                    "`approximator_num_channels` ({}) must be a multiple of 4 (timestep, guidance and index features of a quarter, a quarter and a half)",
                    self.approximator_num_channels
                )
            },
        )?;
        check(path, self.approximator_layers <= MAX_LAYERS, || {
            format!(
                "`approximator_layers` is {}, expected 0..={MAX_LAYERS}",
                self.approximator_layers
            )
        })
    }
}
