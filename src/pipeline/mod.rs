//! Pipelines: glue between configs, text encoders, transformer, sampler and VAE, one per model family.
//!
//! Loading is split in two so that every check on a request runs before any weight is read:
//! [`Spec::open`] reads and validates the configs, [`Spec::resolve`] checks a request against them,
//! [`Spec::load`] maps the weights.

pub mod flux;
pub mod sd3;

use crate::config::{self, ModelIndex};
use crate::error::{Error, Result};
use crate::loader::{self, FileSource, ModelRef};
use crate::request::{self, Request, Resolved};
use crate::sampling::{Schedule, Velocity};
use crate::text::conditioning::Truncation;
use crate::vae::{self, VaeDecoder};
use candle_core::{DType, Device, Tensor};
use std::path::PathBuf;
use std::time::Duration;

pub use flux::{FluxPipeline, FluxSpec};
pub use sd3::{Sd3Pipeline, Sd3Spec};

fn read<T: serde::de::DeserializeOwned>(src: &dyn FileSource, rel: &str) -> Result<(T, PathBuf)> {
    let p = loader::require(src, rel)?;
    Ok((config::read_json(&p)?, p))
}

/// Reads a component config and validates it.
fn read_checked<T: serde::de::DeserializeOwned + config::Validate>(
    src: &dyn FileSource,
    rel: &str,
) -> Result<(T, PathBuf)> {
    let (c, p): (T, PathBuf) = read(src, rel)?;
    c.validate(&p)?;
    Ok((c, p))
}

/// A model's configs, read and validated, of either family.
pub enum Spec {
    Sd3(Sd3Spec),
    Flux(FluxSpec),
}

impl Spec {
    /// Reads `model_index.json`, picks the family from its `_class_name`, reads and checks the configs.
    /// A single-file checkpoint is opened through its components model, then supplies the components
    /// it holds.
    pub fn open(model: &ModelRef) -> Result<Self> {
        if let ModelRef::SingleFile { file, components } = model {
            return Self::open_single(file, components.as_deref());
        }
        let source = loader::open(model)?;
        let (index, ip): (ModelIndex, _) = read(source.as_ref(), "model_index.json")?;
        match index.class_name.as_str() {
            "StableDiffusion3Pipeline" => Ok(Spec::Sd3(Sd3Spec::open(source, index, ip)?)),
            "FluxPipeline" => Ok(Spec::Flux(FluxSpec::open(source, index, ip)?)),
            other => Err(Error::config(
                ip,
                format!("pipeline class `{other}` is not supported; expected StableDiffusion3Pipeline or FluxPipeline"),
            )),
        }
    }

    fn open_single(file: &std::path::Path, components: Option<&ModelRef>) -> Result<Self> {
        let single = loader::single::SingleFile::open(file)?;
        let comps = match components {
            Some(ModelRef::SingleFile { .. }) => {
                return Err(Error::request(
                    "--components: pass a preset, a diffusers-layout folder or a Hub repo, not another single file",
                ))
            }
            Some(c) => c.clone(),
            None => default_components(&single)?,
        };
        let mut spec = Self::open(&comps)?;
        let family = match &spec {
            Spec::Sd3(_) => "sd3",
            Spec::Flux(_) => "flux",
        };
        let fam = single.detected.format.family();
        if family != fam {
            return Err(Error::request(format!(
                "{}: is a {fam} checkpoint but --components {} is a {family} model; pass components of the same family",
                file.display(),
                comps.describe()
            )));
        }
        let name = format!("{} (components: {})", file.display(), comps.describe());
        let single = Some(std::sync::Arc::new(single));
        match &mut spec {
            Spec::Sd3(s) => {
                s.single = single;
                s.name = name;
            }
            Spec::Flux(s) => {
                s.single = single;
                s.name = name;
            }
        }
        Ok(spec)
    }

    /// Overrides the scheduler's static shift (a preset's default).
    pub fn set_shift(&mut self, shift: f64) {
        match self {
            Spec::Sd3(s) => s.scheduler.shift = shift,
            Spec::Flux(s) => s.scheduler.shift = shift,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Spec::Sd3(s) => &s.name,
            Spec::Flux(s) => &s.name,
        }
    }

    /// Checks a request against the model and fills in defaults. Cheap: call before `load`.
    pub fn resolve(&self, req: &Request) -> Result<Resolved> {
        match self {
            Spec::Sd3(s) => s.resolve(req),
            Spec::Flux(s) => s.resolve(req),
        }
    }

