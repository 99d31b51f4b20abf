//! The SD3 / SD3.5 family (diffusers `StableDiffusion3Pipeline`): CLIP-L + CLIP-G + optional T5
//! text, the MMDiT on unpacked latents, classifier-free guidance on the guidance scale as one batch
//! of [negative, positive], the scheduler's own sigmas.

use super::components::{ClipPart, OpenCtx, T5Part, TextLoader, TextPart};
use super::family::{
    Bound, Cfg, Defaults, Denoise, EmbeddedTexts, Family, StepEmbeddings, Transformer,
};
use crate::config::{ClipTextConfig, SchedulerConfig, Sd3TransformerConfig, T5Config, VaeConfig};
use crate::error::{Error, Message, Param, Result};
use crate::mmdit::cache::BlockCache;
use crate::mmdit::modulation::RemembersSteps;
use crate::mmdit::{Sd3Transformer, Text};
use crate::request::{self, Resolved};
use crate::sampling::{schedule, Schedule};
use crate::text::{Conditioning, PromptEncoder, Sd3TextEncoders};
use candle_core::Tensor;
use candle_nn::VarBuilder;

/// An SD3 model's own configs.
pub struct Sd3 {
    pub transformer: Sd3TransformerConfig,
    pub clip_l: ClipPart,
    pub clip_g: ClipPart,
    pub t5: Option<T5Part>,
}

pub(super) fn open(c: &OpenCtx) -> Result<Box<dyn Family>> {
    let (transformer, _): (Sd3TransformerConfig, _) = c.config("transformer/config.json")?;
    let clip = |dir, tokenizer| -> Result<ClipPart> {
        let (config, _): (ClipTextConfig, _) = c.config(&format!("{dir}/config.json"))?;
        Ok(ClipPart {
            dir,
            tokenizer,
            config,
            projection: true,
        })
    };
    let (clip_l, clip_g) = (
        clip("text_encoder", "tokenizer")?,
        clip("text_encoder_2", "tokenizer_2")?,
    );
    let t5 = if c.index.has("text_encoder_3") {
        let (t5, config): (T5Config, _) = c.config("text_encoder_3/config.json")?;
        c.check_t5_width(&t5, transformer.joint_attention_dim)?;
        Some(T5Part {
            dir: "text_encoder_3",
            tokenizer: "tokenizer_3",
            config,
        })
    } else {
        None
    };
    let proj = |p: &ClipPart| p.config.projection_dim.unwrap_or(p.config.hidden_size);
    let pooled = proj(&clip_l) + proj(&clip_g);
    c.check(pooled == transformer.pooled_projection_dim, || {
        format!(
            "CLIP-L and CLIP-G pooled widths add up to {pooled} but the transformer expects pooled_projection_dim {}",
            transformer.pooled_projection_dim
        )
    })?;
    c.check_latent_channels(transformer.in_channels, 1)?;
    Ok(Box::new(Sd3 {
        transformer,
        clip_l,
        clip_g,
        t5,
    }))
}

impl Family for Sd3 {
    fn describe(&self) -> String {
        let t = &self.transformer;
        let mut v = format!(
            "SD3 MMDiT: {} layers, width {}",
            t.num_layers,
            t.hidden_size()
        );
        if t.use_qk_norm() {
            v += ", qk RMSNorm (SD3.5)";
        }
        if !t.dual_attention_layers.is_empty() {
            v += &format!(
                ", MMDiT-X dual attention on {} layers",
                t.dual_attention_layers.len()
            );
        }
        if self.t5.is_none() {
            v += ", no T5";
        }
        v
    }

    fn defaults(&self, vae: &VaeConfig) -> Defaults {
        let t = &self.transformer;
        // Pixels per latent-token side: VAE factor x patch size.
        let m = vae.scale_factor() * t.patch_size;
        Defaults {
            // The transformer's sample size in pixels (1024 for SD3).
            side: t.sample_size * vae.scale_factor(),
            size_multiple: m,
            // The position table covers pos_embed_max_size patches a side.
            max_side: (t.pos_embed_max_size * m).min(request::MAX_PIXELS / m),
            // diffusers `StableDiffusion3Pipeline.__call__`'s defaults; it refuses T5 beyond 512.
            steps: 28,
            guidance: 7.0,
            max_sequence_length: 256,
            max_sequence_limit: 512,
        }
    }

    fn check(&self, r: &mut Resolved, _model: &str) -> Result<()> {
        if r.given.true_cfg {
            return Err(Error::InvalidRequest(
                Message::about(Param::TrueCfg)
                    .text(" applies to Flux models; SD3 uses ")
                    .param(Param::Guidance)
                    .text(" for classifier-free guidance"),
            ));
        }
        Ok(())
    }

    fn guidance(&self, r: &Resolved) -> Option<Cfg> {
        r.uses_cfg().then_some(Cfg {
            scale: r.guidance,
            batched: true,
        })
    }

    fn schedule(&self, scheduler: &SchedulerConfig, steps: usize, tokens: usize) -> Schedule {
        let mu = scheduler
            .use_dynamic_shifting
            .then(|| schedule::calculate_shift(tokens, scheduler));
        Schedule::flow_match(scheduler, steps, mu)
    }

    fn transformer(&self, vb: VarBuilder) -> candle_core::Result<Box<dyn Transformer>> {
        Ok(Box::new(Sd3Transformer::new(&self.transformer, vb)?))
    }

    fn text_parts(&self) -> Vec<TextPart> {
        let mut v = vec![
            TextPart::Clip(self.clip_l.clone()),
            TextPart::Clip(self.clip_g.clone()),
        ];
        v.extend(self.t5.clone().map(TextPart::T5));
        v
    }

    fn load_text(&self, load: &TextLoader) -> Result<Box<dyn PromptEncoder>> {
        Ok(Box::new(Sd3TextEncoders {
            clip_l: load.clip(&self.clip_l)?,
            clip_g: load.clip(&self.clip_g)?,
            t5: self.t5.as_ref().map(|p| load.t5(p)).transpose()?,
            joint_attention_dim: self.transformer.joint_attention_dim,
            device: load.device.clone(),
            dtype: load.dtype,
        }))
    }
}

impl Transformer for Sd3Transformer {
    fn bind<'a>(
        &'a self,
        _: &Resolved,
        _: &Conditioning,
        _: (usize, usize),
        _: &[Tensor],
        timesteps: &[f32],
    ) -> Bound<'a> {
        Ok(Box::new(Step {
            model: self,
            texts: EmbeddedTexts::default(),
            steps: StepEmbeddings::new(timesteps),
        }))
    }
}

/// The SD3 transformer fed its timestep (sigma x 1000) for every sample of the batch.
struct Step<'a> {
    model: &'a Sd3Transformer,
    texts: EmbeddedTexts,
    steps: StepEmbeddings,
}

impl Denoise for Step<'_> {
    fn velocity(
        &self,
        x: &Tensor,
        t: f32,
        c: &Conditioning,
        cache: Option<&mut dyn BlockCache>,
    ) -> Result<Tensor> {
        let ts = Tensor::full(t, x.dim(0)?, x.device())?;
        let text = (self.texts).get(&c.context, || self.model.embed_context(&c.context))?;
        let temb = self.steps.get(t, &c.pooled, |token, ts| {
            self.model.remember_steps(token, ts, &c.pooled)
        })?;
        let text = Text::Embedded(&text);
        Ok(self
            .model
            .forward_cached(x, &ts, text, &c.pooled, temb.as_ref(), cache)?)
    }
}

impl Drop for Step<'_> {
    fn drop(&mut self) {
        self.model.forget_steps(self.steps.token());
    }
}
