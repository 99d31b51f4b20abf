//! FLUX.2 [klein] (diffusers `Flux2KleinPipeline`) and FLUX.2 [dev] (`Flux2Pipeline`): a language
//! model's hidden states of the chat-templated prompt (Qwen3's for [klein], Mistral Small 3.1's
//! after BFL's system message for [dev]), the FLUX.2 transformer on the VAE's 2x2 latent patches
//! (standardised by its batch-norm statistics) as tokens with (t, h, w, l) position ids, an edit's
//! reference images as more tokens, and linear sigmas with FLUX.2's empirical shift. [klein] guides
//! with classifier-free guidance as two model calls unless step-distilled; [dev] with its guidance
//! embedding.

use super::components::{LmPart, OpenCtx, TextLoader, TextPart};
use super::family::{
    Bound, Cfg, Defaults, Denoise, Edit, EmbeddedTexts, Family, StepEmbeddings, Transformer,
};
use crate::config::{
    Flux2TransformerConfig, Mistral3Config, Qwen3Config, SchedulerConfig, VaeConfig,
};
use crate::error::{Error, Message, Param, Result};
use crate::mmdit::cache::BlockCache;
use crate::mmdit::flux::with_references;
use crate::mmdit::modulation::RemembersSteps;
use crate::mmdit::rope::Rope;
use crate::mmdit::{Flux2Transformer, Text};
use crate::request::{self, Resolved};
use crate::sampling::{schedule, Schedule};
use crate::text::lm::LmKind;
use crate::text::{Conditioning, Flux2TextEncoder, PromptEncoder, FLUX2_SYSTEM_MESSAGE};
use candle_core::Tensor;
use candle_nn::VarBuilder;

/// The Qwen3 hidden states [klein] takes (diffusers' `text_encoder_out_layers`).
const QWEN3_LAYERS: [usize; 3] = [9, 18, 27];
/// The Mistral 3 hidden states [dev] takes.
const MISTRAL3_LAYERS: [usize; 3] = [10, 20, 30];

/// Which FLUX.2 pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// [klein]; step-distilled models (`is_distilled` in `model_index.json`) run without guidance.
    Klein { distilled: bool },
    /// [dev]: guidance through the transformer's guidance embedding, no negative prompt.
    Dev,
}

impl Variant {
    /// The pipeline's name in messages.
    fn label(self) -> &'static str {
        match self {
            Variant::Klein { .. } => "FLUX.2 [klein]",
            Variant::Dev => "FLUX.2 [dev]",
        }
    }
}

pub struct Flux2 {
    pub transformer: Flux2TransformerConfig,
    pub text: LmPart,
    pub variant: Variant,
}

pub(super) fn open_klein(c: &OpenCtx) -> Result<Box<dyn Family>> {
    let (qwen, _): (Qwen3Config, _) = c.config("text_encoder/config.json")?;
    let distilled = c
        .index
        .components
        .get("is_distilled")
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false);
    open(
        c,
        qwen,
        LmKind::Qwen3,
        &QWEN3_LAYERS,
        Variant::Klein { distilled },
    )
}

pub(super) fn open_dev(c: &OpenCtx) -> Result<Box<dyn Family>> {
    let (mistral, _): (Mistral3Config, _) = c.config("text_encoder/config.json")?;
    open(
        c,
        mistral.text().clone(),
        LmKind::Mistral3,
        &MISTRAL3_LAYERS,
        Variant::Dev,
    )
}

fn open(
    c: &OpenCtx,
    lm: Qwen3Config,
    kind: LmKind,
    layers: &[usize],
    variant: Variant,
) -> Result<Box<dyn Family>> {
    let (transformer, _): (Flux2TransformerConfig, _) = c.config("transformer/config.json")?;
    let name = kind.label();
    let pipeline = variant.label();
    c.check(
        lm.num_hidden_layers >= layers.iter().copied().max().unwrap_or(0),
        || {
            format!(
                "the {name} text encoder has {} layers; {pipeline} takes the hidden states after layers {layers:?}",
                lm.num_hidden_layers
            )
        },
    )?;
    c.check(
        transformer.joint_attention_dim == layers.len() * lm.hidden_size,
        || {
            format!(
                "the transformer's joint_attention_dim {} is not {} x the {name} width {}",
                transformer.joint_attention_dim,
                layers.len(),
                lm.hidden_size
            )
        },
    )?;
    c.check(c.vae.patch_size.is_some(), || {
        "the VAE is not a FLUX.2 VAE (AutoencoderKLFlux2: `patch_size` and batch-norm statistics)"
            .into()
    })?;
    c.check(transformer.in_channels == c.vae.sampler_channels(), || {
        format!(
            "the transformer takes {} input channels, the VAE's patches have {}",
            transformer.in_channels,
            c.vae.sampler_channels()
        )
    })?;
    Ok(Box::new(Flux2 {
        transformer,
        text: LmPart {
            dir: "text_encoder",
            tokenizer: "tokenizer",
            kind,
            config: lm,
            layers: layers.to_vec(),
        },
        variant,
    }))
}

