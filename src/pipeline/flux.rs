//! The Flux pipeline (diffusers `FluxPipeline`): CLIP-L pooled + T5 text, 2x2 latent packing with
//! 3-axis RoPE ids, linear sigmas with optional dynamic shift, embedded (dev) or true guidance.

use super::{
    check_finite, decode_latents, read_checked, resolve_common, seeded_noise, tensor_error,
    tokenizer_dir, Generated, RgbImage, Timings,
};
use crate::config::{
    ClipTextConfig, FluxTransformerConfig, ModelIndex, SchedulerConfig, T5Config, VaeConfig,
};
use crate::error::Result;
use crate::loader::FileSource;
use crate::mmdit::flux::{pack, unpack};
use crate::mmdit::rope::Rope;
use crate::mmdit::FluxTransformer;
use crate::request::{self, Request, Resolved};
use crate::sampling::{schedule, Schedule, Velocity};
use crate::text::clip::ClipText;
use crate::text::conditioning::Conditioning;
use crate::text::{FluxTextEncoders, TextTokenizer};
use crate::vae::VaeDecoder;
use candle_core::{DType, Device, Tensor};
use std::path::PathBuf;
use std::time::Instant;

/// diffusers' `FluxPipeline` default guidance (dev).
pub const FLUX_DEFAULT_GUIDANCE: f64 = 3.5;
/// diffusers' default steps; schnell (no guidance embedding) is distilled for 4.
pub const FLUX_DEFAULT_STEPS_DEV: usize = 28;
pub const FLUX_DEFAULT_STEPS_SCHNELL: usize = 4;
/// T5 lengths: 512 for dev, 256 for schnell (as the BFL reference code).
pub const FLUX_MAX_SEQ_DEV: usize = 512;
pub const FLUX_MAX_SEQ_SCHNELL: usize = 256;
/// `FluxPipeline.default_sample_size`, in latent pixels.
const DEFAULT_SAMPLE_SIZE: usize = 128;

pub struct FluxSpec {
    source: Box<dyn FileSource>,
    /// A single-file checkpoint that supplies some components (the rest come from `source`).
    pub single: Option<std::sync::Arc<crate::loader::single::SingleFile>>,
    pub name: String,
    pub index: ModelIndex,
    pub transformer: FluxTransformerConfig,
    pub vae: VaeConfig,
    pub scheduler: SchedulerConfig,
    pub clip: ClipTextConfig,
    pub t5: (T5Config, PathBuf),
}

impl FluxSpec {
    /// Where the model's files come from.
    pub fn source(&self) -> &dyn FileSource {
        self.source.as_ref()
    }