    pub fn schedule(&self, r: &Resolved) -> Schedule {
        match self {
            Spec::Sd3(s) => s.schedule(r),
            Spec::Flux(s) => s.schedule(r),
        }
    }

    /// Maps the weights and builds every component.
    pub fn load(self, device: &Device, dtype: DType) -> Result<Pipeline> {
        Ok(match self {
            Spec::Sd3(s) => Pipeline::Sd3(Box::new(s.load(device, dtype)?)),
            Spec::Flux(s) => Pipeline::Flux(Box::new(s.load(device, dtype)?)),
        })
    }
}

/// A loaded pipeline of either family.
pub enum Pipeline {
    Sd3(Box<Sd3Pipeline>),
    Flux(Box<FluxPipeline>),
}

impl Pipeline {
    /// Checks a request against the loaded model and fills in defaults.
    pub fn resolve(&self, req: &Request) -> Result<Resolved> {
        match self {
            Pipeline::Sd3(p) => p.spec.resolve(req),
            Pipeline::Flux(p) => p.spec.resolve(req),
        }
    }

    /// The seeded initial latents (1, C, H/f, W/f) a resolved request starts from.
    pub fn initial_noise(&self, r: &Resolved) -> Result<Tensor> {
        let (vae, c, dev) = match self {
            Pipeline::Sd3(p) => (&p.spec.vae, p.spec.transformer.in_channels, &p.device),
            Pipeline::Flux(p) => (&p.spec.vae, p.spec.vae.latent_channels, &p.device),
        };
        let f = vae.scale_factor();
        seeded_noise(r.seed, (1, c, r.height / f, r.width / f), dev)
    }

    /// Runs text encoding, sampling and decoding. `on_step(i)` is called after each step.
    /// Keep the text encoders loaded after encoding (the default), or release them after each
    /// encoding (they are loaded again when next needed).
    pub fn keep_text_encoders(&mut self, keep: bool) {
        match self {
            Pipeline::Sd3(p) => p.keep_text = keep,
            Pipeline::Flux(p) => p.keep_text = keep,
        }
    }

    pub fn generate(&mut self, req: &Request, on_step: &mut dyn FnMut(usize)) -> Result<Generated> {
        match self {
            Pipeline::Sd3(p) => p.generate(req, on_step),
            Pipeline::Flux(p) => p.generate(req, on_step),
        }
    }
}

/// The tokenizer folder `dir`, fetched (for Hub models) file by file: `tokenizer.json`, or the slow
/// tokenizer's `vocab.json` + `merges.txt` when the folder has no `tokenizer.json` (CLIP in the SD3
/// and Flux repos), and the special-token configs.
fn tokenizer_dir(src: &dyn FileSource, dir: &str) -> Result<PathBuf> {
    let main = match src.file(&format!("{dir}/tokenizer.json"))? {
        Some(p) => p,
        None => match src.file(&format!("{dir}/vocab.json"))? {
            Some(v) => {
                loader::require(src, &format!("{dir}/merges.txt"))?;
                v
            }
            None => loader::require(src, &format!("{dir}/tokenizer.json"))?,
        },
    };
    for extra in ["tokenizer_config.json", "special_tokens_map.json"] {
        src.file(&format!("{dir}/{extra}"))?;
    }
    Ok(main.parent().map(PathBuf::from).unwrap_or_default())
}

/// Turns a candle error raised while building a model from weights into a tensor error naming it.
fn tensor_error(e: candle_core::Error) -> Error {
    // candle appends a backtrace when RUST_BACKTRACE is set: keep the first line.
    let full = e.to_string();
    let msg = full.lines().next().unwrap_or_default().to_string();
    // candle: "cannot find tensor NAME" / "shape mismatch for NAME, expected: [..], got: [..]"
    if let Some(rest) = msg.strip_prefix("cannot find tensor ") {
        return Error::Tensor {
            name: rest.trim().to_string(),
            msg: "missing from the weight files".into(),
        };
    }
    if let Some(rest) = msg.strip_prefix("shape mismatch for ") {
        if let Some((name, shapes)) = rest.split_once(", ") {
            return Error::Tensor {
                name: name.to_string(),
                msg: format!("wrong shape: {shapes}"),
            };
        }
    }
    Error::Candle(e)
}

/// Wall time of each stage of one generation.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    pub text: Duration,
    pub steps: Vec<Duration>,
    pub decode: Duration,
}

impl Timings {
    pub fn denoise(&self) -> Duration {
        self.steps.iter().sum()
    }
}

/// An 8-bit RGB image.
#[derive(Debug, Clone, PartialEq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    /// Row-major RGB bytes, `width * height * 3` of them.
    pub data: Vec<u8>,
}

