//! The decoder half of `AutoencoderKL`: latents to pixels.

use super::blocks::{conv3, group_norm, norm_silu_conv, upsample2, MidBlock, Resnet};
use super::PatchNorm;
use super::Tiles;
use crate::config::VaeConfig;
use crate::nn::{Conv2d, GroupNorm};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<Resnet>,
    upsample: Option<Conv2d>,
}

/// The decoder half of `AutoencoderKL`, with the latent scaling of its config.
#[derive(Debug, Clone)]
pub struct VaeDecoder {
    /// FLUX.2's patches and batch-norm statistics, in place of the scaling factors.
    patches: Option<PatchNorm>,
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    cfg: VaeConfig,
}

impl VaeDecoder {
    /// `vb` is rooted at the VAE's weights (the decoder lives under `decoder.`).
    pub fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let g = cfg.norm_num_groups;
        let boc = cfg.decoder_channels();
        let top = *boc.last().expect("validated: at least one level");
        let patches = PatchNorm::new(cfg, &vb)?;
        let post_quant_conv = if cfg.use_post_quant_conv {
            let l = cfg.latent_channels;
            Some(Conv2d::new(l, l, 1, vb.pp("post_quant_conv"))?)
        } else {
            None
        };
        let vb = vb.pp("decoder");
        let conv_in = conv3(cfg.latent_channels, top, vb.pp("conv_in"))?;
        let mid = MidBlock::new(top, g, cfg.mid_block_add_attention, vb.pp("mid_block"))?;
        let mut up_blocks = Vec::with_capacity(boc.len());
        let mut prev = top;
        for (i, &out) in boc.iter().rev().enumerate() {
            let ub = vb.pp(format!("up_blocks.{i}"));
            let resnets = (0..=cfg.layers_per_block)
                .map(|j| {
                    Resnet::new(
                        if j == 0 { prev } else { out },
                        out,
                        g,
                        ub.pp(format!("resnets.{j}")),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let upsample = if i + 1 < boc.len() {
                Some(conv3(out, out, ub.pp("upsamplers.0.conv"))?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsample });
            prev = out;
        }
        let conv_norm_out = group_norm(g, boc[0], vb.pp("conv_norm_out"))?;
        let conv_out = conv3(boc[0], cfg.out_channels, vb.pp("conv_out"))?;
        Ok(Self {
            patches,
            post_quant_conv,
            conv_in,
            mid,
            up_blocks,
            conv_norm_out,
            conv_out,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    /// Sampler latents to the VAE's: `z / scaling_factor + shift_factor`, or for FLUX.2's VAE the
    /// batch-norm statistics undone and the patches unfolded.
    pub fn unscale(&self, latents: &Tensor) -> Result<Tensor> {
        match &self.patches {
            Some(p) => p.inverse(latents),
            None => (latents / self.cfg.scaling_factor)? + self.cfg.shift_factor.unwrap_or(0.0),
        }
    }

    /// diffusers' tiles of this VAE.
    pub fn tiles(&self) -> Tiles {
        Tiles::new(
            self.cfg.tile_sample_size(),
            self.cfg.block_out_channels.len(),
        )
    }

    /// [`Self::decode`], tiled as diffusers' `enable_tiling()` when `tiling` and the latents are
    /// larger than a tile.
    pub fn decode_with(&self, z: &Tensor, tiling: bool) -> Result<Tensor> {
        let (_, _, h, w) = z.dims4()?;
        let tiles = self.tiles();
        match tiling && tiles.decodes_tiled(h, w) {
            true => tiles.decode(z, |t| self.decode(t)),
            false => self.decode(z),
        }
    }

    /// Decodes unscaled latents. z: (b, latent_channels, h, w) -> (b, out_channels, h*f, w*f) in [-1, 1]-ish.
    /// In between, the image is in the layout the convolutions' kernel reads without copies.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let layout = self.conv_in.layout();
        let mut x = layout.from_first(z)?;
        if let Some(c) = &self.post_quant_conv {
            x = c.forward_in(&x, layout)?;
        }
        x = self.conv_in.forward_in(&x, layout)?;
        x = self.mid.forward_in(&x, layout)?;
        for ub in &self.up_blocks {
            for r in &ub.resnets {
                x = r.forward_in(&x, layout)?;
            }
            if let Some(conv) = &ub.upsample {
                x = conv.forward_in(&upsample2(&x, layout)?, layout)?;
            }
        }
        layout.to_first(&norm_silu_conv(
            &self.conv_norm_out,
            &self.conv_out,
            &x,
            layout,
        )?)
    }
}
