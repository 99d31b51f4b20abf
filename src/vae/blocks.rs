//! The blocks both halves of `AutoencoderKL` are built from (diffusers names). Each takes its
//! image in either [`ImageLayout`] and returns it in the same one.

use crate::nn::{linear, sdpa_unprofiled, Conv2d, GroupNorm, ImageLayout, Linear};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

const EPS: f64 = 1e-6;

pub(super) fn conv3(in_c: usize, out_c: usize, vb: VarBuilder) -> Result<Conv2d> {
    Conv2d::new(in_c, out_c, 3, vb)
}

pub(super) fn group_norm(groups: usize, c: usize, vb: VarBuilder) -> Result<GroupNorm> {
    GroupNorm::new(groups, c, EPS, vb)
}

/// `ResnetBlock2D` without time embedding: two GroupNorm-SiLU-conv steps and a residual
/// (1x1 `conv_shortcut` when the width changes).
#[derive(Debug, Clone)]
pub(super) struct Resnet {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl Resnet {
    pub(super) fn new(in_c: usize, out_c: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
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

/// `conv(silu(norm(x)))`: where the kernels allow, the convolution applies the GroupNorm and SiLU
/// as it reads x, and the normalised image is never written whole.
pub(super) fn norm_silu_conv(
    norm: &GroupNorm,
    conv: &Conv2d,
    x: &Tensor,
    layout: ImageLayout,
) -> Result<Tensor> {
    match norm.affine_in(x, layout, true)? {
        Some(affine) => conv.forward_after(x, &affine),
        None => conv.forward_in(&norm.forward_in(x, layout, true)?, layout),
    }
}

impl Resnet {
    pub(super) fn forward_in(&self, x: &Tensor, layout: ImageLayout) -> Result<Tensor> {
        let h = norm_silu_conv(&self.norm1, &self.conv1, x, layout)?;
        let h = norm_silu_conv(&self.norm2, &self.conv2, &h, layout)?;
        match &self.shortcut {
            Some(s) => s.forward_in(x, layout)? + h,
            None => x + h,
        }
    }
}

/// Single-head spatial self-attention of the mid block, with a residual.
#[derive(Debug, Clone)]
pub(super) struct SpatialAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl SpatialAttention {
    pub(super) fn new(c: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            group_norm: group_norm(groups, c, vb.pp("group_norm"))?,
            to_q: linear(c, c, vb.pp("to_q"))?,
            to_k: linear(c, c, vb.pp("to_k"))?,
            to_v: linear(c, c, vb.pp("to_v"))?,
            to_out: linear(c, c, vb.pp("to_out.0"))?,
        })
    }
}

impl SpatialAttention {
    /// Over the pixels as a sequence: channels-last, (b, h, w, c) is already (b, hw, c).
    pub(super) fn forward_in(&self, x: &Tensor, layout: ImageLayout) -> Result<Tensor> {
        let (b, c, h, w) = layout.dims(x)?;
        let t = self.group_norm.forward_in(x, layout, false)?;
        let t = match layout {
            ImageLayout::ChannelsFirst => t.reshape((b, c, h * w))?.transpose(1, 2)?,
            ImageLayout::ChannelsLast => t.reshape((b, h * w, c))?,
        };
        let q = self.to_q.forward(&t)?.unsqueeze(1)?; // (b, 1, hw, c)
        let k = self.to_k.forward(&t)?.unsqueeze(1)?;
        let v = self.to_v.forward(&t)?.unsqueeze(1)?;
        let o = sdpa_unprofiled(&q, &k, &v)?.squeeze(1)?; // (b, hw, c)
        let o = self.to_out.forward(&o)?;
        let o = match layout {
            ImageLayout::ChannelsFirst => o.transpose(1, 2)?.reshape((b, c, h, w))?,
            ImageLayout::ChannelsLast => o.reshape((b, h, w, c))?,
        };
        x + o
    }
}

/// `UNetMidBlock2D` without time embedding: resnet, optional single-head attention, resnet.
#[derive(Debug, Clone)]
pub(super) struct MidBlock {
    resnets: [Resnet; 2],
    attn: Option<SpatialAttention>,
}

impl MidBlock {
    /// `vb` is rooted at `mid_block`.
    pub(super) fn new(c: usize, groups: usize, attention: bool, vb: VarBuilder) -> Result<Self> {
        let attn = if attention {
            Some(SpatialAttention::new(c, groups, vb.pp("attentions.0"))?)
        } else {
            None
        };
        Ok(Self {
            resnets: [
                Resnet::new(c, c, groups, vb.pp("resnets.0"))?,
                Resnet::new(c, c, groups, vb.pp("resnets.1"))?,
            ],
            attn,
        })
    }
}

impl MidBlock {
    pub(super) fn forward_in(&self, x: &Tensor, layout: ImageLayout) -> Result<Tensor> {
        let mut x = self.resnets[0].forward_in(x, layout)?;
        if let Some(a) = &self.attn {
            x = a.forward_in(&x, layout)?;
        }
        self.resnets[1].forward_in(&x, layout)
    }
}

/// Nearest-neighbour upsampling by 2 (`Upsample2D`'s interpolation) in `layout`.
pub(super) fn upsample2(x: &Tensor, layout: ImageLayout) -> Result<Tensor> {
    let (b, c, h, w) = layout.dims(x)?;
    match layout {
        ImageLayout::ChannelsFirst => x.upsample_nearest2d(2 * h, 2 * w),
        ImageLayout::ChannelsLast => x
            .reshape((b, h, 1, w, 1, c))?
            .broadcast_as((b, h, 2, w, 2, c))?
            .contiguous()?
            .reshape((b, 2 * h, 2 * w, c)),
    }
}