/// One generated image and what it took.
#[derive(Debug, Clone)]
pub struct Generated {
    pub image: RgbImage,
    /// Final latents (sampler space, before unscaling), (1, C, h, w) f32.
    pub latents: Tensor,
    pub request: Resolved,
    pub timings: Timings,
    pub truncations: Vec<Truncation>,
}

/// Fails with a clear error if `x` holds a NaN or an infinity (their sum is then not finite).
pub fn check_finite(x: &Tensor, what: &'static str, step: usize, dtype: DType) -> Result<()> {
    let s: f32 = x.to_dtype(DType::F32)?.sum_all()?.to_scalar()?;
    if s.is_finite() {
        Ok(())
    } else {
        Err(Error::NonFinite {
            what,
            step: step + 1,
            dtype: crate::device::dtype_name(dtype).into(),
        })
    }
}

/// Standard-normal latents from a seed (our own generator: seeds do not reproduce torch's noise;
/// use `--noise` for that).
pub fn seeded_noise(
    seed: u64,
    shape: (usize, usize, usize, usize),
    device: &Device,
) -> Result<Tensor> {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let v: Vec<f32> = (0..n)
        .map(|_| rand_distr::StandardNormal.sample(&mut rng))
        .collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}

/// The dtype the VAE runs in: f16 overflows in its decoder, and candle's CPU convolutions have no
/// bf16 kernel, so both fall back to f32.
pub fn vae_dtype(dtype: DType, device: &Device) -> DType {
    if dtype == DType::F16 || (dtype == DType::BF16 && device.is_cpu()) {
        DType::F32
    } else {
        dtype
    }
}

/// The dtype T5 runs in: it overflows in f16, so f32 then.
pub fn t5_dtype(dtype: DType) -> DType {
    if dtype == DType::F16 {
        DType::F32
    } else {
        dtype
    }
}

/// Latents in sampler space (1, C, h, w) -> RGB image through the VAE (in [`vae_dtype`]).
pub fn decode_latents(vae: &VaeDecoder, latents: &Tensor, dtype: DType) -> Result<RgbImage> {
    let vae_dtype = vae_dtype(dtype, latents.device());
    let z = vae
        .unscale(&latents.to_dtype(DType::F32)?)?
        .to_dtype(vae_dtype)?;
    let x = vae.decode(&z)?;
    let (height, width, data) = vae::to_rgb8(&x)?.remove(0);
    Ok(RgbImage {
        width,
        height,
        data,
    })
}

/// Size, steps, T5 length and seed: the checks every family shares. Guidance is left at 0 for the
/// family to set.
pub(crate) fn resolve_common(
    req: &Request,
    default_side: usize,
    multiple: usize,
    max_side: usize,
    default_steps: usize,
    default_max_seq: usize,
    max_seq_limit: usize,
) -> Result<Resolved> {
    let width = req.width.unwrap_or(default_side);
    let height = req.height.unwrap_or(default_side);
    request::check_side("width", width, multiple, max_side)?;
    request::check_side("height", height, multiple, max_side)?;
    if width * height > request::MAX_PIXELS {
        return Err(Error::request(format!(
            "{width}x{height} is more than the {} pixel cap; ask for a smaller image",
            request::MAX_PIXELS
        )));
    }
    let steps = req.steps.unwrap_or(default_steps);
    request::check_steps(steps)?;
    let max_sequence_length = req.max_sequence_length.unwrap_or(default_max_seq);
    if !(1..=max_seq_limit).contains(&max_sequence_length) {
        return Err(Error::request(format!(
            "--max-sequence-length {max_sequence_length}: must be between 1 and {max_seq_limit}"
        )));
    }
    Ok(Resolved {
        prompt: req.prompt.clone(),
        negative_prompt: req.negative_prompt.clone().unwrap_or_default(),
        steps,
        guidance: 0.0,
        width,
        height,
        seed: req.seed.unwrap_or_else(rand::random),
        max_sequence_length,
        true_cfg: 1.0,
        sampler: req.sampler.unwrap_or(crate::sampling::Sampler::Euler),
        notices: Vec::new(),
    })
}

/// Checks a `--noise` tensor has the latent shape the image size needs.
pub(crate) fn check_noise(
    noise: &Tensor,
    want: [usize; 4],
    width: usize,
    height: usize,
) -> Result<()> {
    if noise.dims() != want {
        return Err(Error::request(format!(
            "--noise: tensor `noise` has shape {:?} but a {width}x{height} image needs {want:?}; \
             pass --width/--height that match the noise",
            noise.dims()
        )));
    }
    Ok(())
}

