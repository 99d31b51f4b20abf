//! The encoder half of `AutoencoderKL`: pixels to the latent distribution (a diagonal Gaussian)
//! that image editing starts from.

use super::blocks::{conv3, group_norm, norm_silu_conv, MidBlock, Resnet};
use super::PatchNorm;
use super::Tiles;
use crate::config::VaeConfig;
use crate::nn::{Conv2d, GroupNorm, ImageLayout};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

/// `DownEncoderBlock2D`: resnets, then (except at the last level) a stride-2 convolution after
/// padding one zero row and column on the bottom and right (`Downsample2D` with `padding=0`).
#[derive(Debug, Clone)]
struct DownBlock {
    resnets: Vec<Resnet>,
    downsample: Option<Conv2d>,
}

/// The encoder half of `AutoencoderKL`, with `quant_conv` when the config uses it.
#[derive(Debug, Clone)]
pub struct VaeEncoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownBlock>,
    mid: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
    /// FLUX.2's patches and batch-norm statistics, in place of the scaling factors.
    patches: Option<PatchNorm>,
    cfg: VaeConfig,
}

/// The encoder's output: `DiagonalGaussianDistribution` (mean and log-variance, clamped to
/// [-30, 20] as diffusers does).
#[derive(Debug, Clone)]
pub struct LatentDist {
    pub mean: Tensor,
    pub logvar: Tensor,
}

impl LatentDist {
    /// `mean + exp(logvar / 2) * eps` for standard-normal `eps` of the mean's shape.
    pub fn sample(&self, eps: &Tensor) -> Result<Tensor> {
        let std = (&self.logvar * 0.5)?.exp()?;
        &self.mean + (std * eps.to_dtype(self.mean.dtype())?)?
    }
}

impl VaeEncoder {
    /// `vb` is rooted at the VAE's weights (the encoder lives under `encoder.`).
    pub fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let g = cfg.norm_num_groups;
        let boc = &cfg.block_out_channels;
        let top = *boc.last().expect("validated: at least one level");
        let l = cfg.latent_channels;
        let quant_conv = if cfg.use_quant_conv {
            Some(Conv2d::new(2 * l, 2 * l, 1, vb.pp("quant_conv"))?)
        } else {
            None
        };
        let patches = PatchNorm::new(cfg, &vb)?;
        let vb = vb.pp("encoder");
        let conv_in = conv3(cfg.in_channels, boc[0], vb.pp("conv_in"))?;
        let mut down_blocks = Vec::with_capacity(boc.len());
        let mut prev = boc[0];
        for (i, &out) in boc.iter().enumerate() {
            let db = vb.pp(format!("down_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let in_c = if j == 0 { prev } else { out };
                    Resnet::new(in_c, out, g, db.pp(format!("resnets.{j}")))
                })
                .collect::<Result<Vec<_>>>()?;
            let downsample = if i + 1 < boc.len() {
                Some(Conv2d::strided(
                    out,
                    out,
                    3,
                    2,
                    0,
                    db.pp("downsamplers.0.conv"),
                )?)
            } else {
                None
            };
            down_blocks.push(DownBlock {
                resnets,
                downsample,
            });
            prev = out;
        }
        let mid = MidBlock::new(top, g, cfg.mid_block_add_attention, vb.pp("mid_block"))?;
        let conv_norm_out = group_norm(g, top, vb.pp("conv_norm_out"))?;
        let conv_out = conv3(top, 2 * l, vb.pp("conv_out"))?;
        Ok(Self {
            conv_in,
            down_blocks,
            mid,
            conv_norm_out,
            conv_out,
            quant_conv,
            patches,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    /// Pixels in [-1, 1], (b, in_channels, H, W) with H and W multiples of the scale factor ->
    /// the latent distribution, (b, latent_channels, H / f, W / f) each.
    pub fn encode(&self, x: &Tensor) -> Result<LatentDist> {
        self.encode_with(x, false)
    }

    /// [`Self::encode`], tiled as diffusers' `enable_tiling()` when `tiling` and the image is
    /// larger than a tile (the moments blended tile to tile).
    pub fn encode_with(&self, x: &Tensor, tiling: bool) -> Result<LatentDist> {
        let (_, _, h, w) = x.dims4()?;
        let tiles = Tiles::new(
            self.cfg.tile_sample_size(),
            self.cfg.block_out_channels.len(),
        );
        let moments = match tiling && tiles.encodes_tiled(h, w) {
            true => tiles.encode(x, |t| self.moments(t))?,
            false => self.moments(x)?,
        };
        let l = self.cfg.latent_channels;
        Ok(LatentDist {
            mean: moments.narrow(1, 0, l)?,
            logvar: moments.narrow(1, l, l)?.clamp(-30f32, 20f32)?,
        })
    }

    /// The encoder's output: mean and log-variance side by side, (b, 2 latent_channels, h, w).
    /// In between, the image is in the layout the convolutions' kernel reads without copies
    /// (the downsamplers, candle's, permute it when that is channels-last).
    fn moments(&self, x: &Tensor) -> Result<Tensor> {
        let layout = self.conv_in.layout();
        let (hd, wd) = match layout {
            ImageLayout::ChannelsFirst => (2, 3),
            ImageLayout::ChannelsLast => (1, 2),
        };
        let mut x = self.conv_in.forward_in(&layout.from_first(x)?, layout)?;
        for db in &self.down_blocks {
            for r in &db.resnets {
                x = r.forward_in(&x, layout)?;
            }
            if let Some(conv) = &db.downsample {
                let padded = x.pad_with_zeros(wd, 0, 1)?.pad_with_zeros(hd, 0, 1)?;
                x = conv.forward_in(&padded, layout)?;
            }
        }
        x = self.mid.forward_in(&x, layout)?;
        let mut moments = norm_silu_conv(&self.conv_norm_out, &self.conv_out, &x, layout)?;
        if let Some(q) = &self.quant_conv {
            moments = q.forward_in(&moments, layout)?;
        }
        layout.to_first(&moments)
    }

    /// Into the sampler's space: `(z - shift_factor) * scaling_factor`, or for FLUX.2's VAE folded
    /// into patches and standardised by the batch-norm statistics.
    pub fn scale(&self, z: &Tensor) -> Result<Tensor> {
        match &self.patches {
            Some(p) => p.forward(z),
            None => (z - self.cfg.shift_factor.unwrap_or(0.0))? * self.cfg.scaling_factor,
        }
    }
}
