//! The SD3 joint transformer block (diffusers `JointTransformerBlock`), with the MMDiT-X second
//! attention on dual-attention layers and the context-pre-only variant for the last block. Flux's
//! double-stream block (`FluxTransformerBlock`) is the same block with the text first and RoPE.

use super::attention::{JointAttention, TokenOrder};
use super::modulation::{AdaNormContinuous, BlockModulation, Modulation, StepProduct};
use super::rope::Rope;
use crate::nn::{FeedForward, Mlp, SwiGlu};
use crate::profile::{self, Phase};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

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
    /// The block has its own modulation layers (`norm1.linear`, `norm1_context.linear`); Chroma's
    /// and FLUX.2's blocks have none and are given their modulation.
    pub own_modulation: bool,
    /// The projections have biases (all but FLUX.2's).
    pub bias: bool,
    /// The feed-forward of both streams.
    pub ff: FeedForwardKind,
}

/// Which feed-forward a block's streams have.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FeedForwardKind {
    /// diffusers' `FeedForward`: 4x, tanh-GELU, with biases (`net.0.proj`, `net.2`).
    Gelu,
    /// FLUX.2's SwiGLU at this ratio, no biases (`linear_in`, `linear_out`).
    SwiGlu(f64),
}

impl FeedForwardKind {
    fn build(self, dim: usize, vb: VarBuilder) -> Result<FeedForward> {
        Ok(match self {
            FeedForwardKind::Gelu => FeedForward::Gelu(Mlp::feed_forward(dim, 4 * dim, vb)?),
            FeedForwardKind::SwiGlu(r) => {
                FeedForward::SwiGlu(SwiGlu::new(dim, (dim as f64 * r) as usize, vb)?)
            }
        })
    }
}

#[derive(Debug, Clone)]
enum ContextPath {
    /// Full context stream: AdaLayerNormZero (absent when given), attention output, MLP.
    Full {
        norm1: Option<Modulation>,
        ff: FeedForward,
    },
    /// Last block: the context only feeds keys and values.
    PreOnly { norm1: AdaNormContinuous },
}

/// The context stream's modulation: a full block's triples, or the last SD3 block's context
/// already normed (by its continuous AdaLN).
enum ContextMod {
    Full(BlockModulation),
    PreOnly(Tensor),
}

#[derive(Debug, Clone)]
pub struct JointBlock {
    norm1: Option<Modulation>,
    attn: JointAttention,
    attn2: Option<JointAttention>,
    ff: FeedForward,
    ctx: ContextPath,
    order: TokenOrder,
}