/// Where each component's weights come from: the model's component folders, or, for a single-file
/// checkpoint, the file for the components it holds and the components model for the rest.
pub(crate) struct Weights<'a> {
    pub src: &'a dyn FileSource,
    pub single: Option<&'a loader::single::SingleFile>,
}

const WEIGHT_STEMS: [&str; 2] = ["diffusion_pytorch_model", "model"];

impl Weights<'_> {
    /// The component in folder `dir` as a [`candle_nn::VarBuilder`] at `dtype`.
    pub fn var_builder(
        &self,
        dir: &str,
        dtype: DType,
        device: &Device,
    ) -> Result<candle_nn::VarBuilder<'static>> {
        if let Some(m) = self.single.and_then(|s| s.component(dir)) {
            return m.var_builder(dtype, device);
        }
        let files = loader::component_weights(self.src, dir, &WEIGHT_STEMS)?;
        loader::weights::var_builder(&files, dtype, device)
    }

    /// The component's files and its tensors' names and shapes (headers only).
    pub fn headers(
        &self,
        dir: &str,
    ) -> Result<(
        Vec<PathBuf>,
        std::collections::BTreeMap<String, loader::audit::TensorMeta>,
    )> {
        if let Some(m) = self.single.and_then(|s| s.component(dir)) {
            return Ok((m.files.clone(), m.metas()));
        }
        let files = loader::component_weights(self.src, dir, &WEIGHT_STEMS)?;
        let headers = loader::audit::read_headers(&files)?;
        Ok((files, headers))
    }
}

/// The components model of a single file whose shapes are those of a released model: its preset.
pub fn default_components(single: &loader::single::SingleFile) -> Result<ModelRef> {
    match single.detected.variant {
        Some(v) => Ok(crate::presets::Preset::find(v)
            .expect("detected variants are presets (tested)")
            .model_ref(None)),
        None => Err(Error::request(format!(
            "{}: a {} single-file checkpoint whose shapes match no released model; pass --components \
             with a preset, folder or Hub repo that holds its configs and tokenizers",
            single.path.display(),
            single.detected.format.family()
        ))),
    }
}

/// One component's weights checked against its config, headers only.
pub struct ComponentAudit {
    pub name: &'static str,
    pub files: Vec<PathBuf>,
    pub audit: crate::loader::audit::Audit,
}

fn audit_component(
    w: &Weights,
    dir: &'static str,
    build: impl FnOnce(candle_nn::VarBuilder) -> candle_core::Result<()>,
    ignore: impl Fn(&str) -> bool,
) -> Result<Option<ComponentAudit>> {
    // A single-file model is audited for the components its file holds.
    if w.single.is_some_and(|s| s.component(dir).is_none()) {
        return Ok(None);
    }
    let (files, headers) = w.headers(dir)?;
    let audit = loader::audit::ShapeBackend::audit(headers, build, ignore)?;
    Ok(Some(ComponentAudit {
        name: dir,
        files,
        audit,
    }))
}

/// The VAE encoder is not used by a text-to-image engine; its tensors are expected and unread.
fn vae_encoder_side(n: &str) -> bool {
    n.starts_with("encoder.") || n.starts_with("quant_conv.")
}

