//! The SD3 joint transformer block (diffusers `JointTransformerBlock`), with the MMDiT-X second
//! attention on dual-attention layers and the context-pre-only variant for the last block.

use super::attention::{JointAttention, TokenOrder};
use super::linear::{linear, Linear};
use super::modulation::{add_gated, norm_modulate, AdaNormContinuous, Modulation};
use super::rope::Rope;
use crate::profile;
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

const EPS: f64 = 1e-6;

/// `FeedForward(dim, activation_fn="gelu-approximate")`: `net.0.proj` -> tanh-GELU -> `net.2`.
#[derive(Debug, Clone)]
pub struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    pub fn new(dim: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            proj_in: linear(dim, hidden, vb.pp("net.0.proj"))?,
            proj_out: linear(hidden, dim, vb.pp("net.2"))?,
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.proj_out
            .forward(&gelu_tanh(&self.proj_in.forward(x)?)?)
    }
}

/// tanh-GELU; bf16 on the CPU through a vectorised f32 kernel (one rounding, as PyTorch).
pub(crate) fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::BF16 {
        crate::cpu::gelu_tanh_bf16(x)
    } else if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        crate::cpu::gelu_tanh_f32(x)
    } else {
        x.gelu()
    }
}

/// Shape of one block, from the model config.
#[derive(Debug, Clone, Copy)]
pub struct BlockSpec {
    pub dim: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub qk_norm: bool,
    pub dual_attention: bool,
    pub context_pre_only: bool,
    /// SD3 puts the text after the image tokens, Flux before.
    pub order: TokenOrder,
}

#[derive(Debug, Clone)]
enum ContextPath {
    /// Full context stream: AdaLayerNormZero, attention output, MLP.
    Full { norm1: Modulation, ff: FeedForward },
    /// Last block: the context only feeds keys and values.
    PreOnly { norm1: AdaNormContinuous },
}

#[derive(Debug, Clone)]
pub struct JointBlock {
    norm1: Modulation,
    attn: JointAttention,
    attn2: Option<JointAttention>,
    ff: FeedForward,
    ctx: ContextPath,
    order: TokenOrder,
}

impl JointBlock {
    pub fn new(s: BlockSpec, vb: VarBuilder) -> Result<Self> {
        let chunks = if s.dual_attention { 9 } else { 6 };
        let norm1 = Modulation::new(s.dim, chunks, vb.pp("norm1"))?;
        let attn = JointAttention::new(
            s.dim,
            s.heads,
            s.head_dim,
            s.qk_norm,
            true,
            !s.context_pre_only,
            vb.pp("attn"),
        )?;
        let attn2 = if s.dual_attention {
            Some(JointAttention::new(
                s.dim,
                s.heads,
                s.head_dim,
                s.qk_norm,
                false,
                false,
                vb.pp("attn2"),
            )?)
        } else {
            None
        };
        let ff = FeedForward::new(s.dim, 4 * s.dim, vb.pp("ff"))?;
        let ctx = if s.context_pre_only {
            ContextPath::PreOnly {
                norm1: AdaNormContinuous::new(s.dim, vb.pp("norm1_context"))?,
            }
        } else {
            ContextPath::Full {
                norm1: Modulation::new(s.dim, 6, vb.pp("norm1_context"))?,
                ff: FeedForward::new(s.dim, 4 * s.dim, vb.pp("ff_context"))?,
            }
        };
        Ok(Self {
            norm1,
            attn,
            attn2,
            ff,
            ctx,
            order: s.order,
        })
    }

    /// x: (b, n, dim) image tokens; ctx: (b, s, dim) text tokens; temb: (b, dim); rope: Flux's
    /// rotary tables over the joint sequence. Returns the new image tokens and, unless
    /// context-pre-only, the new text tokens.
    pub fn forward(
        &self,
        x: &Tensor,
        ctx: &Tensor,
        temb: &Tensor,
        rope: Option<&Rope>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        // m: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp[, shift_msa2, scale_msa2, gate_msa2]
        let dev = x.device();
        let x_in = x;
        let norms = "norms, modulation, gates, residuals";
        let (m, x_attn_in, ctx_attn_in, ctx_mod) = profile::phase(norms, dev, || {
            let m = self.norm1.forward(temb)?;
            let x_attn_in = norm_modulate(x, EPS, &m[0], &m[1])?;
            let (ctx_attn_in, ctx_mod) = match &self.ctx {
                ContextPath::Full { norm1, .. } => {
                    let c = norm1.forward(temb)?;
                    (norm_modulate(ctx, EPS, &c[0], &c[1])?, Some(c))
                }
                ContextPath::PreOnly { norm1 } => (norm1.forward(ctx, temb)?, None),
            };
            Ok((m, x_attn_in, ctx_attn_in, ctx_mod))
        })?;

        let (attn, ctx_attn) =
            self.attn
                .forward_joint(&x_attn_in, &ctx_attn_in, self.order, rope)?;
        let mut x = profile::phase(norms, dev, || add_gated(x, &attn, &m[2]))?;
        if let Some(attn2) = &self.attn2 {
            // The second attention reads the block's input, normed, with its own modulation.
            let x2_in = profile::phase(norms, dev, || norm_modulate(x_in, EPS, &m[6], &m[7]))?;
            let a2 = attn2.forward_self(&x2_in)?;
            x = profile::phase(norms, dev, || add_gated(&x, &a2, &m[8]))?;
        }
        let ff_in = profile::phase(norms, dev, || norm_modulate(&x, EPS, &m[3], &m[4]))?;
        let ff = profile::phase("feed-forward", dev, || self.ff.forward(&ff_in))?;
        let x = profile::phase(norms, dev, || add_gated(&x, &ff, &m[5]))?;

        let ctx = match (&self.ctx, ctx_mod, ctx_attn) {
            (ContextPath::Full { ff, .. }, Some(c), Some(ctx_attn)) => {
                let (ctx, ff_in) = profile::phase(norms, dev, || {
                    let ctx = add_gated(ctx, &ctx_attn, &c[2])?;
                    let ff_in = norm_modulate(&ctx, EPS, &c[3], &c[4])?;
                    Ok((ctx, ff_in))
                })?;
                let f = profile::phase("feed-forward", dev, || ff.forward(&ff_in))?;
                Some(profile::phase(norms, dev, || add_gated(&ctx, &f, &c[5]))?)
            }
            _ => None,
        };
        Ok((x, ctx))
    }
}
