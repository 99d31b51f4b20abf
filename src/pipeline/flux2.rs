//! FLUX.2 [klein] (diffusers `Flux2KleinPipeline`): Qwen3's hidden states of the chat-templated
//! prompt, the FLUX.2 transformer on the VAE's 2x2 latent patches (standardised by its batch-norm
//! statistics) as tokens with (t, h, w, l) position ids, linear sigmas with FLUX.2's empirical
//! shift, and classifier-free guidance as two model calls unless the model is step-distilled.

use super::components::{OpenCtx, Qwen3Part, TextLoader, TextPart};
use super::family::{Bound, Cfg, Defaults, Denoise, Edit, Family, Transformer};
use crate::config::{Flux2TransformerConfig, Qwen3Config, SchedulerConfig, VaeConfig};
use crate::error::{Error, Message, Param, Result};
use crate::mmdit::cache::BlockCache;
use crate::mmdit::rope::Rope;
use crate::mmdit::Flux2Transformer;
use crate::request::{self, Resolved};
use crate::sampling::{schedule, Schedule};
use crate::text::{Conditioning, Flux2TextEncoder, PromptEncoder};
use candle_core::Tensor;
use candle_nn::VarBuilder;

/// The Qwen3 hidden states [klein] takes (diffusers' `text_encoder_out_layers`).
const QWEN3_LAYERS: [usize; 3] = [9, 18, 27];

pub struct Flux2 {
    pub transformer: Flux2TransformerConfig,
    pub qwen: Qwen3Part,
    /// Step-distilled: no classifier-free guidance (`is_distilled` in `model_index.json`).
    pub distilled: bool,
}

pub(super) fn open_klein(c: &OpenCtx) -> Result<Box<dyn Family>> {
    let (transformer, _): (Flux2TransformerConfig, _) = c.config("transformer/config.json")?;
    let (qwen, _): (Qwen3Config, _) = c.config("text_encoder/config.json")?;
    let taken = QWEN3_LAYERS.len();
    c.check(
        qwen.num_hidden_layers >= *QWEN3_LAYERS.iter().max().unwrap_or(&0),
        || {
            format!(
                "the Qwen3 text encoder has {} layers; FLUX.2 [klein] takes the hidden states after layers {QWEN3_LAYERS:?}",
                qwen.num_hidden_layers
            )
        },
    )?;
    c.check(
        transformer.joint_attention_dim == taken * qwen.hidden_size,
        || {
            format!(
                "the transformer's joint_attention_dim {} is not {taken} x the Qwen3 width {}",
                transformer.joint_attention_dim, qwen.hidden_size
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
    let distilled = c
        .index
        .components
        .get("is_distilled")
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false);
    Ok(Box::new(Flux2 {
        transformer,
        qwen: Qwen3Part {
            dir: "text_encoder",
            tokenizer: "tokenizer",
            config: qwen,
            layers: QWEN3_LAYERS.to_vec(),
        },
        distilled,
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
        format!(
            "FLUX.2 [klein]{}: {} double + {} single blocks, width {}, Qwen3 text encoder of width {}",
            if self.distilled { " (step-distilled)" } else { "" },
            t.num_layers,
            t.num_single_layers,
            t.hidden_size(),
            self.qwen.config.hidden_size
        )
    }

    fn defaults(&self, vae: &VaeConfig) -> Defaults {
        let m = vae.latent_factor();
        // diffusers' `Flux2KleinPipeline` defaults: 50 steps, guidance 4, `default_sample_size`
        // 128 VAE latents, Qwen3 length 512. The presets carry the model cards' own.
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
        if r.given.true_cfg {
            return Err(Error::InvalidRequest(
                Message::from(format!("{model} is a FLUX.2 [klein] model: "))
                    .param(Param::TrueCfg)
                    .text(" is FLUX.1's; use ")
                    .param(Param::Guidance),
            ));
        }
        request::check_guidance(Param::Guidance, r.guidance)?;
        if self.distilled && r.given.guidance {
            r.notices.push(Message::about(Param::Guidance).text(format!(
                " {} is ignored: {model} is step-distilled and runs without guidance",
                r.guidance
            )));
        }
        Ok(())
    }

    /// diffusers guides when the scale is above 1 and the model is not step-distilled, against
    /// "" (or the request's negative prompt), as two model calls.
    fn guidance(&self, r: &Resolved) -> Option<Cfg> {
        (!self.distilled && r.uses_cfg()).then_some(Cfg {
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
        vec![TextPart::Qwen3(self.qwen.clone())]
    }

    /// diffusers' `Flux2KleinPipeline(image=[...])`: the images are references.
    fn edit(&self) -> Edit {
        Edit::References
    }

    fn load_text(&self, load: &TextLoader) -> Result<Box<dyn PromptEncoder>> {
        Ok(Box::new(Flux2TextEncoder {
            qwen: load.qwen3(&self.qwen)?,
            device: load.device.clone(),
            dtype: load.dtype,
        }))
    }
}

impl Transformer for Flux2Transformer {
    fn bind<'a>(
        &'a self,
        _: &Resolved,
        prompt: &Conditioning,
        hw: (usize, usize),
        references: &[Tensor],
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
        Ok(Box::new(Step {
            model: self,
            rope: self.rope(txt, h, w, &grids, dev)?,
            references,
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
        let input = match &self.references {
            Some(r) => {
                let r = r.to_dtype(packed.dtype())?;
                let r = r.broadcast_as((b, r.dim(1)?, ch))?.contiguous()?;
                Tensor::cat(&[&packed, &r], 1)?
            }
            None => packed,
        };
        let v = self
            .model
            .forward_cached(&input, &sigma, None, &c.context, &self.rope, cache)?;
        // The reference tokens' predictions are dropped.
        let v = v.narrow(1, 0, h * w)?;
        Ok(v.transpose(1, 2)?.reshape((b, ch, h, w))?)
    }
}