    pub(crate) fn weights(&self) -> super::Weights<'_> {
        super::Weights {
            src: self.source.as_ref(),
            single: self.single.as_deref(),
        }
    }

    pub fn open(source: Box<dyn FileSource>, index: ModelIndex, ip: PathBuf) -> Result<Self> {
        let src = source.as_ref();
        let (transformer, _): (FluxTransformerConfig, _) =
            read_checked(src, "transformer/config.json")?;
        let (vae, _): (VaeConfig, _) = read_checked(src, "vae/config.json")?;
        let (scheduler, _): (SchedulerConfig, _) =
            read_checked(src, "scheduler/scheduler_config.json")?;
        let (clip, _): (ClipTextConfig, _) = read_checked(src, "text_encoder/config.json")?;
        let (t5, p): (T5Config, _) = read_checked(src, "text_encoder_2/config.json")?;
        let ip = ip.as_path();
        crate::config::check(
            ip,
            clip.hidden_size == transformer.pooled_projection_dim,
            || {
                format!(
                    "CLIP width {} differs from the transformer's pooled_projection_dim {}",
                    clip.hidden_size, transformer.pooled_projection_dim
                )
            },
        )?;
        crate::config::check(ip, t5.d_model == transformer.joint_attention_dim, || {
            format!(
                "T5 width {} differs from the transformer's joint_attention_dim {}",
                t5.d_model, transformer.joint_attention_dim
            )
        })?;
        crate::config::check(
            ip,
            vae.latent_channels * 4 == transformer.in_channels,
            || {
                format!(
                "the VAE has {} latent channels but the transformer takes {} (= 4 x latent channels when packed)",
                vae.latent_channels, transformer.in_channels
            )
            },
        )?;
        Ok(Self {
            name: source.name(),
            single: None,
            source,
            index,
            transformer,
            vae,
            scheduler,
            clip,
            t5: (t5, p),
        })
    }

    /// Schnell-like models have no guidance embedding.
    pub fn is_schnell(&self) -> bool {
        !self.transformer.guidance_embeds
    }

    /// Image sides must be multiples of VAE factor x 2 (the 2x2 packing).
    pub fn size_multiple(&self) -> usize {
        self.vae.scale_factor() * 2
    }

    pub fn resolve(&self, req: &Request) -> Result<Resolved> {
        let schnell = self.is_schnell();
        let default_side = DEFAULT_SAMPLE_SIZE * self.vae.scale_factor();
        let steps = if schnell {
            FLUX_DEFAULT_STEPS_SCHNELL
        } else {
            FLUX_DEFAULT_STEPS_DEV
        };
        let max_seq = if schnell {
            FLUX_MAX_SEQ_SCHNELL
        } else {
            FLUX_MAX_SEQ_DEV
        };
        let max_side = request::MAX_PIXELS / self.size_multiple();
        let latent_channels = self.vae.latent_channels;
        let mut r = resolve_common(
            req,
            default_side,
            self.size_multiple(),
            max_side,
            steps,
            max_seq,
            FLUX_MAX_SEQ_DEV,
        )?;
        if let Some(noise) = &req.noise {
            let f = self.vae.scale_factor();
            super::check_noise(
                noise,
                [1, latent_channels, r.height / f, r.width / f],
                r.width,
                r.height,
            )?;
        }
        r.guidance = req.guidance.unwrap_or(FLUX_DEFAULT_GUIDANCE);
        request::check_guidance("guidance", r.guidance)?;
        if schnell && req.guidance.is_some() {
            r.notices.push(format!(
                "--guidance {} is ignored: this model ({}) has no guidance embedding; use --true-cfg with --negative-prompt for CFG",
                r.guidance, self.name
            ));
        }
        r.true_cfg = req.true_cfg.unwrap_or(1.0);
        request::check_guidance("true-cfg", r.true_cfg)?;
        if r.true_cfg > 1.0 && req.negative_prompt.is_none() {
            r.notices
                .push("--true-cfg has no effect without --negative-prompt".into());
        }
        Ok(r)
    }

    /// True CFG runs when the scale is above 1 and a negative prompt was given (diffusers' rule).
    fn uses_true_cfg(r: &Resolved, req_negative: bool) -> bool {
        r.true_cfg > 1.0 && req_negative
    }

    /// Sigmas `linspace(1, 1/N, N)`, shifted by the scheduler (dynamically from the packed sequence
    /// length when it asks for it).
    pub fn schedule(&self, r: &Resolved) -> Schedule {
        let n = r.steps;
        let base: Vec<f64> = (0..n)
            .map(|i| {
                if n == 1 {
                    1.0
                } else {
                    1.0 + (1.0 / n as f64 - 1.0) * i as f64 / (n - 1) as f64
                }
            })
            .collect();
        let f = self.size_multiple();
        let seq = (r.height / f) * (r.width / f);
        let mu = schedule::calculate_shift(seq, &self.scheduler);
        Schedule::flow_match_custom(&self.scheduler, &base, Some(mu))
    }

    pub fn load(self, device: &Device, dtype: DType) -> Result<FluxPipeline> {
        let w = self.weights();
        let transformer = FluxTransformer::new(
            &self.transformer,
            w.var_builder("transformer", dtype, device)?,
        )
        .map_err(tensor_error)?;
        let vae_dtype = super::vae_dtype(dtype, device);
        let vae = VaeDecoder::new(&self.vae, w.var_builder("vae", vae_dtype, device)?)
            .map_err(tensor_error)?;
        let text = self.load_text(device, dtype)?;
        Ok(FluxPipeline {
            spec: self,
            text: Some(text),
            keep_text: true,
            transformer,
            vae,
            device: device.clone(),
            dtype,
        })
    }

    /// Builds the text encoders (CLIP-L, T5) and their tokenizers.
    pub fn load_text(&self, device: &Device, dtype: DType) -> Result<FluxTextEncoders> {
        let src = self.source.as_ref();
        let w = self.weights();
        let clip = ClipText::new(
            &self.clip,
            false,
            w.var_builder("text_encoder", dtype, device)?,
        )
        .map_err(tensor_error)?;
        let tok = TextTokenizer::from_dir(&tokenizer_dir(src, "tokenizer")?)?;
        let full: candle_transformers::models::t5::Config = crate::config::read_json(&self.t5.1)?;
        let t5 = candle_transformers::models::t5::T5EncoderModel::load(
            w.var_builder("text_encoder_2", super::t5_dtype(dtype), device)?,
            &full,
        )
        .map_err(tensor_error)?;
        let t5_tok = TextTokenizer::from_dir(&tokenizer_dir(src, "tokenizer_2")?)?;
        Ok(FluxTextEncoders {
            clip_len: self.clip.max_position_embeddings,
            clip: (clip, tok),
            t5: (t5, t5_tok),
            device: device.clone(),
            dtype,
        })
    }
}