impl Spec {
    /// Checks every component's weight files against its config by reading only their headers
    /// (downloading them first for Hub models).
    pub fn audit(&self) -> Result<Vec<ComponentAudit>> {
        use crate::mmdit::{FluxTransformer, Sd3Transformer};
        use crate::text::clip::ClipText;
        let none = |_: &str| false;
        let t5 = |p: &std::path::Path| -> Result<candle_transformers::models::t5::Config> {
            config::read_json(p)
        };
        let all = match self {
            Spec::Sd3(s) => {
                let src = &s.weights();
                let mut v = vec![
                    audit_component(
                        src,
                        "transformer",
                        |vb| Sd3Transformer::new(&s.transformer, vb).map(drop),
                        none,
                    )?,
                    audit_component(
                        src,
                        "vae",
                        |vb| VaeDecoder::new(&s.vae, vb).map(drop),
                        vae_encoder_side,
                    )?,
                    audit_component(
                        src,
                        "text_encoder",
                        |vb| ClipText::new(&s.clip_l, true, vb).map(drop),
                        none,
                    )?,
                    audit_component(
                        src,
                        "text_encoder_2",
                        |vb| ClipText::new(&s.clip_g, true, vb).map(drop),
                        none,
                    )?,
                ];
                if let Some((_, p)) = &s.t5 {
                    let cfg = t5(p)?;
                    v.push(audit_component(
                        src,
                        "text_encoder_3",
                        |vb| {
                            candle_transformers::models::t5::T5EncoderModel::load(vb, &cfg)
                                .map(drop)
                        },
                        none,
                    )?);
                }
                v
            }
            Spec::Flux(s) => {
                let src = &s.weights();
                let cfg = t5(&s.t5.1)?;
                vec![
                    audit_component(
                        src,
                        "transformer",
                        |vb| FluxTransformer::new(&s.transformer, vb).map(drop),
                        none,
                    )?,
                    audit_component(
                        src,
                        "vae",
                        |vb| VaeDecoder::new(&s.vae, vb).map(drop),
                        vae_encoder_side,
                    )?,
                    audit_component(
                        src,
                        "text_encoder",
                        |vb| ClipText::new(&s.clip, false, vb).map(drop),
                        none,
                    )?,
                    audit_component(
                        src,
                        "text_encoder_2",
                        |vb| {
                            candle_transformers::models::t5::T5EncoderModel::load(vb, &cfg)
                                .map(drop)
                        },
                        none,
                    )?,
                ]
            }
        };
        Ok(all.into_iter().flatten().collect())
    }

    /// Downloads (for Hub models) every file generation needs; returns the local paths.
    pub fn fetch_all(&self) -> Result<Vec<PathBuf>> {
        let (src, tokenizers): (&dyn FileSource, &[&str]) = match self {
            Spec::Sd3(s) if s.t5.is_some() => {
                (s.source(), &["tokenizer", "tokenizer_2", "tokenizer_3"])
            }
            Spec::Sd3(s) => (s.source(), &["tokenizer", "tokenizer_2"]),
            Spec::Flux(s) => (s.source(), &["tokenizer", "tokenizer_2"]),
        };
        let mut files = Vec::new();
        for a in self.audit()? {
            files.extend(a.files);
        }
        for t in tokenizers {
            let dir = tokenizer_dir(src, t)?;
            for f in ["tokenizer.json", "vocab.json", "merges.txt"] {
                if dir.join(f).is_file() {
                    files.push(dir.join(f));
                }
            }
        }
        Ok(files)
    }

    /// A one-line description of the detected variant.
    pub fn variant(&self) -> String {
        match self {
            Spec::Sd3(s) => {
                let t = &s.transformer;
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
                if s.t5.is_none() {
                    v += ", no T5";
                }
                v
            }
            Spec::Flux(s) => {
                let t = &s.transformer;
                format!(
                    "FLUX.1 {}: {} double + {} single blocks, width {}",
                    if t.guidance_embeds {
                        "dev-like (guidance embedding)"
                    } else {
                        "schnell-like"
                    },
                    t.num_layers,
                    t.num_single_layers,
                    t.hidden_size()
                )
            }
        }
    }
}

/// Wraps a model so each completed step is timed and reported.
struct Timed<'a> {
    inner: &'a mut dyn Velocity,
    device: Device,
    last: std::time::Instant,
    steps: Vec<Duration>,
    on_step: &'a mut dyn FnMut(usize),
}

impl Velocity for Timed<'_> {
    fn velocity(&mut self, x: &Tensor, sigma: f32, timestep: f32, step: usize) -> Result<Tensor> {
        self.inner.velocity(x, sigma, timestep, step)
    }

    fn end_step(&mut self, step: usize) {
        // GPU work is asynchronous: wait for the step to finish before reading the clock.
        let _ = self.device.synchronize();
        self.steps.push(self.last.elapsed());
        self.last = std::time::Instant::now();
        (self.on_step)(step);
    }
}

/// Runs the request's sampler from `noise` over the schedule, timing each step, and checks the
/// final latents are finite.
pub(crate) fn sample(
    model: &mut dyn Velocity,
    r: &Resolved,
    sched: &Schedule,
    noise: Tensor,
    dtype: DType,
    on_step: &mut dyn FnMut(usize),
) -> Result<(Tensor, Vec<Duration>)> {
    let mut timed = Timed {
        inner: model,
        device: noise.device().clone(),
        last: std::time::Instant::now(),
        steps: Vec::with_capacity(r.steps),
        on_step,
    };
    let latents = r
        .sampler
        .run(&mut timed, noise, &sched.sigmas, &sched.timesteps)?;
    check_finite(&latents, "latents", r.steps - 1, dtype)?;
    Ok((latents, timed.steps))
}
