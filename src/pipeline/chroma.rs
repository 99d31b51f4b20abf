//! Chroma (diffusers `ChromaPipeline`): FLUX.1-schnell's blocks with their modulation from one
//! approximator, T5 alone (its padding masked, all but the first padding token), FLUX.1's packing,
//! schedule and position ids, and classifier-free guidance on `guidance` as two model calls with a
//! negative prompt ("" by default).

use super::components::{OpenCtx, T5Part, TextLoader, TextPart};
use super::family::{Bound, Cfg, Defaults, Denoise, EmbeddedTexts, Family, Transformer};
use crate::config::{ChromaTransformerConfig, SchedulerConfig, T5Config, VaeConfig};
use crate::error::{Error, Message, Param, Result};
use crate::mmdit::cache::BlockCache;
use crate::mmdit::flux::{pack, unpack};
use crate::mmdit::rope::Rope;
use crate::mmdit::{ChromaTransformer, Text};
use crate::request::{self, Resolved};
use crate::sampling::{schedule, Schedule};
use crate::text::{ChromaTextEncoder, Conditioning, PromptEncoder};
use candle_core::Tensor;
use candle_nn::VarBuilder;

pub struct Chroma {
    pub transformer: ChromaTransformerConfig,
    pub t5: T5Part,
}

pub(super) fn open(c: &OpenCtx) -> Result<Box<dyn Family>> {
    let (transformer, _): (ChromaTransformerConfig, _) = c.config("transformer/config.json")?;
    let (t5, t5_path): (T5Config, _) = c.config("text_encoder/config.json")?;
    c.check_t5_width(&t5, transformer.flux.joint_attention_dim)?;
    c.check_latent_channels(transformer.flux.in_channels, 4)?;
    Ok(Box::new(Chroma {
        transformer,
        t5: T5Part {
            dir: "text_encoder",
            tokenizer: "tokenizer",
            config: t5_path,
        },
    }))
}

impl Family for Chroma {
    fn describe(&self) -> String {
        let t = &self.transformer;
        format!(
            "Chroma: {} double + {} single blocks, width {}, approximator {} x {}",
            t.flux.num_layers,
            t.flux.num_single_layers,
            t.flux.hidden_size(),
            t.approximator_layers,
            t.approximator_hidden_dim
        )
    }

    fn defaults(&self, vae: &VaeConfig) -> Defaults {
        let m = vae.scale_factor() * 2;
        // diffusers' `ChromaPipeline` defaults: 35 steps, guidance 5, T5 length 512,
        // `default_sample_size` 128 latent pixels. The presets carry the model cards' own.
        Defaults {
            side: 128 * vae.scale_factor(),
            size_multiple: m,
            max_side: request::MAX_PIXELS / m,
            steps: 35,
            guidance: 5.0,
            max_sequence_length: 512,
            max_sequence_limit: 512,
        }
    }

    fn check(&self, r: &mut Resolved, model: &str) -> Result<()> {
        if r.given.true_cfg {
            return Err(Error::InvalidRequest(
                Message::from(format!("{model} is a Chroma model: "))
                    .param(Param::TrueCfg)
                    .text(" is FLUX.1's; Chroma's ")
                    .param(Param::Guidance)
                    .text(" is already classifier-free guidance (with ")
                    .param(Param::NegativePrompt)
                    .text(", \"\" by default); drop ")
                    .param(Param::TrueCfg),
            ));
        }
        request::check_guidance(Param::Guidance, r.guidance)?;
        if !r.uses_cfg() && r.given.negative_prompt {
            r.notices.push(
                Message::about(Param::NegativePrompt)
                    .text(" has no effect: classifier-free guidance runs when ")
                    .param(Param::Guidance)
                    .text(format!(" > 1 (it is {})", r.guidance)),
            );
        }
        Ok(())
    }

    /// diffusers runs guidance when the scale is above 1, with "" as the default negative prompt,
    /// as two model calls.
    fn guidance(&self, r: &Resolved) -> Option<Cfg> {
        r.uses_cfg().then_some(Cfg {
            scale: r.guidance,
            batched: false,
        })
    }

    /// FLUX.1's: sigmas `linspace(1, 1/N, N)`, shifted by the scheduler.
    fn schedule(&self, scheduler: &SchedulerConfig, n: usize, tokens: usize) -> Schedule {
        let base = schedule::linear_sigmas(n);
        let mu = schedule::calculate_shift(tokens, scheduler);
        Schedule::flow_match_custom(scheduler, &base, Some(mu))
    }

    fn transformer(&self, vb: VarBuilder) -> candle_core::Result<Box<dyn Transformer>> {
        Ok(Box::new(ChromaTransformer::new(&self.transformer, vb)?))
    }

    fn text_parts(&self) -> Vec<TextPart> {
        vec![TextPart::T5(self.t5.clone())]
    }

    fn load_text(&self, load: &TextLoader) -> Result<Box<dyn PromptEncoder>> {
        Ok(Box::new(ChromaTextEncoder {
            t5: load.t5(&self.t5)?,
            device: load.device.clone(),
            dtype: load.dtype,
        }))
    }
}

impl Transformer for ChromaTransformer {
    fn bind<'a>(
        &'a self,
        _: &Resolved,
        prompt: &Conditioning,
        hw: (usize, usize),
        _: &[Tensor],
        _: &[f32],
    ) -> Bound<'a> {
        let (h, w) = hw;
        let dev = prompt.context.device();
        let txt = prompt.context.dim(1)?;
        Ok(Box::new(Step {
            model: self,
            rope: (txt, self.rope(txt, h / 2, w / 2, dev)?),
            texts: EmbeddedTexts::default(),
        }))
    }
}

/// The Chroma transformer on unpacked latents, with the rotary tables of the positive prompt's
/// length.
struct Step<'a> {
    model: &'a ChromaTransformer,
    rope: (usize, Rope),
    texts: EmbeddedTexts,
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
        // The negative prompt keeps its own length: its tables are made for it.
        let txt = c.context.dim(1)?;
        let own;
        let rope = if txt == self.rope.0 {
            &self.rope.1
        } else {
            own = self.model.rope(txt, h / 2, w / 2, x.device())?;
            &own
        };
        let text = (self.texts).get(&c.context, || self.model.embed_context(&c.context))?;
        let v = self
            .model
            .forward_cached(&packed, &sigma, Text::Embedded(&text), rope, cache)?;
        Ok(unpack(&v, h, w)?)
    }
}
