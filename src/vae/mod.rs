//! `AutoencoderKL` decoder (diffusers names), the same class for SD3 and Flux.

use crate::config::VaeConfig;
use crate::nn::{linear, sdpa_unprofiled, Conv2d, GroupNorm, Linear};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

const EPS: f64 = 1e-6;

fn conv3(in_c: usize, out_c: usize, vb: VarBuilder) -> Result<Conv2d> {
    Conv2d::new(in_c, out_c, 3, vb)
}

fn group_norm(groups: usize, c: usize, vb: VarBuilder) -> Result<GroupNorm> {
    GroupNorm::new(groups, c, EPS, vb)
}

/// `ResnetBlock2D` without time embedding: two GroupNorm-SiLU-conv steps and a residual
/// (1x1 `conv_shortcut` when the width changes).
#[derive(Debug, Clone)]
struct Resnet {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl Resnet {
    fn new(in_c: usize, out_c: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        let shortcut = if in_c != out_c {
            Some(Conv2d::new(in_c, out_c, 1, vb.pp("conv_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: group_norm(groups, in_c, vb.pp("norm1"))?,
            conv1: conv3(in_c, out_c, vb.pp("conv1"))?,
            norm2: group_norm(groups, out_c, vb.pp("norm2"))?,
            conv2: conv3(out_c, out_c, vb.pp("conv2"))?,
            shortcut,
        })
    }
}

impl Module for Resnet {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        match &self.shortcut {
            Some(s) => s.forward(x)? + h,
            None => x + h,
        }
    }
}

/// Single-head spatial self-attention of the mid block, with a residual.
#[derive(Debug, Clone)]
struct SpatialAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl SpatialAttention {
    fn new(c: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            group_norm: group_norm(groups, c, vb.pp("group_norm"))?,
            to_q: linear(c, c, vb.pp("to_q"))?,
            to_k: linear(c, c, vb.pp("to_k"))?,
            to_v: linear(c, c, vb.pp("to_v"))?,
            to_out: linear(c, c, vb.pp("to_out.0"))?,
        })
    }
}

impl Module for SpatialAttention {
    /// x: (b, c, h, w) -> (b, c, h, w)
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let t = self
            .group_norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?; // (b, hw, c)
        let q = self.to_q.forward(&t)?.unsqueeze(1)?; // (b, 1, hw, c)
        let k = self.to_k.forward(&t)?.unsqueeze(1)?;
        let v = self.to_v.forward(&t)?.unsqueeze(1)?;
        let o = sdpa_unprofiled(&q, &k, &v)?.squeeze(1)?; // (b, hw, c)
        let o = self
            .to_out
            .forward(&o)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        x + o
    }
}

#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<Resnet>,
    upsample: Option<Conv2d>,
}

/// The decoder half of `AutoencoderKL`, with the latent scaling of its config.
#[derive(Debug, Clone)]
pub struct VaeDecoder {
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid_resnets: [Resnet; 2],
    mid_attn: Option<SpatialAttention>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    cfg: VaeConfig,
}

impl VaeDecoder {
    /// `vb` is rooted at the VAE's weights (the decoder lives under `decoder.`).
    pub fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let g = cfg.norm_num_groups;
        let boc = &cfg.block_out_channels;
        let top = *boc.last().expect("validated: at least one level");
        let post_quant_conv = if cfg.use_post_quant_conv {
            let l = cfg.latent_channels;
            Some(Conv2d::new(l, l, 1, vb.pp("post_quant_conv"))?)
        } else {
            None
        };
        let vb = vb.pp("decoder");
        let conv_in = conv3(cfg.latent_channels, top, vb.pp("conv_in"))?;
        let mid = vb.pp("mid_block");
        let mid_resnets = [
            Resnet::new(top, top, g, mid.pp("resnets.0"))?,
            Resnet::new(top, top, g, mid.pp("resnets.1"))?,
        ];
        let mid_attn = if cfg.mid_block_add_attention {
            Some(SpatialAttention::new(top, g, mid.pp("attentions.0"))?)
        } else {
            None
        };
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
            post_quant_conv,
            conv_in,
            mid_resnets,
            mid_attn,
            up_blocks,
            conv_norm_out,
            conv_out,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    /// Undoes the sampler-space scaling: `z / scaling_factor + shift_factor`.
    pub fn unscale(&self, latents: &Tensor) -> Result<Tensor> {
        (latents / self.cfg.scaling_factor)? + self.cfg.shift_factor.unwrap_or(0.0)
    }

    /// Decodes unscaled latents. z: (b, latent_channels, h, w) -> (b, out_channels, h*f, w*f) in [-1, 1]-ish.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let mut x = match &self.post_quant_conv {
            Some(c) => c.forward(z)?,
            None => z.clone(),
        };
        x = self.conv_in.forward(&x)?;
        x = self.mid_resnets[0].forward(&x)?;
        if let Some(a) = &self.mid_attn {
            x = a.forward(&x)?;
        }
        x = self.mid_resnets[1].forward(&x)?;
        for ub in &self.up_blocks {
            for r in &ub.resnets {
                x = r.forward(&x)?;
            }
            if let Some(conv) = &ub.upsample {
                let (_, _, h, w) = x.dims4()?;
                x = conv.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)?;
            }
        }
        let x = self.conv_norm_out.forward_silu(&x)?;
        self.conv_out.forward(&x)
    }
}

/// diffusers' postprocess: `(x / 2 + 0.5).clamp(0, 1)`, `* 255`, round half to even, to u8.
/// x: (b, 3, h, w) -> one (h, w, 3) RGB buffer per image.
pub fn to_rgb8(x: &Tensor) -> Result<Vec<(usize, usize, Vec<u8>)>> {
    let (b, _, h, w) = x.dims4()?;
    let x = ((x.to_dtype(candle_core::DType::F32)? * 0.5)? + 0.5)?.clamp(0f32, 1f32)?;
    let x = (x * 255.0)?.permute((0, 2, 3, 1))?.contiguous()?; // (b, h, w, 3)
    let mut out = Vec::with_capacity(b);
    for i in 0..b {
        let v: Vec<f32> = x.get(i)?.flatten_all()?.to_vec1()?;
        out.push((
            h,
            w,
            v.into_iter().map(|p| p.round_ties_even() as u8).collect(),
        ));
    }
    Ok(out)
}
