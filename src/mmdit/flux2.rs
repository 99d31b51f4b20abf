//! `Flux2Transformer2DModel` (FLUX.2 [klein] and [dev]): FLUX.1's double-stream blocks without
//! biases, with SwiGLU feed-forwards and one modulation per stream shared by every block; parallel
//! single-stream blocks whose q/k/v and MLP input are one projection; 4-axis RoPE (t, h, w, l).

use super::attention::TokenOrder;
use super::cache::{run_two_stacks, BlockCache};
use super::embed::timestep_embedding;
use super::flux::double_blocks;
use super::joint_block::{BlockSpec, FeedForwardKind, JointBlock};
use super::modulation::{
    self, AdaNormContinuous, Modulation, ModulationOut, RemembersSteps, StepProduct,
};
use super::rope::Rope;
use super::Text;
use crate::config::Flux2TransformerConfig;
use crate::nn::{
    join_heads, join_heads_with, linear_with, merge_heads_with, sdpa, Activation, Linear, Mlp,
    RmsNorm, SwiGlu,
};
use crate::profile::{self, Phase};
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// FLUX.2's parallel single-stream block (diffusers `Flux2SingleTransformerBlock`): one projection
/// gives q, k, v and the SwiGLU input; one projection takes the attention and MLP outputs side by
/// side.
#[derive(Debug, Clone)]
pub struct ParallelBlock {
    to_qkv_mlp: Linear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
    to_out: Linear,
    heads: usize,
    inner: usize,
}

impl ParallelBlock {
    pub fn new(
        dim: usize,
        heads: usize,
        head_dim: usize,
        mlp: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let a = vb.pp("attn");
        Ok(Self {
            to_qkv_mlp: linear_with(dim, 3 * inner + 2 * mlp, false, a.pp("to_qkv_mlp_proj"))?,
            norm_q: RmsNorm::new(head_dim, 1e-6, a.pp("norm_q"))?,
            norm_k: RmsNorm::new(head_dim, 1e-6, a.pp("norm_k"))?,
            to_out: linear_with(inner + mlp, dim, false, a.pp("to_out"))?,
            heads,
            inner,
        })
    }

    /// x: (b, s + n, dim) joint tokens (text first); m: the shared single-stream modulation ->
    /// (b, s + n, dim)
    pub fn forward(&self, x: &Tensor, m: &ModulationOut, rope: &Rope) -> Result<Tensor> {
        let dev = x.device();
        let h = profile::phase(Phase::Norms, dev, || m.norm(x))?;
        let proj = profile::phase(Phase::QkvProjections, dev, || self.to_qkv_mlp.forward(&h))?;
        let inner = self.inner;
        let width = proj.dim(D::Minus1)?;
        let (b, n, _) = proj.dims3()?;
        // q, k and v token-major (b, n, h, d): each a copy of its columns of the fused projection.
        let part = |at: usize| -> Result<Tensor> {
            proj.narrow(D::Minus1, at, inner)?
                .reshape((b, n, self.heads, inner / self.heads))
        };
        let (q, k) = profile::phase(Phase::QkNorm, dev, || {
            // Normed, joined head-major and rotated in one pass each.
            let tables = Some(rope.tables());
            Ok((
                join_heads_with(&[&part(0)?], &[Some(&self.norm_q)], tables)?,
                join_heads_with(&[&part(inner)?], &[Some(&self.norm_k)], tables)?,
            ))
        })?;
        let v = profile::phase(Phase::Copies, dev, || join_heads(&[&part(2 * inner)?]))?;
        let mlp = proj.narrow(D::Minus1, 3 * inner, width - 3 * inner)?;
        let o = sdpa(&q, &k, &v)?;
        let mlp = profile::phase(Phase::FeedForward, dev, || SwiGlu::gate(&mlp))?;
        let joined = profile::phase(Phase::Copies, dev, || merge_heads_with(&o, &mlp))?;
        let out = profile::phase(Phase::OutputProjections, dev, || {
            self.to_out.forward(&joined)
        })?;
        profile::phase(Phase::Norms, dev, || m.gated(x, &out))
    }
}

#[derive(Debug, Clone)]
pub struct Flux2Transformer {
    x_embedder: Linear,
    context_embedder: Linear,
    timestep_embedder: Mlp,
    guidance_embedder: Option<Mlp>,
    mod_img: Modulation,
    mod_txt: Modulation,
    mod_single: Modulation,
    double: Vec<JointBlock>,
    single: Vec<ParallelBlock>,
    norm_out: AdaNormContinuous,
    proj_out: Linear,
    cfg: Flux2TransformerConfig,
}

