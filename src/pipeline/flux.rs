//! The FLUX.1 family (diffusers `FluxPipeline`): CLIP-L pooled + T5 text, 2x2 latent packing with
//! 3-axis RoPE ids, linear sigmas with the scheduler's (dynamic) shift, embedded guidance (dev) and
//! true classifier-free guidance with a negative prompt as two model calls.

use super::components::{ClipPart, OpenCtx, T5Part, TextLoader, TextPart};
use super::family::{
    Bound, Cfg, Defaults, Denoise, Edit, EmbeddedTexts, Family, StepEmbeddings, Transformer,
};
use crate::config::{ClipTextConfig, FluxTransformerConfig, SchedulerConfig, T5Config, VaeConfig};
use crate::error::{Error, Message, Param, Result};
use crate::mmdit::cache::BlockCache;
use crate::mmdit::flux::{pack, unpack, with_references};
use crate::mmdit::modulation::RemembersSteps;
use crate::mmdit::rope::Rope;
use crate::mmdit::{FluxTransformer, Text};
use crate::request::{self, Resolved};
use crate::sampling::{schedule, Schedule};
use crate::text::{Conditioning, FluxTextEncoders, PromptEncoder};
use candle_core::Tensor;
use candle_nn::VarBuilder;

/// A FLUX.1 model's own configs.
/// Which FLUX.1 pipeline a model is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// `FluxPipeline` (schnell and dev).
    Text,
    /// `FluxFillPipeline`: the masked image and the mask are extra input channels.
    Fill,
    /// `FluxKontextPipeline`: a reference image's tokens join the sequence.
    Kontext,
}

pub struct Flux {
    pub variant: Variant,
    pub transformer: FluxTransformerConfig,
    pub clip: ClipPart,
    pub t5: T5Part,
}

pub(super) fn open(c: &OpenCtx) -> Result<Box<dyn Family>> {
    open_as(c, Variant::Text)
}

/// FLUX.1 Kontext: the FLUX.1 transformer, with the reference image's latents as extra tokens
/// (diffusers `FluxKontextPipeline`).
pub(super) fn open_kontext(c: &OpenCtx) -> Result<Box<dyn Family>> {
    open_as(c, Variant::Kontext)
}

/// FLUX.1 Fill: the transformer takes, per 2x2 patch, the latents, the masked image's latents and
/// the mask folded into f x f channels per latent pixel (diffusers `FluxFillPipeline`).
pub(super) fn open_fill(c: &OpenCtx) -> Result<Box<dyn Family>> {
    open_as(c, Variant::Fill)
}

fn open_as(c: &OpenCtx, variant: Variant) -> Result<Box<dyn Family>> {
    let fill = variant == Variant::Fill;
    let (transformer, _): (FluxTransformerConfig, _) = c.config("transformer/config.json")?;
    let (clip, _): (ClipTextConfig, _) = c.config("text_encoder/config.json")?;
    let (t5, t5_path): (T5Config, _) = c.config("text_encoder_2/config.json")?;
    c.check(
        clip.hidden_size == transformer.pooled_projection_dim,
        || {
            format!(
                "CLIP width {} differs from the transformer's pooled_projection_dim {}",
                clip.hidden_size, transformer.pooled_projection_dim
            )
        },
    )?;
    c.check_t5_width(&t5, transformer.joint_attention_dim)?;
    if fill {
        let (l, f) = (c.vae.latent_channels, c.vae.scale_factor());
        let want = 4 * (2 * l + f * f);
        c.check(transformer.in_channels == want, || {
            format!(
                "a FLUX.1 Fill transformer takes 4 x (2 x {l} latent + {f}x{f} mask) = {want} input channels, this one {}",
                transformer.in_channels
            )
        })?;
        c.check(transformer.out_channels() == 4 * l, || {
            format!(
                "a FLUX.1 Fill transformer gives 4 x {l} = {} output channels, this one {}",
                4 * l,
                transformer.out_channels()
            )
        })?;
    } else {
        c.check_latent_channels(transformer.in_channels, 4)?;
    }
    Ok(Box::new(Flux {
        variant,
        transformer,
        clip: ClipPart {
            dir: "text_encoder",
            tokenizer: "tokenizer",
            config: clip,
            projection: false,
        },
        t5: T5Part {
            dir: "text_encoder_2",
            tokenizer: "tokenizer_2",
            config: t5_path,
        },
    }))
}