/// diffusers' `compute_empirical_mu`: the shift for `tokens` image tokens and `steps` steps, a
/// line in the step count between fits at 10 and 200 steps (one fit above 4300 tokens).
pub fn empirical_mu(tokens: usize, steps: usize) -> f64 {
    let (a1, b1) = (8.73809524e-05, 1.89833333);
    let (a2, b2) = (0.00016927, 0.45666666);
    let n = tokens as f64;
    if tokens > 4300 {
        return a2 * n + b2;
    }
    let m200 = a2 * n + b2;
    let m10 = a1 * n + b1;
    let a = (m200 - m10) / 190.0;
    let b = m200 - 200.0 * a;
    a * steps as f64 + b
}

impl Family for Flux2 {
    fn describe(&self) -> String {
        let t = &self.transformer;
        let distilled = match self.variant {
            Variant::Klein { distilled: true } => " (step-distilled)",
            _ => "",
        };
        let text = self.text.kind.label();
        format!(
            "{}{distilled}: {} double + {} single blocks, width {}, {text} text encoder of width {}",
            self.variant.label(),
            t.num_layers,
            t.num_single_layers,
            t.hidden_size(),
            self.text.config.hidden_size
        )
    }

    fn defaults(&self, vae: &VaeConfig) -> Defaults {
        let m = vae.latent_factor();
        // diffusers' `Flux2KleinPipeline` and `Flux2Pipeline` defaults: 50 steps, guidance 4,
        // `default_sample_size` 128 VAE latents, text length 512. The presets carry the model
        // cards' own.
        Defaults {
            side: 128 * vae.scale_factor(),
            size_multiple: m,
            max_side: request::MAX_PIXELS / m,
            steps: 50,
            guidance: 4.0,
            max_sequence_length: 512,
            max_sequence_limit: 512,
        }
    }

    fn check(&self, r: &mut Resolved, model: &str) -> Result<()> {
        let pipeline = self.variant.label();
        if r.given.true_cfg {
            return Err(Error::InvalidRequest(
                Message::from(format!("{model} is a {pipeline} model: "))
                    .param(Param::TrueCfg)
                    .text(" is FLUX.1's; use ")
                    .param(Param::Guidance),
            ));
        }
        request::check_guidance(Param::Guidance, r.guidance)?;
        if self.variant == Variant::Dev && r.given.negative_prompt {
            r.notices.push(Message::about(Param::NegativePrompt).text(format!(
                " is ignored: {model} is FLUX.2 [dev], guided by its guidance embedding (--guidance), not against a negative prompt"
            )));
        }
        if self.variant == (Variant::Klein { distilled: true }) && r.given.guidance {
            r.notices.push(Message::about(Param::Guidance).text(format!(
                " {} is ignored: {model} is step-distilled and runs without guidance",
                r.guidance
            )));
        }
        Ok(())
    }

    /// [klein]: diffusers guides when the scale is above 1 and the model is not step-distilled,
    /// against "" (or the request's negative prompt), as two model calls. [dev]: never (its
    /// guidance is embedded).
    fn guidance(&self, r: &Resolved) -> Option<Cfg> {
        let cfg = self.variant == (Variant::Klein { distilled: false });
        (cfg && r.uses_cfg()).then_some(Cfg {
            scale: r.guidance,
            batched: false,
        })
    }

    /// Sigmas `linspace(1, 1/N, N)`, shifted by the scheduler with FLUX.2's empirical mu.
    fn schedule(&self, scheduler: &SchedulerConfig, n: usize, tokens: usize) -> Schedule {
        let base = schedule::linear_sigmas(n);
        Schedule::flow_match_custom(scheduler, &base, Some(empirical_mu(tokens, n)))
    }

