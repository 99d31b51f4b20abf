//! The SD3 pipeline (diffusers `StableDiffusion3Pipeline`): glue between configs, text encoders,
//! transformer, sampler and VAE.
//!
//! Loading is split in two so that every check on the request runs before any weight is read:
//! [`Sd3Spec::open`] reads and validates the configs, [`Sd3Spec::resolve`] checks a request against
//! them, [`Sd3Spec::load`] maps the weights.

use super::{
    check_finite, check_noise, decode_latents, read_checked, resolve_common, seeded_noise,
    tensor_error, tokenizer_dir, Generated, RgbImage, Timings,
};
use crate::config::{
    self, ClipTextConfig, ModelIndex, SchedulerConfig, Sd3TransformerConfig, T5Config, VaeConfig,
};
use crate::error::{Error, Result};
use crate::loader::FileSource;
use crate::mmdit::Sd3Transformer;
use crate::request::{self, Request, Resolved};
use crate::sampling::{schedule, Schedule, Velocity};
use crate::text::clip::ClipText;
use crate::text::conditioning::{Conditioning, Truncation};
use crate::text::{Sd3TextEncoders, TextTokenizer};
use crate::vae::VaeDecoder;
use candle_core::{DType, Device, Tensor};
use std::path::PathBuf;
use std::time::Instant;

/// Default steps, guidance and T5 length of the SD3 pipeline (diffusers `StableDiffusion3Pipeline.__call__`).
pub const SD3_DEFAULT_STEPS: usize = 28;
pub const SD3_DEFAULT_GUIDANCE: f64 = 7.0;
pub const SD3_DEFAULT_MAX_SEQ: usize = 256;
/// The SD3 pipeline refuses longer T5 sequences.
pub const SD3_MAX_SEQ: usize = 512;

/// A model's configs, read and validated; no weights touched yet.
pub struct Sd3Spec {
    source: Box<dyn FileSource>,
    /// A single-file checkpoint that supplies some components (the rest come from `source`).
    pub single: Option<std::sync::Arc<crate::loader::single::SingleFile>>,
    pub name: String,
    pub index: ModelIndex,
    pub transformer: Sd3TransformerConfig,
    pub vae: VaeConfig,
    pub scheduler: SchedulerConfig,
    pub clip_l: ClipTextConfig,
    pub clip_g: ClipTextConfig,
    pub t5: Option<(T5Config, PathBuf)>,
}

impl Sd3Spec {
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

    /// Reads every component config of an SD3 pipeline (whose `model_index.json` is `index`, read
    /// from `ip`) and validates them.
    pub fn open(source: Box<dyn FileSource>, index: ModelIndex, ip: PathBuf) -> Result<Self> {
        let src = source.as_ref();
        let (transformer, _): (Sd3TransformerConfig, _) =
            read_checked(src, "transformer/config.json")?;
        let (vae, _): (VaeConfig, _) = read_checked(src, "vae/config.json")?;
        let (scheduler, _): (SchedulerConfig, _) =
            read_checked(src, "scheduler/scheduler_config.json")?;
        let (clip_l, _): (ClipTextConfig, _) = read_checked(src, "text_encoder/config.json")?;
        let (clip_g, _): (ClipTextConfig, _) = read_checked(src, "text_encoder_2/config.json")?;
        let t5 = if index.has("text_encoder_3") {
            let (c, p): (T5Config, _) = read_checked(src, "text_encoder_3/config.json")?;
            Some((c, p))
        } else {
            None
        };
        let spec = Self {
            name: source.name(),
            single: None,
            source,
            index,
            transformer,
            vae,
            scheduler,
            clip_l,
            clip_g,
            t5,
        };
        spec.check_coupling(&ip)?;
        Ok(spec)
    }

    /// Widths that must agree between components.
    fn check_coupling(&self, index: &std::path::Path) -> Result<()> {
        let proj = |c: &ClipTextConfig| c.projection_dim.unwrap_or(c.hidden_size);
        let pooled = proj(&self.clip_l) + proj(&self.clip_g);
        config::check(
            index,
            pooled == self.transformer.pooled_projection_dim,
            || {
                format!(
                "CLIP-L and CLIP-G pooled widths add up to {pooled} but the transformer expects pooled_projection_dim {}",
                self.transformer.pooled_projection_dim
            )
            },
        )?;
        config::check(
            index,
            self.vae.latent_channels == self.transformer.in_channels,
            || {
                format!(
                    "the VAE has {} latent channels but the transformer takes {}",
                    self.vae.latent_channels, self.transformer.in_channels
                )
            },
        )?;
        if let Some((t5, _)) = &self.t5 {
            config::check(
                index,
                t5.d_model == self.transformer.joint_attention_dim,
                || {
                    format!(
                        "T5 width {} differs from the transformer's joint_attention_dim {}",
                        t5.d_model, self.transformer.joint_attention_dim
                    )
                },
            )?;
        }
        Ok(())
    }