impl Flux {
    /// Schnell-like models have no guidance embedding.
    pub fn is_schnell(&self) -> bool {
        !self.transformer.guidance_embeds
    }
}

/// TeaCache's rescaling polynomial for FLUX.1 (TeaCache4FLUX's fit of the output's change
/// against the modulated input's, highest power first).
const TEACACHE_FLUX: &[f64] = &[
    4.98651651e+02,
    -2.83781631e+02,
    5.58554382e+01,
    -3.82021401e+00,
    2.64230861e-01,
];

impl Family for Flux {
    fn describe(&self) -> String {
        let t = &self.transformer;
        format!(
            "FLUX.1 {}: {} double + {} single blocks, width {}",
            if self.variant == Variant::Fill {
                "Fill (masked image and mask as input channels)"
            } else if self.variant == Variant::Kontext {
                "Kontext (reference image tokens)"
            } else if t.guidance_embeds {
                "dev-like (guidance embedding)"
            } else {
                "schnell-like"
            },
            t.num_layers,
            t.num_single_layers,
            t.hidden_size()
        )
    }

    fn defaults(&self, vae: &VaeConfig) -> Defaults {
        // Image sides are multiples of VAE factor x 2 (the 2x2 packing).
        let m = vae.scale_factor() * 2;
        // diffusers' `FluxPipeline` defaults: 28 steps (schnell, without a guidance embedding, is
        // distilled for 4), guidance 3.5, `default_sample_size` 128 latent pixels; T5 lengths 512
        // for dev and 256 for schnell, as the BFL reference code.
        // `FluxFillPipeline`: 50 steps, guidance 30.
        let (steps, max_sequence_length) = if self.variant == Variant::Fill {
            (50, 512)
        } else if self.is_schnell() {
            (4, 256)
        } else {
            (28, 512)
        };
        Defaults {
            side: 128 * vae.scale_factor(),
            size_multiple: m,
            max_side: request::MAX_PIXELS / m,
            steps,
            guidance: if self.variant == Variant::Fill {
                30.0
            } else {
                3.5
            },
            max_sequence_length,
            max_sequence_limit: 512,
        }
    }

    fn check(&self, r: &mut Resolved, model: &str) -> Result<()> {
        if self.variant == Variant::Kontext && r.init.is_none() {
            return Err(Error::InvalidRequest(
                Message::from(format!(
                    "{model} is a FLUX.1 Kontext model: it edits a reference image; pass "
                ))
                .param(Param::Image),
            ));
        }
        if self.variant == Variant::Fill && r.init.as_ref().is_none_or(|i| i.mask.is_none()) {
            return Err(Error::InvalidRequest(
                Message::from(format!(
                    "{model} is a FLUX.1 Fill model: it repaints where a mask says; pass "
                ))
                .param(Param::Image)
                .text(" and ")
                .param(Param::Mask),
            ));
        }
        if self.is_schnell() && r.given.guidance {
            r.notices.push(
                Message::about(Param::Guidance)
                    .text(format!(
                        " {} is ignored: this model ({model}) has no guidance embedding; use ",
                        r.guidance
                    ))
                    .param(Param::TrueCfg)
                    .text(" with ")
                    .param(Param::NegativePrompt)
                    .text(" for CFG"),
            );
        }
        request::check_guidance(Param::TrueCfg, r.true_cfg)?;
        if r.true_cfg > 1.0 && !r.given.negative_prompt {
            r.notices.push(
                Message::about(Param::TrueCfg)
                    .text(" has no effect without ")
                    .param(Param::NegativePrompt),
            );
        }
        Ok(())
    }

    /// True CFG runs when the scale is above 1 and a negative prompt was given (diffusers' rule).
    fn guidance(&self, r: &Resolved) -> Option<Cfg> {
        (r.true_cfg > 1.0 && r.given.negative_prompt).then_some(Cfg {
            scale: r.true_cfg,
            batched: false,
        })
    }

