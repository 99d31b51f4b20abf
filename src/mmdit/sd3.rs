//! `SD3Transformer2DModel`: SD3, SD3.5 (qk RMSNorm) and SD3.5-medium (MMDiT-X dual attention).

use super::attention::TokenOrder;
use super::cache::{run_blocks, BlockCache};
use super::embed::{PatchEmbed, TimeTextEmbed};
use super::joint_block::{BlockSpec, FeedForwardKind, JointBlock};
use super::modulation::{self, AdaNormContinuous, RemembersSteps, StepProduct};
use super::Text;
use crate::config::Sd3TransformerConfig;
use crate::nn::{linear, Linear};
use crate::profile::{self, Phase};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub struct Sd3Transformer {
    pos_embed: PatchEmbed,
    time_text_embed: TimeTextEmbed,
    context_embedder: Linear,
    blocks: Vec<JointBlock>,
    norm_out: AdaNormContinuous,
    proj_out: Linear,
    cfg: Sd3TransformerConfig,
}

impl Sd3Transformer {
    /// Builds the model from a validated config; `vb` is rooted at the transformer's weights.
    pub fn new(cfg: &Sd3TransformerConfig, vb: VarBuilder) -> Result<Self> {
        let dim = cfg.hidden_size();
        let p = cfg.patch_size;
        let pos_embed = PatchEmbed::new(
            cfg.in_channels,
            dim,
            p,
            cfg.pos_embed_max_size,
            vb.pp("pos_embed"),
        )?;
        let time_text_embed = TimeTextEmbed::new(
            dim,
            cfg.pooled_projection_dim,
            false,
            vb.pp("time_text_embed"),
        )?;
        let context_embedder = linear(
            cfg.joint_attention_dim,
            cfg.caption_projection_dim,
            vb.pp("context_embedder"),
        )?;
        let blocks = (0..cfg.num_layers)
            .map(|i| {
                let spec = BlockSpec {
                    dim,
                    heads: cfg.num_attention_heads,
                    head_dim: cfg.attention_head_dim,
                    qk_norm: cfg.use_qk_norm(),
                    dual_attention: cfg.dual_attention_layers.contains(&i),
                    context_pre_only: i + 1 == cfg.num_layers,
                    order: TokenOrder::ImageFirst,
                    own_modulation: true,
                    bias: true,
                    ff: FeedForwardKind::Gelu,
                };
                JointBlock::new(spec, vb.pp(format!("transformer_blocks.{i}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let norm_out = AdaNormContinuous::new(dim, vb.pp("norm_out"))?;
        let proj_out = linear(dim, p * p * cfg.out_channels, vb.pp("proj_out"))?;
        Ok(Self {
            pos_embed,
            time_text_embed,
            context_embedder,
            blocks,
            norm_out,
            proj_out,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &Sd3TransformerConfig {
        &self.cfg
    }

    /// Predicts the flow velocity.
    ///
    /// # Shapes
    /// x: (b, c, h, w) latents; t: (b,) timesteps (sigma * 1000); context: (b, s, joint_attention_dim);
    /// pooled: (b, pooled_projection_dim) -> (b, out_channels, h, w)
    pub fn forward(
        &self,
        x: &Tensor,
        t: &Tensor,
        context: &Tensor,
        pooled: &Tensor,
    ) -> Result<Tensor> {
        self.forward_cached(x, t, Text::Encoded(context), pooled, None, None)
    }

    /// The text encoders' states (b, s, joint_attention_dim) through the context embedder: (b, s,
    /// dim), the same for every step of a request.
    pub fn embed_context(&self, context: &Tensor) -> Result<Tensor> {
        profile::phase(Phase::Embeddings, context.device(), || {
            self.context_embedder.forward(context)
        })
    }

    /// Every step's conditioning embedding for a request's timesteps `ts` (sigma x 1000, one
    /// value for the whole batch) and its pooled text (b, pooled_projection_dim), with every
    /// modulation layer's product for all of them computed at once and remembered under `token`
    /// ([`modulation::remember_steps`]): one (b, dim) embedding per timestep, for
    /// [`Self::forward_cached`]'s `temb`. None where they would take too much memory.
    pub fn remember_steps(
        &self,
        token: u64,
        ts: &[f32],
        pooled: &Tensor,
    ) -> Result<Option<Vec<Tensor>>> {
        let (b, dev) = (pooled.dim(0)?, pooled.device());
        let shape = (ts.len(), b);
        profile::phase(Phase::Norms, dev, || {
            modulation::remember_steps(token, &self.step_products(), shape, pooled.dtype(), || {
                let t = modulation::step_rows(ts.iter().copied(), b, dev)?;
                self.time_text_embed
                    .forward(&t, None, &pooled.repeat((ts.len(), 1))?)
            })
        })
    }

    /// [`Self::forward`] with the blocks run under a step cache; `temb`: the step's conditioning
    /// embedding if remembered ([`Self::remember_steps`]), else computed from `t` and `pooled`.
    pub fn forward_cached(
        &self,
        x: &Tensor,
        t: &Tensor,
        text: Text<'_>,
        pooled: &Tensor,
        temb: Option<&Tensor>,
        cache: Option<&mut dyn BlockCache>,
    ) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let p = self.cfg.patch_size;
        let dev = x.device();
        let (img, temb, ctx) = profile::phase(Phase::Embeddings, dev, || {
            let temb = match temb {
                Some(temb) => temb.clone(),
                None => self.time_text_embed.forward(t, None, pooled)?, // (b, dim)
            };
            Ok((
                self.pos_embed.forward(x)?, // (b, n, dim)
                temb,
                text.embedded(&self.context_embedder)?, // (b, s, dim)
            ))
        })?;
        // The last block leaves no context; the one before it is kept (and not read again).
        let block = |b: &JointBlock, img: &Tensor, ctx: Tensor| -> Result<(Tensor, Tensor)> {
            let (img, new_ctx) = b.forward(img, &ctx, &temb, None)?;
            Ok((img, new_ctx.unwrap_or(ctx)))
        };
        let img = run_blocks(
            cache,
            img,
            ctx,
            |img| self.blocks[0].modulation(&temb)?.msa.norm(img),
            |img, ctx| block(&self.blocks[0], img, ctx),
            |mut img, mut ctx| {
                for b in &self.blocks[1..] {
                    (img, ctx) = block(b, &img, ctx)?;
                }
                Ok(img)
            },
        )?;
        let img = profile::phase(Phase::Final, dev, || {
            self.proj_out.forward(&self.norm_out.forward(&img, &temb)?) // (b, n, p*p*c)
        })?;
        let (hp, wp, c) = (h / p, w / p, self.cfg.out_channels);
        img.reshape((b, hp, wp, p, p, c))?
            .permute((0, 5, 1, 3, 2, 4))? // (b, c, hp, p, wp, p)
            .reshape((b, c, h, w))
    }
}

impl RemembersSteps for Sd3Transformer {
    /// Every joint block's modulations and the output norm's.
    fn step_products(&self) -> Vec<&StepProduct> {
        let blocks = self.blocks.iter().flat_map(JointBlock::step_products);
        blocks.chain([self.norm_out.product()]).collect()
    }
}