impl JointBlock {
    pub fn new(s: BlockSpec, vb: VarBuilder) -> Result<Self> {
        let triples = if s.dual_attention { 3 } else { 2 };
        let own = |name: &str, triples: usize| -> Result<Option<Modulation>> {
            match s.own_modulation {
                true => Ok(Some(Modulation::new(s.dim, triples, vb.pp(name))?)),
                false => Ok(None),
            }
        };
        let norm1 = own("norm1", triples)?;
        let attention = |joint: bool, ctx_out: bool, name: &str| {
            JointAttention::new(
                s.dim,
                s.heads,
                s.head_dim,
                s.qk_norm,
                joint,
                ctx_out,
                s.bias,
                vb.pp(name),
            )
        };
        let attn = attention(true, !s.context_pre_only, "attn")?;
        let attn2 = if s.dual_attention {
            Some(attention(false, false, "attn2")?)
        } else {
            None
        };
        let ff = s.ff.build(s.dim, vb.pp("ff"))?;
        let ctx = if s.context_pre_only {
            ContextPath::PreOnly {
                norm1: AdaNormContinuous::new(s.dim, vb.pp("norm1_context"))?,
            }
        } else {
            ContextPath::Full {
                norm1: own("norm1_context", 2)?,
                ff: s.ff.build(s.dim, vb.pp("ff_context"))?,
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

    /// The block's own modulation layers' products (none for blocks given their modulation).
    pub fn step_products(&self) -> Vec<&StepProduct> {
        let ctx = match &self.ctx {
            ContextPath::Full { norm1, .. } => norm1.as_ref().map(Modulation::product),
            ContextPath::PreOnly { norm1 } => Some(norm1.product()),
        };
        self.norm1
            .iter()
            .map(Modulation::product)
            .chain(ctx)
            .collect()
    }

    /// The image stream's modulation from `temb` (blocks with their own modulation layers).
    pub fn modulation(&self, temb: &Tensor) -> Result<BlockModulation> {
        match &self.norm1 {
            Some(norm1) => norm1.forward_block(temb),
            None => {
                candle_core::bail!("a block without modulation layers was not given its modulation")
            }
        }
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
        let missing = || {
            candle_core::Error::Msg(
                "a block without modulation layers was not given its modulation".into(),
            )
        };
        let (m, c) = profile::phase(Phase::Norms, x.device(), || {
            let m = self.modulation(temb)?;
            let c = match &self.ctx {
                ContextPath::Full { norm1, .. } => {
                    ContextMod::Full(norm1.as_ref().ok_or_else(missing)?.forward_block(temb)?)
                }
                ContextPath::PreOnly { norm1 } => ContextMod::PreOnly(norm1.forward(ctx, temb)?),
            };
            Ok((m, c))
        })?;
        self.modulated(x, ctx, &m, c, rope)
    }

    /// [`Self::forward`] with the modulation of both streams given (Chroma's approximator) instead
    /// of computed by the block.
    pub fn forward_given(
        &self,
        x: &Tensor,
        ctx: &Tensor,
        img: &BlockModulation,
        txt: &BlockModulation,
        rope: Option<&Rope>,
    ) -> Result<(Tensor, Tensor)> {
        let (h, c) = self.modulated(x, ctx, img, ContextMod::Full(txt.clone()), rope)?;
        let c = c.ok_or_else(|| {
            candle_core::Error::Msg(
                "a context-pre-only block was given a context modulation".into(),
            )
        })?;
        Ok((h, c))
    }

    fn modulated(
        &self,
        x: &Tensor,
        ctx: &Tensor,
        m: &BlockModulation,
        c: ContextMod,
        rope: Option<&Rope>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let dev = x.device();
        let norms = |f: &mut dyn FnMut() -> Result<Tensor>| profile::phase(Phase::Norms, dev, f);
        let (x_attn_in, ctx_attn_in, ctx_mod) = profile::phase(Phase::Norms, dev, || {
            let x_attn_in = m.msa.norm(x)?;
            let (ctx_attn_in, ctx_mod) = match c {
                ContextMod::Full(c) => (c.msa.norm(ctx)?, Some(c)),
                ContextMod::PreOnly(normed) => (normed, None),
            };
            Ok((x_attn_in, ctx_attn_in, ctx_mod))
        })?;

        let (attn, ctx_attn) =
            self.attn
                .forward_joint(&x_attn_in, &ctx_attn_in, self.order, rope)?;
        let mut h = norms(&mut || m.msa.gated(x, &attn))?;
        if let (Some(attn2), Some(msa2)) = (&self.attn2, &m.msa2) {
            // The second attention reads the block's input, normed, with its own modulation.
            let a2 = attn2.forward_self(&norms(&mut || msa2.norm(x))?)?;
            h = norms(&mut || msa2.gated(&h, &a2))?;
        }
        let h = self.feed_forward(&self.ff, m, &h)?;

        let ctx = match (&self.ctx, ctx_mod, ctx_attn) {
            (ContextPath::Full { ff, .. }, Some(c), Some(ctx_attn)) => {
                let ctx = norms(&mut || c.msa.gated(ctx, &ctx_attn))?;
                Some(self.feed_forward(ff, &c, &ctx)?)
            }
            _ => None,
        };
        Ok((h, ctx))
    }

    /// `x + gate_mlp * ff(norm(x) * (1 + scale_mlp) + shift_mlp)`
    fn feed_forward(&self, ff: &FeedForward, m: &BlockModulation, x: &Tensor) -> Result<Tensor> {
        let dev = x.device();
        let ff_in = profile::phase(Phase::Norms, dev, || m.mlp.norm(x))?;
        let y = profile::phase(Phase::FeedForward, dev, || ff.forward(&ff_in))?;
        profile::phase(Phase::Norms, dev, || m.mlp.gated(x, &y))
    }
}