    /// Sigmas `linspace(1, 1/N, N)`, shifted by the scheduler (dynamically from the packed
    /// sequence length when it asks for it).
    fn schedule(&self, scheduler: &SchedulerConfig, n: usize, tokens: usize) -> Schedule {
        let base = schedule::linear_sigmas(n);
        let mu = schedule::calculate_shift(tokens, scheduler);
        Schedule::flow_match_custom(scheduler, &base, Some(mu))
    }

    fn transformer(&self, vb: VarBuilder) -> candle_core::Result<Box<dyn Transformer>> {
        Ok(Box::new(FluxTransformer::new(&self.transformer, vb)?))
    }

    fn text_parts(&self) -> Vec<TextPart> {
        vec![
            TextPart::Clip(self.clip.clone()),
            TextPart::T5(self.t5.clone()),
        ]
    }

    fn edit(&self) -> Edit {
        match self.variant {
            Variant::Text => Edit::Latents,
            Variant::Fill => Edit::MaskChannels,
            Variant::Kontext => Edit::Reference,
        }
    }

    fn default_strength(&self) -> f64 {
        // `FluxFillPipeline` repaints the masked region from noise by default.
        if self.variant == Variant::Fill {
            1.0
        } else {
            0.6
        }
    }

    fn teacache_rescale(&self) -> &'static [f64] {
        TEACACHE_FLUX
    }

    fn load_text(&self, load: &TextLoader) -> Result<Box<dyn PromptEncoder>> {
        Ok(Box::new(FluxTextEncoders {
            clip: load.clip(&self.clip)?,
            t5: load.t5(&self.t5)?,
            device: load.device.clone(),
            dtype: load.dtype,
        }))
    }
}

impl Transformer for FluxTransformer {
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
        // Kontext takes one reference.
        let reference = references.first();
        let reference = reference.map(|t| t.dims4().map(|d| (t, d))).transpose()?;
        let ref_grid = reference.map(|(_, (_, _, rh, rw))| (rh / 2, rw / 2));
        let rope = self.rope(prompt.context.dim(1)?, h / 2, w / 2, ref_grid, dev)?;
        let reference = reference.map(|(t, _)| pack(t)).transpose()?;
        let guidance = if self.config().guidance_embeds {
            Some(Tensor::full(r.guidance as f32, 1, dev)?)
        } else {
            None
        };
        Ok(Box::new(Step {
            model: self,
            rope,
            guidance_scale: self.config().guidance_embeds.then_some(r.guidance as f32),
            guidance,
            reference,
            texts: EmbeddedTexts::default(),
            steps: StepEmbeddings::new(timesteps),
        }))
    }
}

/// The Flux transformer on unpacked latents, with its rotary tables and guidance for one request.
struct Step<'a> {
    model: &'a FluxTransformer,
    rope: Rope,
    guidance: Option<Tensor>,
    guidance_scale: Option<f32>,
    /// Kontext's packed reference tokens (1, n', C x 4), after the image tokens.
    reference: Option<Tensor>,
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
        let (_, _, h, w) = x.dims4()?;
        // diffusers passes `timestep / 1000` and the model multiplies by 1000 again, both in f32.
        let sigma = Tensor::full(t / 1000.0, x.dim(0)?, x.device())?;
        let packed = pack(x)?;
        let n = packed.dim(1)?;
        let input = with_references(&packed, self.reference.as_ref())?;
        // One guidance value for every sample of the batch.
        let guidance = self
            .guidance
            .as_ref()
            .map(|g| g.broadcast_as(x.dim(0)?)?.contiguous())
            .transpose()?;
        let text = (self.texts).get(&c.context, || self.model.embed_context(&c.context))?;
        let temb = self.steps.get(t, &c.pooled, |token, ts| {
            let dtype = x.dtype();
            (self.model).remember_steps(token, ts, self.guidance_scale, &c.pooled, dtype)
        })?;
        let v = self.model.forward_cached(
            &input,
            &sigma,
            guidance.as_ref(),
            Text::Embedded(&text),
            &c.pooled,
            temb.as_ref(),
            &self.rope,
            cache,
        )?;
        // The reference tokens' predictions are dropped.
        Ok(unpack(&v.narrow(1, 0, n)?, h, w)?)
    }
}

impl Drop for Step<'_> {
    fn drop(&mut self) {
        self.model.forget_steps(self.steps.token());
    }
}