    /// Pixels per latent-token side: VAE factor x patch size.
    pub fn size_multiple(&self) -> usize {
        self.vae.scale_factor() * self.transformer.patch_size
    }

    /// Default image side: the transformer's sample size in pixels (1024 for SD3).
    pub fn default_side(&self) -> usize {
        self.transformer.sample_size * self.vae.scale_factor()
    }

    /// Checks a request against the model and fills in defaults. Cheap: call before `load`.
    pub fn resolve(&self, req: &Request) -> Result<Resolved> {
        let m = self.size_multiple();
        let max_side = (self.transformer.pos_embed_max_size * m).min(request::MAX_PIXELS / m);
        let mut r = resolve_common(
            req,
            self.default_side(),
            m,
            max_side,
            SD3_DEFAULT_STEPS,
            SD3_DEFAULT_MAX_SEQ,
            SD3_MAX_SEQ,
        )?;
        r.guidance = req.guidance.unwrap_or(SD3_DEFAULT_GUIDANCE);
        request::check_guidance("guidance", r.guidance)?;
        if req.true_cfg.is_some() {
            return Err(Error::request(
                "--true-cfg applies to Flux models; SD3 uses --guidance for classifier-free guidance",
            ));
        }
        if let Some(noise) = &req.noise {
            let f = self.vae.scale_factor();
            check_noise(
                noise,
                [1, self.transformer.in_channels, r.height / f, r.width / f],
                r.width,
                r.height,
            )?;
        }
        Ok(r)
    }

    /// The sigma schedule for a resolved request.
    pub fn schedule(&self, r: &Resolved) -> Schedule {
        let mu = self.scheduler.use_dynamic_shifting.then(|| {
            let m = self.size_multiple();
            schedule::calculate_shift((r.height / m) * (r.width / m), &self.scheduler)
        });
        Schedule::flow_match(&self.scheduler, r.steps, mu)
    }

    /// Maps the weights and builds every component.
    pub fn load(self, device: &Device, dtype: DType) -> Result<Sd3Pipeline> {
        let w = self.weights();
        let transformer = Sd3Transformer::new(
            &self.transformer,
            w.var_builder("transformer", dtype, device)?,
        )
        .map_err(tensor_error)?;
        // f16 overflows in the VAE; it runs in f32 then.
        let vae_dtype = super::vae_dtype(dtype, device);
        let vae = VaeDecoder::new(&self.vae, w.var_builder("vae", vae_dtype, device)?)
            .map_err(tensor_error)?;
        let text = self.load_text(device, dtype)?;
        Ok(Sd3Pipeline {
            spec: self,
            text: Some(text),
            keep_text: true,
            transformer,
            vae,
            device: device.clone(),
            dtype,
        })
    }

    /// Builds the text encoders (CLIP-L, CLIP-G, optional T5) and their tokenizers.
    pub fn load_text(&self, device: &Device, dtype: DType) -> Result<Sd3TextEncoders> {
        let src = self.source.as_ref();
        let w = self.weights();
        let weights = |dir: &str, dt: DType| w.var_builder(dir, dt, device);
        let clip_l = ClipText::new(&self.clip_l, true, weights("text_encoder", dtype)?)
            .map_err(tensor_error)?;
        let clip_g = ClipText::new(&self.clip_g, true, weights("text_encoder_2", dtype)?)
            .map_err(tensor_error)?;
        let tok_l = TextTokenizer::from_dir(&tokenizer_dir(src, "tokenizer")?)?;
        let tok_g = TextTokenizer::from_dir(&tokenizer_dir(src, "tokenizer_2")?)?;
        let t5 = match &self.t5 {
            Some((_, cfg_path)) => {
                let full: candle_transformers::models::t5::Config = config::read_json(cfg_path)?;
                let model = candle_transformers::models::t5::T5EncoderModel::load(
                    weights("text_encoder_3", super::t5_dtype(dtype))?,
                    &full,
                )
                .map_err(tensor_error)?;
                Some((
                    model,
                    TextTokenizer::from_dir(&tokenizer_dir(src, "tokenizer_3")?)?,
                ))
            }
            None => None,
        };
        Ok(Sd3TextEncoders {
            clip_len: self
                .clip_l
                .max_position_embeddings
                .min(self.clip_g.max_position_embeddings),
            clip_l: (clip_l, tok_l),
            clip_g: (clip_g, tok_g),
            t5,
            joint_attention_dim: self.transformer.joint_attention_dim,
            device: device.clone(),
            dtype,
        })
    }
}

