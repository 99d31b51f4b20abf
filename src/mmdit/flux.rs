//! `FluxTransformer2DModel`: double-stream joint blocks (shared with SD3, text first, RoPE) then
//! single-stream blocks, AdaLN-continuous output norm.

use super::attention::TokenOrder;
use super::cache::{run_two_stacks, BlockCache};
use super::embed::TimeTextEmbed;
use super::joint_block::{BlockSpec, FeedForwardKind, JointBlock};
use super::modulation::{self, AdaNormContinuous, RemembersSteps, StepProduct};
use super::rope::Rope;
use super::single_block::SingleBlock;
use super::Text;
use crate::config::FluxTransformerConfig;
use crate::nn::{linear, Linear};
use crate::profile::{self, Phase};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// RoPE base of every released Flux model.
const ROPE_THETA: f64 = 10000.0;

#[derive(Debug, Clone)]
pub struct FluxTransformer {
    x_embedder: Linear,
    context_embedder: Linear,
    time_text_embed: TimeTextEmbed,
    double: Vec<JointBlock>,
    single: Vec<SingleBlock>,
    norm_out: AdaNormContinuous,
    proj_out: Linear,
    cfg: FluxTransformerConfig,
}

impl FluxTransformer {
    pub fn new(cfg: &FluxTransformerConfig, vb: VarBuilder) -> Result<Self> {
        let dim = cfg.hidden_size();
        let (double, single) = blocks(cfg, true, &vb)?;
        Ok(Self {
            x_embedder: linear(cfg.in_channels, dim, vb.pp("x_embedder"))?,
            context_embedder: linear(cfg.joint_attention_dim, dim, vb.pp("context_embedder"))?,
            time_text_embed: TimeTextEmbed::new(
                dim,
                cfg.pooled_projection_dim,
                cfg.guidance_embeds,
                vb.pp("time_text_embed"),
            )?,
            double,
            single,
            norm_out: AdaNormContinuous::new(dim, vb.pp("norm_out"))?,
            proj_out: linear(
                dim,
                cfg.patch_size * cfg.patch_size * cfg.out_channels(),
                vb.pp("proj_out"),
            )?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &FluxTransformerConfig {
        &self.cfg
    }

    /// Rotary tables for `txt_len` text tokens followed by an `h x w` grid of packed latents and
    /// Kontext's reference grid ([`rope`]).
    pub fn rope(
        &self,
        txt_len: usize,
        h: usize,
        w: usize,
        reference: Option<(usize, usize)>,
        device: &candle_core::Device,
    ) -> Result<Rope> {
        rope(&self.cfg.axes_dims_rope, txt_len, h, w, reference, device)
    }

    /// Predicts the flow velocity on packed latents.
    ///
    /// # Shapes
    /// x: (b, n, in_channels) packed latents; sigma: (b,) in [0, 1] (scaled by 1000 inside);
    /// guidance: (b,) scale (models with guidance_embeds); context: (b, s, joint_attention_dim);
    /// pooled: (b, pooled_projection_dim); rope over s + n tokens -> (b, n, out_channels)
    pub fn forward(
        &self,
        x: &Tensor,
        sigma: &Tensor,
        guidance: Option<&Tensor>,
        context: &Tensor,
        pooled: &Tensor,
        rope: &Rope,
    ) -> Result<Tensor> {
        self.forward_cached(
            x,
            sigma,
            guidance,
            Text::Encoded(context),
            pooled,
            None,
            rope,
            None,
        )
    }

    /// The text encoder's states (b, s, joint_attention_dim) through the context embedder: (b, s,
    /// dim), the same for every step of a request.
    pub fn embed_context(&self, context: &Tensor) -> Result<Tensor> {
        profile::phase(Phase::Embeddings, context.device(), || {
            self.context_embedder.forward(context)
        })
    }

    /// The conditioning embedding (b, dim) in `dtype` from sigma (b,), guidance (b,) and pooled.
    fn temb(
        &self,
        sigma: &Tensor,
        guidance: Option<&Tensor>,
        pooled: &Tensor,
        dtype: DType,
    ) -> Result<Tensor> {
        let t = (sigma.to_dtype(dtype)? * 1000.0)?;
        let g = match guidance {
            Some(g) if self.cfg.guidance_embeds => Some((g.to_dtype(dtype)? * 1000.0)?),
            _ => None,
        };
        self.time_text_embed.forward(&t, g.as_ref(), pooled)
    }

    /// Every step's conditioning embedding in `dtype` for a request's timesteps `ts` (sigma x
    /// 1000, one value for the whole batch, taken to sigma as the pipeline does: `t / 1000` in
    /// f32), its guidance scale and its pooled text (b, pooled_projection_dim), with every
    /// modulation layer's product for all of them computed at once and remembered under `token`
    /// ([`modulation::remember_steps`]): one (b, dim) embedding per timestep, for
    /// [`Self::forward_cached`]'s `temb`. None where they would take too much memory.
    pub fn remember_steps(
        &self,
        token: u64,
        ts: &[f32],
        guidance: Option<f32>,
        pooled: &Tensor,
        dtype: DType,
    ) -> Result<Option<Vec<Tensor>>> {
        let (b, dev) = (pooled.dim(0)?, pooled.device());
        let rows = ts.len() * b;
        profile::phase(Phase::Norms, dev, || {
            modulation::remember_steps(token, &self.step_products(), (ts.len(), b), dtype, || {
                let sigma = modulation::step_rows(ts.iter().map(|t| t / 1000.0), b, dev)?;
                let g = guidance.map(|g| Tensor::full(g, rows, dev)).transpose()?;
                self.temb(&sigma, g.as_ref(), &pooled.repeat((ts.len(), 1))?, dtype)
            })
        })
    }

    /// [`Self::forward`] with the blocks run under a step cache; `temb`: the step's conditioning
    /// embedding if remembered ([`Self::remember_steps`]), else computed from sigma, guidance and
    /// pooled.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_cached(
        &self,
        x: &Tensor,
        sigma: &Tensor,
        guidance: Option<&Tensor>,
        text: Text<'_>,
        pooled: &Tensor,
        temb: Option<&Tensor>,
        rope: &Rope,
        cache: Option<&mut dyn BlockCache>,
    ) -> Result<Tensor> {
        let dtype = x.dtype();
        let dev = x.device();
        let (img, temb, ctx) = profile::phase(Phase::Embeddings, dev, || {
            let img = self.x_embedder.forward(x)?; // (b, n, dim)
            let temb = match temb {
                Some(temb) => temb.clone(),
                None => self.temb(sigma, guidance, pooled, dtype)?, // (b, dim)
            };
            Ok((img, temb, text.embedded(&self.context_embedder)?)) // ctx: (b, s, dim)
        })?;
        let img = run_two_stacks(
            cache,
            (img, ctx),
            (self.double.len(), self.single.len()),
            |img| match self.double.first() {
                Some(b) => b.modulation(&temb)?.msa.norm(img),
                None => self.single[0].modulation(&temb)?.norm(img),
            },
            |i, img, ctx| {
                let (img, ctx) = self.double[i].forward(img, ctx, &temb, Some(rope))?;
                Ok((img, ctx.expect("double blocks keep the context stream")))
            },
            |i, joint| self.single[i].forward(joint, &temb, rope),
        )?;
        profile::phase(Phase::Final, dev, || {
            self.proj_out.forward(&self.norm_out.forward(&img, &temb)?)
        })
    }
}

impl RemembersSteps for FluxTransformer {
    /// The double blocks' modulations, the single blocks' and the output norm's.
    fn step_products(&self) -> Vec<&StepProduct> {
        let double = self.double.iter().flat_map(JointBlock::step_products);
        let single = self.single.iter().filter_map(SingleBlock::step_product);
        double
            .chain(single)
            .chain([self.norm_out.product()])
            .collect()
    }
}

/// `n` double-stream blocks of one shape under `transformer_blocks.<i>` (FLUX.1, Chroma, FLUX.2).
pub(super) fn double_blocks(n: usize, spec: BlockSpec, vb: &VarBuilder) -> Result<Vec<JointBlock>> {
    (0..n)
        .map(|i| JointBlock::new(spec, vb.pp(format!("transformer_blocks.{i}"))))
        .collect()
}

/// The double- and single-stream blocks of a FLUX.1-shaped model; `own_modulation`: each block
/// has its modulation layers (FLUX.1), or is given its modulation (Chroma).
pub(super) fn blocks(
    cfg: &FluxTransformerConfig,
    own_modulation: bool,
    vb: &VarBuilder,
) -> Result<(Vec<JointBlock>, Vec<SingleBlock>)> {
    let dim = cfg.hidden_size();
    let (heads, hd) = (cfg.num_attention_heads, cfg.attention_head_dim);
    let spec = BlockSpec {
        dim,
        heads,
        head_dim: hd,
        qk_norm: true,
        dual_attention: false,
        context_pre_only: false,
        order: TokenOrder::TextFirst,
        own_modulation,
        bias: true,
        ff: FeedForwardKind::Gelu,
    };
    let double = double_blocks(cfg.num_layers, spec, vb)?;
    let single = (0..cfg.num_single_layers)
        .map(|i| {
            SingleBlock::new(
                dim,
                heads,
                hd,
                4.0,
                own_modulation,
                vb.pp(format!("single_transformer_blocks.{i}")),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((double, single))
}

/// Rotary tables for `txt_len` text tokens (ids 0) followed by an `h x w` grid of packed latents
/// (ids `[0, row, col]`) and a reference grid (ids `[1, row, col]`), with FLUX.1's axes.
pub(super) fn rope(
    axes: &[usize],
    txt_len: usize,
    h: usize,
    w: usize,
    reference: Option<(usize, usize)>,
    device: &candle_core::Device,
) -> Result<Rope> {
    let mut ids = vec![vec![0.0; 3]; txt_len];
    for r in 0..h {
        for c in 0..w {
            ids.push(vec![0.0, r as f64, c as f64]);
        }
    }
    // Kontext's reference tokens: the same grid ids with the first axis set to 1.
    if let Some((rh, rw)) = reference {
        for r in 0..rh {
            for c in 0..rw {
                ids.push(vec![1.0, r as f64, c as f64]);
            }
        }
    }
    Rope::new(&ids, axes, ROPE_THETA, device)
}

/// Packed tokens (b, n, c) followed by an edit's reference tokens (1, m, c), the same for every
/// sample of the batch (Kontext's and FLUX.2's references): (b, n + m, c) in the tokens' dtype.
pub fn with_references(packed: &Tensor, references: Option<&Tensor>) -> Result<Tensor> {
    let Some(r) = references else {
        return Ok(packed.clone());
    };
    let (b, _, c) = packed.dims3()?;
    let r = r.to_dtype(packed.dtype())?;
    let r = r.broadcast_as((b, r.dim(1)?, c))?.contiguous()?;
    Tensor::cat(&[packed, &r], 1)
}

/// (b, c, h, w) -> (b, h/2 * w/2, c * 4): 2x2 patches, channel-major inside each patch.
pub fn pack(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h / 2, 2, w / 2, 2))?
        .permute((0, 2, 4, 1, 3, 5))?
        .reshape((b, (h / 2) * (w / 2), c * 4))
}

/// Inverse of [`pack`]: (b, h/2 * w/2, c * 4) -> (b, c, h, w).
pub fn unpack(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, _, c4) = x.dims3()?;
    let c = c4 / 4;
    x.reshape((b, h / 2, w / 2, c, 2, 2))?
        .permute((0, 3, 1, 4, 2, 5))?
        .reshape((b, c, h, w))
}