    fn transformer(&self, vb: VarBuilder) -> candle_core::Result<Box<dyn Transformer>> {
        Ok(Box::new(Flux2Transformer::new(&self.transformer, vb)?))
    }

    fn text_parts(&self) -> Vec<TextPart> {
        vec![TextPart::Lm(self.text.clone())]
    }

    /// diffusers' `Flux2KleinPipeline(image=[...])` and `Flux2Pipeline(image=[...])`: the images
    /// are references.
    fn edit(&self) -> Edit {
        Edit::References
    }

    fn load_text(&self, load: &TextLoader) -> Result<Box<dyn PromptEncoder>> {
        Ok(Box::new(Flux2TextEncoder {
            lm: load.lm(&self.text)?,
            system: match self.variant {
                Variant::Dev => Some(FLUX2_SYSTEM_MESSAGE),
                Variant::Klein { .. } => None,
            },
            device: load.device.clone(),
            dtype: load.dtype,
        }))
    }
}

impl Transformer for Flux2Transformer {
    fn bind<'a>(
        &'a self,
        r: &Resolved,
        prompt: &Conditioning,
        hw: (usize, usize),
        references: &[Tensor],
        timesteps: &[f32],
    ) -> Bound<'a> {
        let (h, w) = hw;
        let dev = prompt.context.device();
        let txt = prompt.context.dim(1)?;
        let grids = references
            .iter()
            .map(|t| Ok(t.dims4().map(|(_, _, h, w)| (h, w))?))
            .collect::<Result<Vec<_>>>()?;
        // `prepare_image_latents`: each reference packed, one after the other.
        let tokens = references.iter().map(pack).collect::<Result<Vec<_>>>()?;
        let references = match tokens.is_empty() {
            true => None,
            false => Some(Tensor::cat(&tokens, 1)?),
        };
        // [dev]'s embedded guidance (`torch.full([1], guidance_scale)`), for models that embed it.
        let guidance = match self.config().guidance_embeds {
            true => Some(Tensor::new(&[r.guidance as f32], dev)?),
            false => None,
        };
        Ok(Box::new(Step {
            model: self,
            rope: self.rope(txt, h, w, &grids, dev)?,
            references,
            guidance_scale: self.config().guidance_embeds.then_some(r.guidance as f32),
            guidance,
            texts: EmbeddedTexts::default(),
            steps: StepEmbeddings::new(timesteps),
        }))
    }
}

/// `_pack_latents`: (b, C, h, w) -> (b, h w, C), one token per latent patch, row-major.
fn pack(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    Ok(x.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?)
}

/// The FLUX.2 transformer on the sampler's latents (b, C, h, w), with its rotary tables (every
/// prompt, the negative one too, is padded to the same length).
struct Step<'a> {
    model: &'a Flux2Transformer,
    rope: Rope,
    /// An edit's reference tokens (1, N, C) in the run dtype, after the generated ones.
    references: Option<Tensor>,
    /// The embedded guidance scale (1,) f32, for models with a guidance embedding.
    guidance: Option<Tensor>,
    guidance_scale: Option<f32>,
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
        let (b, ch, h, w) = x.dims4()?;
        // diffusers passes `timestep / 1000` and the model multiplies by 1000 again, both in f32.
        let sigma = Tensor::full(t / 1000.0, b, x.device())?;
        let packed = pack(x)?;
        let input = with_references(&packed, self.references.as_ref())?;
        let guidance = self
            .guidance
            .as_ref()
            .map(|g| g.broadcast_as(b)?.contiguous())
            .transpose()?;
        let text = (self.texts).get(&c.context, || self.model.embed_context(&c.context))?;
        // FLUX.2's step embedding takes no text; its steps are kept per stream all the same.
        let temb = self.steps.get(t, &c.pooled, |token, ts| {
            let (g, run) = (self.guidance_scale, (b, x.dtype()));
            self.model.remember_steps(token, ts, g, run, x.device())
        })?;
        let v = self.model.forward_cached(
            &input,
            &sigma,
            guidance.as_ref(),
            Text::Embedded(&text),
            temb.as_ref(),
            &self.rope,
            cache,
        )?;
        // The reference tokens' predictions are dropped.
        let v = v.narrow(1, 0, h * w)?;
        Ok(v.transpose(1, 2)?.reshape((b, ch, h, w))?)
    }
}

impl Drop for Step<'_> {
    fn drop(&mut self) {
        self.model.forget_steps(self.steps.token());
    }
}