pub struct FluxPipeline {
    pub spec: FluxSpec,
    /// The text encoders; `None` once released (they are loaded again when next needed).
    pub text: Option<FluxTextEncoders>,
    /// Keep the text encoders loaded after encoding (default); `false` frees their memory for the
    /// denoising and decoding of a one-off generation.
    pub keep_text: bool,
    pub transformer: FluxTransformer,
    pub vae: VaeDecoder,
    pub device: Device,
    pub dtype: DType,
}

/// The Flux transformer on unpacked latents, with optional true CFG, as the solver sees it.
struct FluxVelocity<'a> {
    model: &'a FluxTransformer,
    pos: &'a Conditioning,
    neg: Option<(&'a Conditioning, f64)>,
    guidance: Option<Tensor>,
    rope: &'a Rope,
    dtype: DType,
}

impl Velocity for FluxVelocity<'_> {
    fn velocity(&mut self, x: &Tensor, _sigma: f32, t: f32, step: usize) -> Result<Tensor> {
        crate::interrupt::check()?;
        let (_, _, h, w) = x.dims4()?;
        let xp = pack(&x.to_dtype(self.dtype)?)?;
        // diffusers passes `timestep / 1000` and the model multiplies by 1000 again, both in f32.
        let sigma = Tensor::full(t / 1000.0, 1, x.device())?;
        let g = self.guidance.as_ref();
        let run = |c: &Conditioning| {
            self.model
                .forward(&xp, &sigma, g, &c.context, &c.pooled, self.rope)
        };
        let mut v = run(self.pos)?;
        if let Some((neg, scale)) = self.neg {
            let vn = run(neg)?;
            v = (&vn + ((v - &vn)? * scale)?)?;
        }
        let v = unpack(&v, h, w)?.to_dtype(DType::F32)?;
        check_finite(&v, "velocity", step, self.dtype)?;
        Ok(v)
    }
}

impl FluxPipeline {
    pub fn generate(&mut self, req: &Request, on_step: &mut dyn FnMut(usize)) -> Result<Generated> {
        let r = self.spec.resolve(req)?;
        let true_cfg = FluxSpec::uses_true_cfg(&r, req.negative_prompt.is_some());
        let mut timings = Timings::default();
        let t0 = Instant::now();
        let text = match &mut self.text {
            Some(t) => t,
            None => self
                .text
                .insert(self.spec.load_text(&self.device, self.dtype)?),
        };
        let (pos, mut truncations) = text.encode(&r.prompt, r.max_sequence_length)?;
        let neg = if true_cfg {
            let (n, cut) = text.encode(&r.negative_prompt, r.max_sequence_length)?;
            truncations.extend(cut);
            Some(n)
        } else {
            None
        };
        if !self.keep_text {
            self.text = None;
        }
        self.device.synchronize()?;
        timings.text = t0.elapsed();

        let f = self.spec.vae.scale_factor();
        let (h, w) = (r.height / f, r.width / f);
        let noise = match &req.noise {
            Some(n) => n.to_device(&self.device)?.to_dtype(DType::F32)?,
            None => seeded_noise(
                r.seed,
                (1, self.spec.vae.latent_channels, h, w),
                &self.device,
            )?,
        };
        let rope = self
            .transformer
            .rope(pos.context.dim(1)?, h / 2, w / 2, &self.device)?;
        let guidance = if self.transformer.config().guidance_embeds {
            Some(Tensor::full(r.guidance as f32, 1, &self.device)?)
        } else {
            None
        };
        let sched = self.spec.schedule(&r);
        let mut model = FluxVelocity {
            model: &self.transformer,
            pos: &pos,
            neg: neg.as_ref().map(|n| (n, r.true_cfg)),
            guidance,
            rope: &rope,
            dtype: self.dtype,
        };
        let (latents, steps) = super::sample(&mut model, &r, &sched, noise, self.dtype, on_step)?;
        timings.steps = steps;
        let t0 = Instant::now();
        let image = self.decode(&latents)?;
        timings.decode = t0.elapsed();
        Ok(Generated {
            image,
            latents,
            request: r,
            timings,
            truncations,
        })
    }

    pub fn decode(&self, latents: &Tensor) -> Result<RgbImage> {
        decode_latents(&self.vae, latents, self.dtype)
    }
}
