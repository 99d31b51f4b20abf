use super::{check, check_dim, check_dims, n};
use crate::error::Result;
use std::path::Path;

/// `vae/config.json` of an `AutoencoderKL` (field names and defaults as diffusers).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct VaeConfig {
    #[serde(default = "n::<3>")]
    pub in_channels: usize,
    #[serde(default = "n::<3>")]
    pub out_channels: usize,
    /// Channels of each resolution level, highest resolution first.
    #[serde(default = "dboc")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "n::<1>")]
    pub layers_per_block: usize,
    #[serde(default = "n::<4>")]
    pub latent_channels: usize,
    #[serde(default = "n::<32>")]
    pub norm_num_groups: usize,
    /// Latents are divided by this before decoding.
    #[serde(default = "dscale")]
    pub scaling_factor: f64,
    /// Added to the latents after unscaling (SD3/Flux); absent means 0.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "dtrue")]
    pub use_quant_conv: bool,
    #[serde(default = "dtrue")]
    pub use_post_quant_conv: bool,
    #[serde(default = "dtrue")]
    pub mid_block_add_attention: bool,
    /// `AutoencoderKLFlux2`: the decoder's own level widths (absent: `block_out_channels`).
    #[serde(default)]
    pub decoder_block_out_channels: Option<Vec<usize>>,
    /// `AutoencoderKLFlux2`: the sampler works on p x p patches of latents, normalised by the
    /// VAE's batch-norm statistics (`bn.running_mean`, `bn.running_var`), not by
    /// `scaling_factor` / `shift_factor`.
    #[serde(default)]
    pub patch_size: Option<Vec<usize>>,
    #[serde(default = "dbn_eps")]
    pub batch_norm_eps: f64,
    /// Pixels per tile when tiling (an int, or a list whose first is taken, as diffusers does);
    /// absent: 32, `AutoencoderKL`'s default.
    #[serde(default)]
    pub sample_size: Option<serde_json::Value>,
}

fn dbn_eps() -> f64 {
    1e-4
}

fn dboc() -> Vec<usize> {
    vec![64]
}
fn dscale() -> f64 {
    0.18215
}
fn dtrue() -> bool {
    true
}

impl VaeConfig {
    /// A tile's side in pixels when tiling (`tile_sample_min_size`).
    pub fn tile_sample_size(&self) -> usize {
        let v = match &self.sample_size {
            Some(serde_json::Value::Array(a)) => a.first(),
            v => v.as_ref(),
        };
        v.and_then(serde_json::Value::as_u64)
            .map_or(32, |n| n.clamp(1, 1 << 16) as usize)
    }

    /// How many pixels one latent covers per side: 2^(levels - 1).
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    /// The side of the latent patches the sampler works on (1 but for FLUX.2's VAE).
    pub fn patch(&self) -> usize {
        self.patch_size
            .as_ref()
            .and_then(|p| p.first().copied())
            .unwrap_or(1)
    }

    /// How many pixels one latent of the sampler's space covers per side.
    pub fn latent_factor(&self) -> usize {
        self.scale_factor() * self.patch()
    }

    /// Channels of the sampler's latents: the VAE's latent channels x patch².
    pub fn sampler_channels(&self) -> usize {
        self.latent_channels * self.patch() * self.patch()
    }

    /// The decoder's level widths, highest resolution first.
    pub fn decoder_channels(&self) -> &[usize] {
        self.decoder_block_out_channels
            .as_deref()
            .unwrap_or(&self.block_out_channels)
    }

    pub fn validate(&self, path: &Path) -> Result<()> {
        check(
            path,
            (1..=8).contains(&self.block_out_channels.len()),
            || {
                format!(
                    "`block_out_channels` has {} levels, expected 1..=8",
                    self.block_out_channels.len()
                )
            },
        )?;
        if let Some(d) = &self.decoder_block_out_channels {
            check(path, d.len() == self.block_out_channels.len(), || {
                format!(
                    "`decoder_block_out_channels` has {} levels, `block_out_channels` {}",
                    d.len(),
                    self.block_out_channels.len()
                )
            })?;
        }
        if let Some(p) = &self.patch_size {
            check(
                path,
                p.len() == 2 && p[0] == p[1] && (1..=4).contains(&p[0]),
                || format!("`patch_size` {p:?}: expected two equal sides of 1 to 4"),
            )?;
            check(
                path,
                self.batch_norm_eps.is_finite() && self.batch_norm_eps > 0.0,
                || {
                    format!(
                        "`batch_norm_eps` is {}, expected above 0",
                        self.batch_norm_eps
                    )
                },
            )?;
        }
        for &c in self
            .block_out_channels
            .iter()
            .chain(self.decoder_channels())
        {
            check_dim(path, "block_out_channels", c)?;
            check(path, c % self.norm_num_groups.max(1) == 0, || {
                format!(
                    "`norm_num_groups` ({}) does not divide block channels {c}",
                    self.norm_num_groups
                )
            })?;
        }
        check_dims!(
            path,
            self,
            in_channels,
            out_channels,
            latent_channels,
            norm_num_groups
        );
        check(path, (1..=16).contains(&self.layers_per_block), || {
            format!(
                "`layers_per_block` is {}, expected 1..=16",
                self.layers_per_block
            )
        })?;
        check(
            path,
            self.scaling_factor.is_finite() && self.scaling_factor != 0.0,
            || {
                format!(
                    "`scaling_factor` is {}, expected a finite non-zero number",
                    self.scaling_factor
                )
            },
        )?;
        check(path, self.shift_factor.is_none_or(f64::is_finite), || {
            "`shift_factor` is not finite".into()
        })
    }
}