impl Flux2Transformer {
    pub fn new(cfg: &Flux2TransformerConfig, vb: VarBuilder) -> Result<Self> {
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
            own_modulation: false,
            bias: false,
            ff: FeedForwardKind::SwiGlu(cfg.mlp_ratio),
        };
        let double = double_blocks(cfg.num_layers, spec, &vb)?;
        let single = (0..cfg.num_single_layers)
            .map(|i| {
                let b = vb.pp(format!("single_transformer_blocks.{i}"));
                ParallelBlock::new(dim, heads, hd, cfg.mlp_hidden(), b)
            })
            .collect::<Result<Vec<_>>>()?;
        let te = vb.pp("time_guidance_embed");
        let embedding = |name: &str| {
            Mlp::with_bias(
                (cfg.timestep_guidance_channels, dim, dim),
                Activation::Silu,
                ["linear_1", "linear_2"],
                false,
                te.pp(name),
            )
        };
        Ok(Self {
            x_embedder: linear_with(cfg.in_channels, dim, false, vb.pp("x_embedder"))?,
            context_embedder: linear_with(
                cfg.joint_attention_dim,
                dim,
                false,
                vb.pp("context_embedder"),
            )?,
            timestep_embedder: embedding("timestep_embedder")?,
            guidance_embedder: cfg
                .guidance_embeds
                .then(|| embedding("guidance_embedder"))
                .transpose()?,
            mod_img: Modulation::with_bias(dim, 2, false, vb.pp("double_stream_modulation_img"))?,
            mod_txt: Modulation::with_bias(dim, 2, false, vb.pp("double_stream_modulation_txt"))?,
            mod_single: Modulation::with_bias(dim, 1, false, vb.pp("single_stream_modulation"))?,
            double,
            single,
            norm_out: AdaNormContinuous::with_bias(dim, false, vb.pp("norm_out"))?,
            proj_out: linear_with(
                dim,
                cfg.patch_size * cfg.patch_size * cfg.out_channels(),
                false,
                vb.pp("proj_out"),
            )?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &Flux2TransformerConfig {
        &self.cfg
    }

    /// Rotary tables for `txt_len` text tokens (ids `[0, 0, 0, l]`) followed by an `h x w` grid of
    /// packed latents (ids `[0, row, col, 0]`) and the reference grids (ids `[10 (i + 1), row, col,
    /// 0]`), diffusers' `_prepare_text_ids`, `_prepare_latent_ids` and `_prepare_image_ids`.
    pub fn rope(
        &self,
        txt_len: usize,
        h: usize,
        w: usize,
        references: &[(usize, usize)],
        device: &candle_core::Device,
    ) -> Result<Rope> {
        let mut ids: Vec<Vec<f64>> = (0..txt_len)
            .map(|l| vec![0.0, 0.0, 0.0, l as f64])
            .collect();
        let grid = |ids: &mut Vec<Vec<f64>>, t: f64, h: usize, w: usize| {
            for r in 0..h {
                for c in 0..w {
                    ids.push(vec![t, r as f64, c as f64, 0.0]);
                }
            }
        };
        grid(&mut ids, 0.0, h, w);
        // `_prepare_image_ids`: reference i at time 10 (i + 1).
        for (i, &(rh, rw)) in references.iter().enumerate() {
            grid(&mut ids, 10.0 * (i + 1) as f64, rh, rw);
        }
        Rope::new(&ids, &self.cfg.axes_dims_rope, self.cfg.rope_theta, device)
    }

    /// Predicts the flow velocity on packed latents.
    ///
    /// # Shapes
    /// x: (b, n, in_channels) packed latents; sigma: (b,) in [0, 1] (scaled by 1000 inside);
    /// guidance: (b,) scale ([dev]); context: (b, s, joint_attention_dim); rope over s + n tokens
    /// -> (b, n, out_channels)
    pub fn forward(
        &self,
        x: &Tensor,
        sigma: &Tensor,
        guidance: Option<&Tensor>,
        context: &Tensor,
        rope: &Rope,
    ) -> Result<Tensor> {
        self.forward_cached(x, sigma, guidance, Text::Encoded(context), None, rope, None)
    }

    /// The text encoder's states (b, s, joint_attention_dim) through the context embedder: (b, s,
    /// dim), the same for every step of a request.
    pub fn embed_context(&self, context: &Tensor) -> Result<Tensor> {
        profile::phase(Phase::Embeddings, context.device(), || {
            self.context_embedder.forward(context)
        })
    }

    /// The conditioning embedding (b, dim) in `dtype` from sigma (b,) and guidance (b,).
    fn temb(&self, sigma: &Tensor, guidance: Option<&Tensor>, dtype: DType) -> Result<Tensor> {
        let embed = |t: &Tensor, m: &Mlp| -> Result<Tensor> {
            // diffusers rounds t x 1000 to the run dtype before embedding it.
            let t = (t.to_dtype(dtype)? * 1000.0)?;
            let f = timestep_embedding(&t, self.cfg.timestep_guidance_channels)?;
            m.forward(&f.to_dtype(dtype)?)
        };
        let mut temb = embed(sigma, &self.timestep_embedder)?;
        if let (Some(g), Some(m)) = (guidance, &self.guidance_embedder) {
            temb = (temb + embed(g, m)?)?;
        }
        Ok(temb)
    }

    /// Every step's conditioning embedding in `dtype` for a request's timesteps `ts` (sigma x
    /// 1000, taken to sigma as the pipeline does: `t / 1000` in f32) and guidance scale, for a
    /// batch of `rows`, with the shared modulation layers' products for all of them computed at
    /// once and remembered under `token` ([`modulation::remember_steps`]): one (rows, dim)
    /// embedding per timestep, for [`Self::forward_cached`]'s `temb`. None where they would take
    /// too much memory.
    pub fn remember_steps(
        &self,
        token: u64,
        ts: &[f32],
        guidance: Option<f32>,
        (rows, dtype): (usize, DType),
        dev: &candle_core::Device,
    ) -> Result<Option<Vec<Tensor>>> {
        let all = ts.len() * rows;
        profile::phase(Phase::Norms, dev, || {
            let shape = (ts.len(), rows);
            modulation::remember_steps(token, &self.step_products(), shape, dtype, || {
                let sigma = modulation::step_rows(ts.iter().map(|t| t / 1000.0), rows, dev)?;
                let g = guidance.map(|g| Tensor::full(g, all, dev)).transpose()?;
                self.temb(&sigma, g.as_ref(), dtype)
            })
        })
    }

    /// [`Self::forward`] with the blocks run under a step cache; `temb`: the step's conditioning
    /// embedding if remembered ([`Self::remember_steps`]), else computed from sigma and guidance.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_cached(
        &self,
        x: &Tensor,
        sigma: &Tensor,
        guidance: Option<&Tensor>,
        text: Text<'_>,
        temb: Option<&Tensor>,
        rope: &Rope,
        cache: Option<&mut dyn BlockCache>,
    ) -> Result<Tensor> {
        let dtype = x.dtype();
        let dev = x.device();
        let (img, temb, ctx) = profile::phase(Phase::Embeddings, dev, || {
            let temb = match temb {
                Some(temb) => temb.clone(),
                None => self.temb(sigma, guidance, dtype)?,
            };
            let img = self.x_embedder.forward(x)?;
            Ok((img, temb, text.embedded(&self.context_embedder)?))
        })?;
        let (mi, mt, ms) = profile::phase(Phase::Norms, dev, || {
            Ok((
                self.mod_img.forward_block(&temb)?,
                self.mod_txt.forward_block(&temb)?,
                self.mod_single.forward(&temb)?.remove(0),
            ))
        })?;
        let img = run_two_stacks(
            cache,
            (img, ctx),
            (self.double.len(), self.single.len()),
            |img| match self.double.is_empty() {
                true => ms.norm(img),
                false => mi.msa.norm(img),
            },
            |i, img, ctx| self.double[i].forward_given(img, ctx, &mi, &mt, Some(rope)),
            |i, joint| self.single[i].forward(joint, &ms, rope),
        )?;
        profile::phase(Phase::Final, dev, || {
            self.proj_out.forward(&self.norm_out.forward(&img, &temb)?)
        })
    }
}

impl RemembersSteps for Flux2Transformer {
    /// The shared modulations (image, text, single) and the output norm's.
    fn step_products(&self) -> Vec<&StepProduct> {
        let shared = [&self.mod_img, &self.mod_txt, &self.mod_single];
        let shared = shared.into_iter().map(Modulation::product);
        shared.chain([self.norm_out.product()]).collect()
    }
}