/// A loaded SD3 pipeline.
pub struct Sd3Pipeline {
    pub spec: Sd3Spec,
    /// The text encoders; `None` once released (they are loaded again when next needed).
    pub text: Option<Sd3TextEncoders>,
    /// Keep the text encoders loaded after encoding (default); `false` frees their memory for the
    /// denoising and decoding of a one-off generation.
    pub keep_text: bool,
    pub transformer: Sd3Transformer,
    pub vae: VaeDecoder,
    pub device: Device,
    pub dtype: DType,
}

/// The transformer with classifier-free guidance, as the solver sees it.
struct Guided<'a> {
    model: &'a Sd3Transformer,
    cond: &'a Conditioning,
    guidance: Option<f64>,
    dtype: DType,
}

impl Velocity for Guided<'_> {
    fn velocity(&mut self, x: &Tensor, _sigma: f32, t: f32, step: usize) -> Result<Tensor> {
        crate::interrupt::check()?;
        let b = self.cond.context.dim(0)?;
        let xin = x.to_dtype(self.dtype)?;
        let xin = if b > 1 {
            Tensor::cat(&vec![&xin; b], 0)?
        } else {
            xin
        };
        let ts = Tensor::full(t, b, x.device())?;
        let v = self
            .model
            .forward(&xin, &ts, &self.cond.context, &self.cond.pooled)?;
        let v = match self.guidance {
            Some(g) => {
                let (neg, pos) = (v.get(0)?.unsqueeze(0)?, v.get(1)?.unsqueeze(0)?);
                (&neg + ((pos - &neg)? * g)?)?
            }
            None => v,
        };
        let v = v.to_dtype(DType::F32)?;
        check_finite(&v, "velocity", step, self.dtype)?;
        Ok(v)
    }
}

impl Sd3Pipeline {
    /// Encodes a prompt pair for a resolved request: batch [negative, positive] with guidance, else [positive].
    pub fn encode(&mut self, r: &Resolved) -> Result<(Conditioning, Vec<Truncation>)> {
        let text = match &mut self.text {
            Some(t) => t,
            None => self
                .text
                .insert(self.spec.load_text(&self.device, self.dtype)?),
        };
        let (pos, mut cut) = text.encode(&r.prompt, r.max_sequence_length)?;
        if !r.uses_cfg() {
            return Ok((pos, cut));
        }
        let (neg, cut_neg) = text.encode(&r.negative_prompt, r.max_sequence_length)?;
        cut.extend(cut_neg.into_iter().map(|t| Truncation {
            encoder: t.encoder,
            ..t
        }));
        let context = Tensor::cat(&[neg.context, pos.context], 0)?;
        let pooled = Tensor::cat(&[neg.pooled, pos.pooled], 0)?;
        Ok((Conditioning { context, pooled }, cut))
    }

    /// Runs text encoding, sampling and decoding. `on_step(i)` is called after each step.
    pub fn generate(&mut self, req: &Request, on_step: &mut dyn FnMut(usize)) -> Result<Generated> {
        let r = self.spec.resolve(req)?;
        let mut timings = Timings::default();
        let t0 = Instant::now();
        let (cond, truncations) = self.encode(&r)?;
        if !self.keep_text {
            self.text = None;
        }
        self.device.synchronize()?;
        timings.text = t0.elapsed();

        let f = self.spec.vae.scale_factor();
        let shape = (
            1,
            self.spec.transformer.in_channels,
            r.height / f,
            r.width / f,
        );
        let noise = match &req.noise {
            Some(n) => n.to_device(&self.device)?.to_dtype(DType::F32)?,
            None => seeded_noise(r.seed, shape, &self.device)?,
        };
        let sched = self.spec.schedule(&r);
        let mut model = Guided {
            model: &self.transformer,
            cond: &cond,
            guidance: r.uses_cfg().then_some(r.guidance),
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

    /// Latents in sampler space (1, C, h, w) -> RGB image.
    pub fn decode(&self, latents: &Tensor) -> Result<RgbImage> {
        decode_latents(&self.vae, latents, self.dtype)
    }
}
