//! The blocks both halves of `AutoencoderKL` are built from (diffusers names).

use crate::nn::{linear, sdpa_unprofiled, Conv2d, GroupNorm, Linear};
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

impl Module for MidBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.resnets[0].forward(x)?;
        if let Some(a) = &self.attn {
            x = a.forward(&x)?;
        }
        self.resnets[1].forward(&x)
    }
}
