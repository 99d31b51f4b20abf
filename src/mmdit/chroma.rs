//! `ChromaTransformer2DModel`: FLUX.1-schnell's blocks without their modulation layers; one
//! approximator computes every block's (shift, scale, gate) rows from the timestep alone. No
//! pooled text, no guidance embedding.

use super::cache::{run_two_stacks, BlockCache};
use super::embed::Approximator;
use super::flux::blocks;
use super::joint_block::JointBlock;
use super::modulation::{BlockModulation, ModulationOut};
use super::rope::Rope;
use super::single_block::SingleBlock;
use super::Text;
use crate::config::ChromaTransformerConfig;
use crate::nn::modulate::norm_modulate;
use crate::nn::{linear, Linear};
use crate::profile::{self, Phase};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// The output norm's LayerNorm epsilon.
const EPS: f64 = 1e-6;

#[derive(Debug, Clone)]
pub struct ChromaTransformer {
    x_embedder: Linear,
    context_embedder: Linear,
    approximator: Approximator,
    double: Vec<JointBlock>,
    single: Vec<SingleBlock>,
    proj_out: Linear,
    cfg: ChromaTransformerConfig,
}

/// One row of the approximator's output: (b, dim).
fn row(m: &Tensor, i: usize) -> Result<Tensor> {
    m.narrow(1, i, 1)?.squeeze(1)
}

/// Rows `i, i + 1, i + 2`: one (shift, scale, gate) triple.
fn triple(m: &Tensor, i: usize) -> Result<ModulationOut> {
    Ok(ModulationOut {
        shift: row(m, i)?,
        scale: row(m, i + 1)?,
        gate: row(m, i + 2)?,
    })
}

/// Rows `i..i + 6`: a stream's attention then feed-forward triple.
fn block_rows(m: &Tensor, i: usize) -> Result<BlockModulation> {
    Ok(BlockModulation {
        msa: triple(m, i)?,
        mlp: triple(m, i + 3)?,
        msa2: None,
    })
}

impl ChromaTransformer {
    pub fn new(cfg: &ChromaTransformerConfig, vb: VarBuilder) -> Result<Self> {
        let f = &cfg.flux;
        let dim = f.hidden_size();
        let (double, single) = blocks(f, false, &vb)?;
        Ok(Self {
            x_embedder: linear(f.in_channels, dim, vb.pp("x_embedder"))?,
            context_embedder: linear(f.joint_attention_dim, dim, vb.pp("context_embedder"))?,
            approximator: Approximator::new(
                cfg.approximator_num_channels,
                cfg.approximator_hidden_dim,
                dim,
                cfg.approximator_layers,
                cfg.modulation_rows(),
                vb.pp("distilled_guidance_layer"),
            )?,
            double,
            single,
            proj_out: linear(
                dim,
                f.patch_size * f.patch_size * f.out_channels(),
                vb.pp("proj_out"),
            )?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ChromaTransformerConfig {
        &self.cfg
    }

    /// Rotary tables for `txt_len` text tokens followed by an `h x w` grid of packed latents, as
    /// FLUX.1's.
    pub fn rope(
        &self,
        txt_len: usize,
        h: usize,
        w: usize,
        device: &candle_core::Device,
    ) -> Result<Rope> {
        super::flux::rope(&self.cfg.flux.axes_dims_rope, txt_len, h, w, None, device)
    }

    /// Predicts the flow velocity on packed latents.
    ///
    /// The text is the prompt's tokens up to and including the first padding token: the model
    /// masks the rest, and masked tokens change nothing else (their position ids are all 0).
    ///
    /// # Shapes
    /// x: (b, n, in_channels) packed latents; sigma: (b,) in [0, 1] (scaled by 1000 inside);
    /// context: (b, s, joint_attention_dim); rope over s + n tokens -> (b, n, out_channels)
    pub fn forward(
        &self,
        x: &Tensor,
        sigma: &Tensor,
        context: &Tensor,
        rope: &Rope,
    ) -> Result<Tensor> {
        self.forward_cached(x, sigma, Text::Encoded(context), rope, None)
    }

    /// The text encoder's states (b, s, joint_attention_dim) through the context embedder: (b, s,
    /// dim), the same for every step of a request.
    pub fn embed_context(&self, context: &Tensor) -> Result<Tensor> {
        profile::phase(Phase::Embeddings, context.device(), || {
            self.context_embedder.forward(context)
        })
    }

    /// [`Self::forward`] with the blocks run under a step cache.
    pub fn forward_cached(
        &self,
        x: &Tensor,
        sigma: &Tensor,
        text: Text<'_>,
        rope: &Rope,
        cache: Option<&mut dyn BlockCache>,
    ) -> Result<Tensor> {
        let dtype = x.dtype();
        let dev = x.device();
        let (img, m, ctx) = profile::phase(Phase::Embeddings, dev, || {
            let img = self.x_embedder.forward(x)?; // (b, n, dim)
                                                   // diffusers rounds t x 1000 to the run dtype before embedding it.
            let t = (sigma.to_dtype(dtype)? * 1000.0)?;
            let m = self.approximator.forward(&t, dtype)?; // (b, rows, dim)
            Ok((img, m, text.embedded(&self.context_embedder)?))
        })?;
        let (nd, ns) = (self.double.len(), self.single.len());
        // Rows: single blocks' triples, the double blocks' image rows, their text rows, the
        // output norm's (shift, scale).
        let img_rows = 3 * ns;
        let txt_rows = img_rows + 6 * nd;
        let img = run_two_stacks(
            cache,
            (img, ctx),
            (nd, ns),
            |img| match nd {
                0 => triple(&m, 0)?.norm(img),
                _ => block_rows(&m, img_rows)?.msa.norm(img),
            },
            |i, img, ctx| {
                let mi = block_rows(&m, img_rows + 6 * i)?;
                let mt = block_rows(&m, txt_rows + 6 * i)?;
                self.double[i].forward_given(img, ctx, &mi, &mt, Some(rope))
            },
            |i, joint| self.single[i].forward_given(joint, &triple(&m, 3 * i)?, rope),
        )?;
        profile::phase(Phase::Final, dev, || {
            let last = m.dim(1)? - 2;
            let (shift, scale) = (row(&m, last)?, row(&m, last + 1)?);
            self.proj_out
                .forward(&norm_modulate(&img, EPS, &shift, &scale)?)
        })
    }
}
