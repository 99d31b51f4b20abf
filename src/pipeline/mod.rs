//! The text-to-image pipeline, written once for every model family: open the configs, resolve a
//! request, load, encode the prompts, sample, decode. What differs between families is behind the
//! traits of [`family`]; each family is one file here ([`sd3`], [`flux`]).
//!
//! Loading is split in two so that every check on a request runs before any weight is read:
//! [`Spec::open`] reads and validates the configs, [`Spec::resolve`] checks a request against them,
//! [`Spec::load`] checks each component's tensors against its file headers, then reads the weights.

pub mod chroma;
pub mod components;
pub mod convert;
pub mod family;
pub mod flux;
pub mod flux2;
pub mod preview;
pub mod sample;
pub mod sd3;

pub use components::{t5_dtype, vae_bf16_operands, vae_dtype, ComponentAudit};
pub use family::{Cfg, Defaults, Denoise, Edit, Family, FamilyEntry, Transformer};
pub use sample::{check_finite, seeded_noise, Prompts};

use crate::cache::{CacheSpec, CallKind};
use crate::config::{ModelIndex, SchedulerConfig, VaeConfig};
use crate::cpu;
use crate::error::{Error, Message, Param, Result};
use crate::image_io;
use crate::loader::single::SingleFile;
use crate::loader::{self, FileSource, ModelRef};
use crate::lora::{self, Apply, Fitted, LoraFile, LoraSet, LoraSpec, ModelLayers};
use crate::nn;
use crate::output::RgbImage;
use crate::request::{self, Given, Init, Request, Resolved};
use crate::sampling::{Sampler, Schedule};
use crate::text::{PromptEncoder, Truncation};
use crate::vae::{self, VaeDecoder, VaeEncoder};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use components::{read, read_checked, tokenizer_dir, OpenCtx, TextLoader, TextPart, Weights};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A model's configs, read and validated, of any family; no weights touched yet.
pub struct Spec {
    source: Box<dyn FileSource>,
    /// A single-file checkpoint that supplies some components (the rest come from `source`).
    single: Option<Arc<SingleFile>>,
    name: String,
    pub index: ModelIndex,
    pub vae: VaeConfig,
    pub scheduler: SchedulerConfig,
    entry: &'static FamilyEntry,
    family: Box<dyn Family>,
    /// The GGML block type the transformer's linear layers are quantized to at load.
    quantize: Option<GgmlDType>,
    /// Serve a GGUF file's blocks dequantized (computed in the run's dtype) instead of on the
    /// quantized kernels: a debug switch for parity.
    dequantize: bool,
    /// Decode and encode in overlapping tiles (diffusers' `enable_tiling()`).
    vae_tiling: bool,
    /// The T5 encoder's weights from a file of their own (`--t5`): its folder and mapping.
    t5: Option<(&'static str, Arc<loader::single::Mapping>)>,
}

impl Spec {
    /// Reads `model_index.json`, picks the family from its `_class_name`, reads and checks the
    /// configs. A single-file checkpoint is opened through its components model (which
    /// `presets::resolve_with` chooses when the caller names none), then supplies the components
    /// it holds.
    pub fn open(model: &ModelRef) -> Result<Self> {
        if let ModelRef::SingleFile { file, components } = model {
            return Self::open_single(file, components.as_deref());
        }
        let source = loader::open(model)?;
        let src = source.as_ref();
        let (index, ip): (ModelIndex, _) = read(src, "model_index.json")?;
        let entry = family::by_class(&index.class_name).ok_or_else(|| {
            let known: Vec<&str> = family::FAMILIES.iter().map(|f| f.pipeline_class).collect();
            Error::config(
                &ip,
                format!(
                    "pipeline class `{}` is not supported; expected one of {}",
                    index.class_name,
                    known.join(", ")
                ),
            )
        })?;
        let (vae, _) = read_checked::<VaeConfig>(src, "vae/config.json")?;
        let (scheduler, _) = read_checked(src, "scheduler/scheduler_config.json")?;
        let family = (entry.open)(&OpenCtx {
            src,
            index: &index,
            index_path: &ip,
            vae: &vae,
        })?;
        Ok(Self {
            name: source.name(),
            single: None,
            source,
            index,
            vae,
            scheduler,
            entry,
            family,
            quantize: None,
            dequantize: false,
            vae_tiling: false,
            t5: None,
        })
    }

    fn open_single(file: &std::path::Path, components: Option<&ModelRef>) -> Result<Self> {
        let comps = match components {
            Some(ModelRef::SingleFile { .. }) => return Err(Error::invalid(
                Param::Components,
                ": pass a preset, a diffusers-layout folder or a Hub repo, not another single file",
            )),
            Some(c) => c,
            None => return Err(loader::needs_components(file)),
        };
        let single = SingleFile::open(file)?;
        let mut spec = Self::open(comps)?;
        let format = single.detected.format;
        if spec.entry.single_file != format {
            return Err(Error::InvalidRequest(
                Message::from(format!(
                    "{}: is a {} checkpoint but ",
                    file.display(),
                    format.name()
                ))
                .param(Param::Components)
                .text(format!(
                    " {} is a {} model; pass components of the same family",
                    comps.describe(),
                    spec.entry.name
                )),
            ));
        }
        spec.name = format!("{} (components: {})", file.display(), comps.describe());
        spec.single = Some(Arc::new(single));
        Ok(spec)
    }

    /// Where the model's files come from.
    pub fn source(&self) -> &dyn FileSource {
        self.source.as_ref()
    }

    fn weights<'a>(&'a self, merge: &'a LoraSet) -> Weights<'a> {
        Weights {
            src: self.source.as_ref(),
            single: self.single.as_deref(),
            own: self.t5.as_ref().map(|(d, m)| (*d, m.as_ref())),
            dequantize: self.dequantize,
            merge,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The model's family.
    pub fn family(&self) -> &'static FamilyEntry {
        self.entry
    }

    /// Quantizes the transformer's linear layers to a GGML block type at load (those whose input
    /// width is a whole number of blocks), computed on the blocks ([`crate::cpu::qgemm`]); CPU only.
    pub fn set_quantize(&mut self, dtype: Option<GgmlDType>) {
        self.quantize = dtype;
    }

    /// Takes the T5 encoder's weights from `file` (GGUF, in llama.cpp's or transformers' names, or
    /// safetensors in transformers' names) instead of the model's folder; its config and tokenizer
    /// stay the model's. The file's tensors are checked against that config at load.
    pub fn set_t5_file(&mut self, file: &std::path::Path) -> Result<()> {
        let dir = self
            .family
            .text_parts()
            .into_iter()
            .find_map(|p| match p {
                TextPart::T5(t) => Some(t.dir),
                _ => None,
            })
            .ok_or_else(|| {
                Error::invalid(
                    Param::T5,
                    format!(" {}: this model has no T5 encoder", file.display()),
                )
            })?;
        self.t5 = Some((dir, Arc::new(loader::single::t5_file(file)?)));
        Ok(())
    }

    /// Decodes and encodes in overlapping tiles as diffusers' `enable_tiling()` does: memory
    /// follows the tile (the VAE config's `sample_size` pixels), not the image.
    pub fn set_vae_tiling(&mut self, on: bool) {
        self.vae_tiling = on;
    }

    /// Whether the VAE decodes and encodes in tiles.
    pub fn vae_tiling(&self) -> bool {
        self.vae_tiling
    }

    /// Computes a GGUF model on its weights dequantized at load instead of on its blocks.
    pub fn set_dequantize(&mut self, on: bool) {
        self.dequantize = on;
    }

    /// Whether the transformer comes from a file that stores weights in GGML blocks (a quantized
    /// GGUF, not `--dequantize`d), with the count of those tensors and their bytes.
    pub fn stored_blocks(&self) -> Result<Option<(usize, u64)>> {
        let none = LoraSet::default();
        Ok(self
            .weights(&none)
            .blocks("transformer")?
            .map(|b| b.summary()))
    }

    /// Overrides the scheduler's static shift (a preset's default).
    pub fn set_shift(&mut self, shift: f64) {
        self.scheduler.shift = shift;
    }

    /// A one-line description of the model's variant.
    pub fn variant(&self) -> String {
        self.family.describe()
    }

    /// The request defaults and limits of this model.
    pub fn defaults(&self) -> Defaults {
        self.family.defaults(&self.vae)
    }

    /// Checks a request against the model and fills in defaults. Cheap: call before `load`.
    pub fn resolve(&self, req: &Request) -> Result<Resolved> {
        let d = self.defaults();
        let mut notices = Vec::new();
        for l in &req.loras {
            l.check()?;
        }
        let negative = req.negative_prompt.as_deref().unwrap_or_default();
        for (p, text) in [
            (Param::Prompt, req.prompt.as_str()),
            (Param::NegativePrompt, negative),
        ] {
            if text.len() > request::MAX_PROMPT_BYTES {
                return Err(Error::invalid(
                    p,
                    format!(
                        " of {} bytes is longer than accepted (at most {}); the text encoders read at most 512 tokens of it",
                        text.len(),
                        request::MAX_PROMPT_BYTES
                    ),
                ));
            }
        }
        let edit = self.family.edit();
        let reference = matches!(edit, Edit::Reference | Edit::References);
        if req.image.is_none() && !req.reference_images.is_empty() {
            return Err(Error::request(
                "reference_images come after image: give the first reference as image",
            ));
        }
        if req.reference_images.len() >= request::MAX_IMAGES {
            return Err(Error::InvalidRequest(Message::about(Param::Image).text(
                format!(
                    " was given {} times: at most {} images",
                    req.reference_images.len() + 1,
                    request::MAX_IMAGES
                ),
            )));
        }
        if !req.reference_images.is_empty() && edit != Edit::References {
            return Err(Error::InvalidRequest(Message::about(Param::Image).text(format!(
                " was given {} times: {} edits from one image; only FLUX.2 takes several references",
                req.reference_images.len() + 1,
                self.name
            ))));
        }
        // FLUX.2's references, each cropped to the model's multiple.
        let refs = match (&req.image, edit) {
            (Some(first), Edit::References) => std::iter::once(first)
                .chain(&req.reference_images)
                .enumerate()
                .map(|(i, img)| flux2_reference(img, i, d.size_multiple))
                .collect::<Result<Vec<_>>>()?,
            _ => Vec::new(),
        };
        let (width, height) = match (&req.image, refs.first()) {
            // diffusers' `Flux2KleinPipeline`: the first reference's size unless given.
            (Some(_), Some(first)) => (
                req.width.unwrap_or(first.width),
                req.height.unwrap_or(first.height),
            ),
            (Some(_), None) if reference => reference_output_size(req, &d, &mut notices),
            (Some(img), _) => edit_size(img, req, &d, &mut notices)?,
            (None, _) => (req.width.unwrap_or(d.side), req.height.unwrap_or(d.side)),
        };
        request::check_side(Param::Width, width, d.size_multiple, d.max_side)?;
        request::check_side(Param::Height, height, d.size_multiple, d.max_side)?;
        if width * height > request::MAX_PIXELS {
            return Err(Error::request(format!(
                "{width}x{height} is more than the {} pixel cap; ask for a smaller image",
                request::MAX_PIXELS
            )));
        }
        let steps = req.steps.unwrap_or(d.steps);
        request::check_steps(steps)?;
        let max_sequence_length = req.max_sequence_length.unwrap_or(d.max_sequence_length);
        if !(1..=d.max_sequence_limit).contains(&max_sequence_length) {
            return Err(Error::invalid(
                Param::MaxSequenceLength,
                format!(
                    " {max_sequence_length}: must be between 1 and {}",
                    d.max_sequence_limit
                ),
            ));
        }
        let guidance = req.guidance.unwrap_or(d.guidance);
        request::check_guidance(Param::Guidance, guidance)?;
        let init = match &req.image {
            Some(img) if reference => {
                if let Some(p) =
                    first_given(req, &[Param::Mask, Param::Strength, Param::EncodeNoise])
                {
                    return Err(Error::InvalidRequest(Message::about(p).text(format!(
                        " does not apply to {}: it edits from the reference image's tokens; leave it out",
                        self.name
                    ))));
                }
                let image = match refs.first() {
                    Some(first) => first.clone(),
                    None => {
                        let auto = req.reference_auto_resize.unwrap_or(true);
                        let (rw, rh) = reference_size(img, d.size_multiple, auto)?;
                        image_io::lanczos_resize(img, rw, rh)
                    }
                };
                Some(Init {
                    image,
                    strength: 1.0,
                    start: 0,
                    encode_noise: Vec::new(),
                    mask: None,
                    references: refs.iter().skip(1).cloned().collect(),
                })
            }
            Some(img) => {
                let strength = req.strength.unwrap_or(self.family.default_strength());
                let start = request::check_strength(strength, steps)?;
                let mask = match &req.mask {
                    Some(m) => Some(self.check_mask(img, m, width, height, &mut notices)?),
                    None => None,
                };
                Some(Init {
                    image: image_io::lanczos_resize(img, width, height),
                    strength,
                    start,
                    encode_noise: req.encode_noise.clone(),
                    mask,
                    references: Vec::new(),
                })
            }
            None => {
                if let Some(p) =
                    first_given(req, &[Param::Mask, Param::Strength, Param::EncodeNoise])
                {
                    return Err(Error::InvalidRequest(
                        Message::about(p)
                            .text(" applies to editing only; pass ")
                            .param(Param::Image)
                            .text(" too, or leave it out"),
                    ));
                }
                None
            }
        };
        let mut r = Resolved {
            prompt: req.prompt.clone(),
            negative_prompt: req.negative_prompt.clone().unwrap_or_default(),
            steps,
            guidance,
            width,
            height,
            seed: req.seed.unwrap_or_else(rand::random),
            noise: req.noise.clone(),
            max_sequence_length,
            true_cfg: req.true_cfg.unwrap_or(1.0),
            sampler: req.sampler.unwrap_or(Sampler::Euler),
            cache: req.cache,
            init,
            given: Given {
                negative_prompt: req.negative_prompt.is_some(),
                guidance: req.guidance.is_some(),
                true_cfg: req.true_cfg.is_some(),
            },
            notices,
        };
        let want = self.noise_shape(&r);
        let encode_noise = r.init.iter().flat_map(|i| &i.encode_noise);
        let given = r.noise.iter().map(|t| (Param::Noise, t));
        for (p, t) in given.chain(encode_noise.map(|t| (Param::EncodeNoise, t))) {
            if t.dims4().ok() != Some(want) {
                return Err(Error::InvalidRequest(
                    Message::about(p)
                        .text(format!(
                            ": tensor has shape {:?} but a {width}x{height} image needs {:?}; pass ",
                            t.dims(),
                            [want.0, want.1, want.2, want.3]
                        ))
                        .param(Param::Width)
                        .text("/")
                        .param(Param::Height)
                        .text(" that match it"),
                ));
            }
            // A NaN or infinity would otherwise surface steps later as the model's overflow.
            let values = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                return Err(Error::InvalidRequest(Message::about(p).text(format!(
                    ": value {} at index {i} is not finite; the noise must be finite numbers",
                    values[i]
                ))));
            }
        }
        self.family.check(&mut r, &self.name)?;
        if let Some(c) = r.cache {
            let calls = self.cache_calls(&r);
            if !c.has_effect(calls) {
                r.notices
                    .push(crate::cache::no_effect(&c, r.steps_to_run()));
            }
        }
        Ok(r)
    }

    /// Model calls per guidance branch of a resolved request: its sampler's evaluations over the
    /// steps that run.
    pub fn cache_calls(&self, r: &Resolved) -> usize {
        let sched = self.schedule(r);
        r.sampler.nfe(sched.timesteps.len(), &sched.sigmas)
    }

    /// An inpainting mask at the output size, with notices when it was resized or selects nothing.
    fn check_mask(
        &self,
        img: &RgbImage,
        mask: &RgbImage,
        width: usize,
        height: usize,
        notices: &mut Vec<Message>,
    ) -> Result<Vec<u8>> {
        if (mask.width, mask.height) != (img.width, img.height) {
            notices.push(Message::about(Param::Mask).text(format!(
                ": {}x{} differs from the image's {}x{}; both are resized to {width}x{height}, as diffusers does",
                mask.width, mask.height, img.width, img.height
            )));
        }
        let bits = image_io::binarize_mask(mask, width, height);
        let f = self.vae.scale_factor();
        if !image_io::mask_at_latents(&bits, width, height, f).contains(&1) {
            notices.push(Message::about(Param::Mask).text(
                " selects nothing to repaint (no latent pixel is at least half white): the result is the input image",
            ));
        }
        Ok(bits)
    }

    /// The shape of a resolved request's initial latents in the sampler's space: (1, C, h / f,
    /// w / f), with FLUX.2's VAE C = latent channels x patch² and f = VAE factor x patch.
    pub fn noise_shape(&self, r: &Resolved) -> (usize, usize, usize, usize) {
        let f = self.vae.latent_factor();
        (1, self.vae.sampler_channels(), r.height / f, r.width / f)
    }

    /// The sigma schedule for a resolved request; an edit's starts at its first step that runs.
    pub fn schedule(&self, r: &Resolved) -> Schedule {
        let m = self.defaults().size_multiple;
        let tokens = (r.height / m) * (r.width / m);
        let full = self.family.schedule(&self.scheduler, r.steps, tokens);
        match &r.init {
            Some(i) => Schedule {
                sigmas: full.sigmas[i.start..].to_vec(),
                timesteps: full.timesteps[i.start..].to_vec(),
            },
            None => full,
        }
    }

    /// The text encoders' loader, merging the text-encoder parts of `loras`.
    fn text_loader<'a>(
        &'a self,
        device: &Device,
        dtype: DType,
        loras: &'a LoraSet,
    ) -> TextLoader<'a> {
        TextLoader {
            weights: self.weights(loras),
            device: device.clone(),
            dtype,
        }
    }

    /// Checks every component's tensors against its config and maps the weights.
    pub fn load(self, device: &Device, dtype: DType) -> Result<Pipeline> {
        self.load_with(device, dtype, LoraSet::default(), Apply::Merge)
    }

    /// The layers a LoRA can fit: the transformer's and text encoders' tensor names and shapes
    /// (headers only).
    pub fn model_layers(&self) -> Result<ModelLayers> {
        let none = LoraSet::default();
        let w = self.weights(&none);
        let (_, transformer) = w.headers("transformer")?;
        let mut text = Vec::new();
        for part in self.family.text_parts() {
            if let Ok((_, h)) = w.headers(part.dir()) {
                text.push((part.dir(), matches!(part, TextPart::T5(_)), h));
            }
        }
        Ok(ModelLayers::new(&transformer, text))
    }

    /// Reads each LoRA (downloading Hub ones) and fits it to this model: a file made for another
    /// model, one that fits no layer, or a layer of another shape is refused here, before any
    /// weight is read.
    pub fn fit_loras(&self, specs: &[LoraSpec]) -> Result<LoraSet> {
        if specs.is_empty() {
            return Ok(LoraSet::default());
        }
        let layers = self.model_layers()?;
        let mut set = LoraSet::default();
        for spec in specs {
            spec.check()?;
            let file = LoraFile::read(&spec.local_file()?)?;
            set.adapters
                .push((spec.clone(), Arc::new(lora::fit(&file, &layers)?)));
        }
        Ok(set)
    }

    /// [`Spec::load`] with LoRAs: merged into the transformer's weights as they are read
    /// ([`Apply::Merge`]), or set as run-time terms of its layers ([`Apply::Runtime`]); the
    /// text encoders' parts are merged either way.
    pub fn load_with(
        self,
        device: &Device,
        dtype: DType,
        loras: LoraSet,
        apply: Apply,
    ) -> Result<Pipeline> {
        let none = LoraSet::default();
        let blocks = self.weights(&none).blocks("transformer")?;
        if self.quantize.is_some() && !device.is_cpu() {
            return Err(Error::Device(Message::about(Param::Quantize).text(
                ": quantized layers run on the CPU only for now; use --device cpu",
            )));
        }
        if blocks.is_some() && !device.is_cpu() {
            return Err(Error::Device(Message::from(
                "a quantized GGUF model runs on the CPU only for now; use --device cpu",
            )));
        }
        // Weights in blocks cannot take a merged LoRA: its terms are added at run time.
        let apply = if blocks.is_some() {
            Apply::Runtime
        } else {
            apply
        };
        let (merged, runtime) = match apply {
            Apply::Merge => (loras.clone(), LoraSet::default()),
            Apply::Runtime => (loras.text_only(), loras.clone()),
        };
        let w = self.weights(&merged);
        let stored = blocks.map(components::stored);
        // Every linear layer of the transformer gets a run-time LoRA slot, and its GGML blocks
        // when the file stores them or when quantizing.
        let (transformer, slots) = nn::quant::with_stored(stored, || {
            nn::quant::with(self.quantize, || {
                nn::lora::collect(|| {
                    w.load("transformer", dtype, device, |vb| {
                        self.family.transformer(vb)
                    })
                })
            })
        });
        let transformer = transformer?;
        let vae = nn::conv::with_bf16_operands(vae_bf16_operands(dtype, device), || {
            w.load("vae", vae_dtype(dtype, device), device, |vb| {
                VaeDecoder::new(&self.vae, vb)
            })
        })?;
        let text = self
            .family
            .load_text(&self.text_loader(device, dtype, &merged))?;
        let mut pipe = Pipeline {
            spec: self,
            transformer,
            vae,
            encoder: None,
            text: Some(text),
            keep_text: true,
            device: device.clone(),
            dtype,
            loras: LoraState {
                merged: merged.clone(),
                text: loras.text_only(),
                active: loras.specs(),
                slots,
                cache: Vec::new(),
            },
        };
        if !runtime.is_empty() {
            pipe.loras.active.clear();
            pipe.set_runtime(&runtime)?;
            pipe.loras.active = runtime.specs();
        }
        Ok(pipe)
    }

    /// Checks every component's weight files against its config by reading only their headers
    /// (downloading them first for Hub models).
    pub fn audit(&self) -> Result<Vec<ComponentAudit>> {
        let no_loras = LoraSet::default();
        let w = self.weights(&no_loras);
        let none = |_: &str| false;
        // The VAE encoder is checked when an edit first loads it; here its tensors are expected, unread.
        let encoder = |n: &str| {
            n.starts_with("encoder.")
                || n.starts_with("quant_conv.")
                || n == "bn.num_batches_tracked"
        };
        let mut all = vec![
            w.audit(
                "transformer",
                |vb| self.family.transformer(vb).map(drop),
                none,
            )?,
            w.audit(
                "vae",
                |vb| VaeDecoder::new(&self.vae, vb).map(drop),
                encoder,
            )?,
        ];
        for part in self.family.text_parts() {
            all.push(w.audit(part.dir(), part.builder()?, |n: &str| part.unread(n))?);
        }
        Ok(all.into_iter().flatten().collect())
    }

    /// Parameters of the tensors text-to-image generation reads (transformer, text encoders, VAE
    /// decoder), from the headers; None for a single-file checkpoint, whose audit covers only the
    /// components its file holds.
    pub fn read_params(&self) -> Result<Option<usize>> {
        if self.single.is_some() {
            return Ok(None);
        }
        Ok(Some(
            self.audit()?.iter().map(|c| c.audit.read_params).sum(),
        ))
    }

    /// Downloads (for Hub models) every file generation needs; returns the local paths.
    pub fn fetch_all(&self) -> Result<Vec<PathBuf>> {
        let mut files = Vec::new();
        for a in self.audit()? {
            files.extend(a.files);
        }
        for part in self.family.text_parts() {
            let dir = tokenizer_dir(self.source(), part.tokenizer())?;
            for f in ["tokenizer.json", "vocab.json", "merges.txt"] {
                if dir.join(f).is_file() {
                    files.push(dir.join(f));
                }
            }
        }
        Ok(files)
    }
}

/// The first of an edit's parameters (mask, strength, encode noise) that the request sets.
fn first_given(req: &Request, params: &[Param]) -> Option<Param> {
    params.iter().copied().find(|p| match p {
        Param::Mask => req.mask.is_some(),
        Param::Strength => req.strength.is_some(),
        Param::EncodeNoise => !req.encode_noise.is_empty(),
        _ => false,
    })
}

/// An edit's output size: the request's, else the input image's rounded down to the model's
/// multiple (as diffusers' image processor rounds it), with a notice when rounding changed it.
fn edit_size(
    img: &RgbImage,
    req: &Request,
    d: &Defaults,
    notices: &mut Vec<Message>,
) -> Result<(usize, usize)> {
    let m = d.size_multiple;
    let round = |v: usize| v / m * m;
    let width = req.width.unwrap_or(round(img.width));
    let height = req.height.unwrap_or(round(img.height));
    let (iw, ih) = (img.width, img.height);
    if width == 0 || height == 0 {
        return Err(Error::InvalidRequest(
            Message::about(Param::Image)
                .text(format!(
                    ": {iw}x{ih} pixels is smaller than the model's {m}-pixel multiple; pass "
                ))
                .param(Param::Width)
                .text(" and ")
                .param(Param::Height)
                .text(" to scale it up"),
        ));
    }
    let defaulted = req.width.is_none() || req.height.is_none();
    if defaulted
        && (width > d.max_side || height > d.max_side || width * height > request::MAX_PIXELS)
    {
        return Err(Error::InvalidRequest(
            Message::about(Param::Image)
                .text(format!(
                    ": {iw}x{ih} pixels is larger than this model generates (at most {} a side); pass ",
                    d.max_side
                ))
                .param(Param::Width)
                .text(" and ")
                .param(Param::Height)
                .text(" to scale it down"),
        ));
    }
    if (width, height) != (iw, ih) {
        let why = if defaulted {
            format!("; sides are multiples of {m} for this model")
        } else {
            String::new()
        };
        notices.push(Message::about(Param::Image).text(format!(
            ": {iw}x{ih} is resized to {width}x{height} (Lanczos, stretched, as diffusers does){why}"
        )));
    }
    Ok((width, height))
}

/// How a latent is taken from the VAE encoder's distribution.
enum Draw<'a> {
    /// The mean (diffusers' `sample_mode="argmax"`).
    Mean,
    /// `mean + std * eps`: the request's `eps`, else noise seeded from `seed`.
    Sample { eps: Option<&'a Tensor>, seed: u64 },
}

impl<'a> Draw<'a> {
    /// The `k`-th encoding of an edit: the request's `k`-th noise, else seed stream `k`.
    fn sample(init: &'a Init, seed: u64, k: usize) -> Self {
        Draw::Sample {
            eps: init.encode_noise.get(k),
            seed: sample::encode_noise_seed(seed, k as u64),
        }
    }
}

/// What sampling starts from and what an edit adds to each step.
struct Prepared {
    start: Tensor,
    blend: Option<sample::Blend>,
    channels: Option<Tensor>,
    /// Reference latents (1, C, h', w') in the run dtype, in order.
    references: Vec<Tensor>,
}

impl Prepared {
    fn from_noise(start: Tensor) -> Self {
        Self {
            start,
            blend: None,
            channels: None,
            references: Vec::new(),
        }
    }
}

/// FLUX.1 Kontext's training resolutions (width, height), as diffusers lists them.
const KONTEXT_RESOLUTIONS: [(usize, usize); 17] = [
    (672, 1568),
    (688, 1504),
    (720, 1456),
    (752, 1392),
    (800, 1328),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1328, 800),
    (1392, 752),
    (1456, 720),
    (1504, 688),
    (1568, 672),
];

/// FLUX.2's largest reference area (diffusers resizes larger images down to it).
const FLUX2_REFERENCE_AREA: usize = 1024 * 1024;

/// A FLUX.2 reference image (the `i`-th, from 0) as `Flux2KleinPipeline` prepares it: checked as
/// `Flux2ImageProcessor.check_image_input` does (sides of at least 64 pixels, aspect ratio at most
/// 8), resized down to 1024 x 1024 pixels of area when larger (PIL's Lanczos, sides truncated),
/// then cropped at its centre to the model's multiple `m`.
fn flux2_reference(img: &RgbImage, i: usize, m: usize) -> Result<RgbImage> {
    let (w, h) = (img.width, img.height);
    let bad = |why: String| {
        Error::InvalidRequest(Message::about(Param::Image).text(format!(" #{}: {why}", i + 1)))
    };
    if w < 64 || h < 64 {
        return Err(bad(format!(
            "{w}x{h} pixels is too small; FLUX.2 takes references of at least 64 pixels a side"
        )));
    }
    if w.max(h) as f64 / w.min(h) as f64 > 8.0 {
        return Err(bad(format!(
            "{w}x{h} pixels is too narrow; FLUX.2 takes references of aspect ratio at most 8:1"
        )));
    }
    let img = match w * h > FLUX2_REFERENCE_AREA {
        true => {
            let scale = (FLUX2_REFERENCE_AREA as f64 / (w * h) as f64).sqrt();
            let (sw, sh) = ((w as f64 * scale) as usize, (h as f64 * scale) as usize);
            image_io::lanczos_resize(img, sw, sh)
        }
        false => img.clone(),
    };
    Ok(image_io::center_crop(
        &img,
        img.width / m * m,
        img.height / m * m,
    ))
}

/// A reference-image model's output size, as `FluxKontextPipeline` sets it: the requested (or
/// default) aspect ratio at the default area (`round` half to even, as Python's), sides rounded down
/// to the model's multiple; a notice when that changes a size the request gave.
fn reference_output_size(
    req: &Request,
    d: &Defaults,
    notices: &mut Vec<Message>,
) -> (usize, usize) {
    let (w0, h0) = (req.width.unwrap_or(d.side), req.height.unwrap_or(d.side));
    let area = (d.side * d.side) as f64;
    let ratio = w0 as f64 / h0 as f64;
    let m = d.size_multiple;
    let width = ((area * ratio).sqrt().round_ties_even() as usize) / m * m;
    let height = ((area / ratio).sqrt().round_ties_even() as usize) / m * m;
    if (req.width.is_some() || req.height.is_some()) && (width, height) != (w0, h0) {
        notices.push(
            Message::about(Param::Width)
                .text("/")
                .param(Param::Height)
                .text(format!(
                    " {w0}x{h0} becomes {width}x{height}: this model generates about {}x{} pixels at the requested aspect ratio, as diffusers does",
                    d.side, d.side
                )),
        );
    }
    (width.max(m), height.max(m))
}

/// The size a reference image is resized to (diffusers' `FluxKontextPipeline`): its own, rounded
/// down to the model's multiple, or with `auto` the training resolution nearest its aspect ratio.
fn reference_size(img: &RgbImage, m: usize, auto: bool) -> Result<(usize, usize)> {
    let (w, h) = (img.width / m * m, img.height / m * m);
    if w == 0 || h == 0 {
        return Err(Error::InvalidRequest(Message::about(Param::Image).text(
            format!(
                ": {}x{} pixels is smaller than the model's {m}-pixel multiple",
                img.width, img.height
            ),
        )));
    }
    if !auto {
        return Ok((w, h));
    }
    let ratio = w as f64 / h as f64;
    // Python's `min` over (|difference|, w, h) tuples: ties go to the smaller width.
    let (_, rw, rh) = KONTEXT_RESOLUTIONS
        .iter()
        .map(|&(rw, rh)| ((ratio - rw as f64 / rh as f64).abs(), rw, rh))
        .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)))
        .expect("a non-empty table");
    Ok((rw / m * m, rh / m * m))
}

/// Wall time of each stage of one generation.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    pub text: Duration,
    /// An edit's VAE encoding of its input (zero for text-to-image).
    pub encode: Duration,
    pub steps: Vec<Duration>,
    pub decode: Duration,
}

impl Timings {
    pub fn denoise(&self) -> Duration {
        self.steps.iter().sum()
    }
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
    /// With a step cache: what each model call cost, per guidance branch (one branch, or the
    /// positive then the negative prompt's for two-call guidance); empty without.
    pub cache_calls: Vec<Vec<CallKind>>,
}

/// Image tokens (latent pixels / 4) one batched forward takes at most ([`Pipeline::batch_size`]):
/// four 512x512 images, one 1024x1024.
pub const BATCH_TOKENS: usize = 4096;

/// A loaded pipeline of any family.
pub struct Pipeline {
    pub spec: Spec,
    pub transformer: Box<dyn Transformer>,
    pub vae: VaeDecoder,
    /// The VAE encoder, loaded with the first edit.
    pub encoder: Option<VaeEncoder>,
    /// The text encoders; `None` once released (they are loaded again when next needed).
    pub text: Option<Box<dyn PromptEncoder>>,
    /// Keep the text encoders loaded after encoding (the default); `false` frees their memory for
    /// the denoising and decoding of a one-off generation.
    pub keep_text: bool,
    pub device: Device,
    pub dtype: DType,
    loras: LoraState,
}

/// The LoRAs a pipeline applies and how.
struct LoraState {
    /// Merged into the transformer's weights at load.
    merged: LoraSet,
    /// Merged into the loaded text encoders (their parts only).
    text: LoraSet,
    /// What the last request asked for (the load's LoRAs before the first).
    active: Vec<LoraSpec>,
    /// The transformer's run-time slots, by layer name.
    slots: nn::lora::Slots,
    /// Files already fitted, by local path.
    cache: Vec<(PathBuf, Arc<Fitted>)>,
}

impl Pipeline {
    /// The LoRAs applied now, with their weights.
    pub fn loras(&self) -> &[LoraSpec] {
        &self.loras.active
    }

    /// Applies `specs` from the next generation on (a request's `loras` does this itself). What
    /// differs from the LoRAs merged at load becomes run-time terms of the transformer's layers;
    /// the text encoders are loaded again with their parts when those change. Returns notices
    /// (unmatched keys, a LoRA given twice).
    pub fn set_loras(&mut self, specs: &[LoraSpec]) -> Result<Vec<Message>> {
        if specs == self.loras.active.as_slice() {
            return Ok(Vec::new());
        }
        let mut set = LoraSet::default();
        let mut layers = None;
        for spec in specs {
            spec.check()?;
            let path = spec.local_file()?;
            let cached = self
                .loras
                .cache
                .iter()
                .find(|(p, _)| *p == path)
                .map(|(_, f)| f.clone());
            let fitted = match cached {
                Some(f) => f,
                None => {
                    if layers.is_none() {
                        layers = Some(self.spec.model_layers()?);
                    }
                    let file = LoraFile::read(&path)?;
                    let f = Arc::new(lora::fit(&file, layers.as_ref().expect("just set"))?);
                    self.loras.cache.push((path, f.clone()));
                    f
                }
            };
            set.adapters.push((spec.clone(), fitted));
        }
        self.set_runtime(&set)?;
        let text = set.text_only();
        if text.specs() != self.loras.text.specs() {
            self.text = None;
            self.loras.text = text;
        }
        self.loras.active = specs.to_vec();
        Ok(set.notices())
    }

    /// Sets the transformer's run-time terms to `set` minus what is merged.
    fn set_runtime(&mut self, set: &LoraSet) -> Result<()> {
        let mut want: BTreeMap<String, Vec<lora::Term>> = BTreeMap::new();
        if set.transformer_specs() != self.loras.merged.transformer_specs() {
            // The merged LoRAs taken off first (a DoRA term after them rescales the weight without
            // them), then the new ones in order.
            for (w, terms) in self.loras.merged.deltas("transformer") {
                for t in terms {
                    if t.magnitude.is_some() {
                        return Err(Error::InvalidRequest(Message::about(Param::Lora).text(format!(
                            " {}: this DoRA LoRA is merged into the loaded weights, which cannot be undone per request; load the model without it and give it per request, or keep it",
                            t.source
                        ))));
                    }
                    want.entry(w.clone()).or_default().push(lora::Term {
                        scale: -t.scale,
                        ..t
                    });
                }
            }
            for (w, terms) in set.deltas("transformer") {
                want.entry(w).or_default().extend(terms);
            }
        }
        for w in want.keys() {
            let layer = w.strip_suffix(".weight").unwrap_or(w);
            if !self.loras.slots.contains_key(layer) {
                return Err(Error::InvalidRequest(Message::about(Param::Lora).text(format!(
                    ": layer `{layer}` takes no run-time LoRA term; load the model with this LoRA merged instead"
                ))));
            }
        }
        // DoRA's factors need the weights as the file has them (f32, on the CPU).
        let none = LoraSet::default();
        let weights = self.spec.weights(&none);
        let mut file = None;
        let mut deltas = BTreeMap::new();
        for (w, terms) in &want {
            let (pieces, affine) = lora::runtime_terms(terms, || {
                let vb = match &mut file {
                    Some(vb) => vb,
                    None => {
                        file.insert(weights.var_builder("transformer", DType::F32, &Device::Cpu)?)
                    }
                };
                let bias = w.strip_suffix(".weight").map(|l| format!("{l}.bias"));
                let bias = match bias.filter(|b| vb.contains_tensor(b)) {
                    Some(b) => Some(vb.get_unchecked(&b)?),
                    None => None,
                };
                Ok((vb.get_unchecked(w)?, bias))
            })?;
            deltas.insert(
                w.as_str(),
                nn::lora::Delta::new(&pieces, affine, &self.device)?,
            );
        }
        for (name, slot) in &self.loras.slots {
            slot.set(deltas.remove(format!("{name}.weight").as_str()).flatten());
        }
        Ok(())
    }

    /// Checks a request against the loaded model and fills in defaults.
    pub fn resolve(&self, req: &Request) -> Result<Resolved> {
        self.spec.resolve(req)
    }

    /// Keep the text encoders loaded after encoding (the default), or release them after each
    /// encoding (they are loaded again when next needed).
    pub fn keep_text_encoders(&mut self, keep: bool) {
        self.keep_text = keep;
    }

    /// The transformer as its own type, when the caller knows the family.
    pub fn transformer_as<T: 'static>(&self) -> Option<&T> {
        self.transformer.as_any().downcast_ref()
    }

    /// The text encoders, loaded again if they were released.
    pub fn text_encoders(&mut self) -> Result<&mut dyn PromptEncoder> {
        if self.text.is_none() {
            let text = self.spec.family.load_text(&self.spec.text_loader(
                &self.device,
                self.dtype,
                &self.loras.text,
            ))?;
            self.text = Some(text);
        }
        Ok(self.text.as_deref_mut().expect("just loaded"))
    }

    /// Encodes a resolved request's prompt, and its negative prompt when `negative` (the two as
    /// one batch where the family's encoders take it, [`PromptEncoder::encode_all`]); then
    /// releases the encoders unless they are kept.
    pub fn encode(&mut self, r: &Resolved, negative: bool) -> Result<(Prompts, Vec<Truncation>)> {
        let text = self.text_encoders()?;
        let mut prompts = vec![r.prompt.as_str()];
        if negative {
            prompts.push(&r.negative_prompt);
        }
        // Both through each encoder at once where the family batches them (one read of each
        // weight for the two).
        let (c, cut) = text.encode_all(&prompts, r.max_sequence_length)?;
        let mut c = c.into_iter();
        let (Some(pos), neg) = (c.next(), c.next()) else {
            return Err(
                candle_core::Error::Msg("the text encoders gave no conditioning".into()).into(),
            );
        };
        if !self.keep_text {
            self.text = None;
        }
        Ok((Prompts { pos, neg }, cut))
    }

    /// The seeded initial latents (1, C, H/f, W/f) a resolved request starts from.
    pub fn initial_noise(&self, r: &Resolved) -> Result<Tensor> {
        seeded_noise(r.seed, self.spec.noise_shape(r), &self.device)
    }

    /// Runs text encoding, sampling and decoding. `on_step(i)` is called after each step.
    pub fn generate(&mut self, req: &Request, on_step: &mut dyn FnMut(usize)) -> Result<Generated> {
        self.generate_observed(req, &mut |i| on_step(i))
    }

    /// [`Pipeline::generate`], the steps seen by `observer` (with the predictions of the final
    /// latents it asks for: previews).
    pub fn generate_observed(
        &mut self,
        req: &Request,
        observer: &mut dyn sample::Observer,
    ) -> Result<Generated> {
        Ok(self.generate_batch(req, 1, observer)?.remove(0))
    }

    /// Images of one batched forward at this size at most: as many as keep the batch within
    /// [`BATCH_TOKENS`] image tokens (one image when a single one is larger), and one for edits,
    /// requests that bring their own noise and caches that decide on the model's output (each
    /// image decides for itself, as in a run of its own).
    pub fn batch_size(&self, r: &Resolved) -> usize {
        let deciding = matches!(
            r.cache,
            Some(CacheSpec::FirstBlock { .. } | CacheSpec::TeaCache { .. })
        );
        if r.init.is_some() || r.noise.is_some() || deciding {
            return 1;
        }
        let f = self.spec.vae.scale_factor() * 2;
        let tokens = (r.width / f).max(1) * (r.height / f).max(1);
        (BATCH_TOKENS / tokens).max(1)
    }

    /// `n` images of one request in one batched forward, with seeds `seed`, `seed + 1`, ...: the
    /// images [`Pipeline::generate`] makes for each seed. Runs text encoding, sampling and
    /// decoding; `observer` sees the batch's steps. A batch of more than one is text-to-image from
    /// seeds: edits and requests with their own noise are refused (run them one at a time).
    pub fn generate_batch(
        &mut self,
        req: &Request,
        n: usize,
        observer: &mut dyn sample::Observer,
    ) -> Result<Vec<Generated>> {
        let mut r = self.spec.resolve(req)?;
        if n == 0 || (n > 1 && (r.init.is_some() || r.noise.is_some())) {
            return Err(Error::request(
                "a batch is text-to-image from seeds: run edits and given noise one at a time",
            ));
        }
        r.notices.extend(self.set_loras(&req.loras)?);
        let mut timings = Timings::default();
        let t0 = Instant::now();
        let cfg = self.spec.family.guidance(&r);
        let (prompts, truncations) = self.encode(&r, cfg.is_some())?;
        let prompts = match n {
            1 => prompts,
            _ => prompts.repeated(n)?,
        };
        self.device.synchronize()?;
        // The text encoders' activations are freed: their pages go back before sampling.
        cpu::heap::return_free_memory();
        timings.text = t0.elapsed();

        let seeds: Vec<u64> = (0..n as u64).map(|k| r.seed.wrapping_add(k)).collect();
        let noise = match &r.noise {
            Some(n) => n.to_device(&self.device)?.to_dtype(DType::F32)?,
            None => {
                let shape = self.spec.noise_shape(&r);
                let each: Vec<Tensor> = seeds
                    .iter()
                    .map(|&s| seeded_noise(s, shape, &self.device))
                    .collect::<Result<_>>()?;
                Tensor::cat(&each, 0)?
            }
        };
        let sched = self.spec.schedule(&r);
        let t0 = Instant::now();
        let Prepared {
            start,
            blend,
            channels,
            references,
        } = match &r.init {
            Some(init) => self.prepare_edit(&r, init, noise, sched.sigmas[0])?,
            None => Prepared::from_noise(noise),
        };
        self.device.synchronize()?;
        timings.encode = t0.elapsed();
        let (_, _, h, w) = start.dims4()?;
        let model =
            self.transformer
                .bind(&r, &prompts.pos, (h, w), &references, &sched.timesteps)?;
        let model: Box<dyn Denoise + '_> = match channels {
            Some(c) => Box::new(sample::WithChannels::new(model, c.to_dtype(self.dtype)?)),
            None => model,
        };
        let cache = r.cache.map(|c| {
            (
                c,
                self.spec.cache_calls(&r),
                self.spec.family.teacache_rescale(),
            )
        });
        let mut guided = sample::Guided::new(model.as_ref(), &prompts, cfg, self.dtype, cache)?;
        // Each step's blocks, large ones included, reuse the pages the step before freed (handed
        // back below).
        let heap = self.device.is_cpu().then(cpu::heap::LargeBlocks::keep);
        let (latents, steps) = sample::sample(
            &mut guided,
            &r,
            &sched,
            start,
            blend.as_ref(),
            self.dtype,
            observer,
        )?;
        timings.steps = steps;
        let cache_calls = guided.cache_calls();
        drop(guided);
        drop(heap);
        cpu::heap::return_free_memory();

        let t0 = Instant::now();
        let images = self.decode_all(&latents)?;
        cpu::heap::return_free_memory();
        timings.decode = t0.elapsed();
        images
            .into_iter()
            .zip(seeds)
            .enumerate()
            .map(|(k, (image, seed))| {
                let mut request = r.clone();
                request.seed = seed;
                Ok(Generated {
                    image,
                    latents: latents.narrow(0, k, 1)?,
                    request,
                    timings: timings.clone(),
                    truncations: truncations.clone(),
                    cache_calls: cache_calls.clone(),
                })
            })
            .collect()
    }

    /// What an edit starts from and adds to each step, by how the family takes the image: the
    /// input's latents noised to the first `sigma` that runs (diffusers' `scale_noise`) and, with a
    /// mask, the blend after each step or Fill's extra channels; or, for a reference (Kontext), the
    /// distribution's mean (`sample_mode="argmax"`) as extra tokens and noise to start from.
    fn prepare_edit(
        &mut self,
        r: &Resolved,
        init: &Init,
        noise: Tensor,
        sigma: f32,
    ) -> Result<Prepared> {
        let edit = self.spec.family.edit();
        if matches!(edit, Edit::Reference | Edit::References) {
            let mut references = Vec::new();
            for img in std::iter::once(&init.image).chain(&init.references) {
                references.push(self.encode_mean(img)?.to_dtype(self.dtype)?);
            }
            return Ok(Prepared {
                references,
                ..Prepared::from_noise(noise)
            });
        }
        let image = self.encode_image(init, r.seed)?;
        let sigma = f64::from(sigma);
        let start = ((&noise * sigma)? + (&image * (1.0 - sigma))?)?;
        let mut prepared = Prepared::from_noise(start);
        match (&init.mask, edit) {
            (Some(bits), Edit::Latents) => {
                prepared.blend = Some(sample::Blend {
                    mask: self.latent_mask(bits, r.width, r.height)?,
                    image,
                    noise,
                });
            }
            (Some(bits), Edit::MaskChannels) => {
                prepared.channels = Some(self.fill_channels(init, bits, r.seed)?);
            }
            (Some(_), Edit::Reference | Edit::References) | (None, _) => {}
        }
        Ok(prepared)
    }

    /// A pixel mask (0/1, `width * height`) at latent resolution ([`image_io::mask_at_latents`]),
    /// (1, 1, h, w) f32.
    fn latent_mask(&self, bits: &[u8], width: usize, height: usize) -> Result<Tensor> {
        let f = self.spec.vae.scale_factor();
        let v: Vec<f32> = image_io::mask_at_latents(bits, width, height, f)
            .into_iter()
            .map(f32::from)
            .collect();
        Ok(Tensor::from_vec(
            v,
            (1, 1, height / f, width / f),
            &self.device,
        )?)
    }

    /// The VAE encoder, loaded (after its tensors are checked) on first use.
    pub fn vae_encoder(&mut self) -> Result<&VaeEncoder> {
        if self.encoder.is_none() {
            let dtype = vae_dtype(self.dtype, &self.device);
            let cfg = &self.spec.vae;
            let no_loras = LoraSet::default();
            let weights = self.spec.weights(&no_loras);
            let bf16 = vae_bf16_operands(self.dtype, &self.device);
            let enc = nn::conv::with_bf16_operands(bf16, || {
                weights.load("vae", dtype, &self.device, |vb| VaeEncoder::new(cfg, vb))
            })?;
            self.encoder = Some(enc);
        }
        Ok(self.encoder.as_ref().expect("just loaded"))
    }

    /// An edit's input image -> its latents in sampler space (1, C, h, w) f32.
    pub fn encode_image(&mut self, init: &Init, seed: u64) -> Result<Tensor> {
        let x = vae::from_rgb8(&init.image, &self.device)?;
        self.encode_pixels(&x, Draw::sample(init, seed, 0))
    }

    /// An image -> the mean of its latent distribution in sampler space (1, C, h, w) f32.
    pub fn encode_mean(&mut self, img: &RgbImage) -> Result<Tensor> {
        let x = vae::from_rgb8(img, &self.device)?;
        self.encode_pixels(&x, Draw::Mean)
    }

    /// Pixels (1, 3, H, W) in [-1, 1] -> latents in sampler space (1, C, h, w) f32: encoded, taken
    /// from the latent distribution as `draw` says, scaled as the family does.
    fn encode_pixels(&mut self, x: &Tensor, draw: Draw) -> Result<Tensor> {
        let device = self.device.clone();
        let _heap = device.is_cpu().then(cpu::heap::LargeBlocks::keep);
        let x = x.to_dtype(vae_dtype(self.dtype, &device))?;
        let tiling = self.spec.vae_tiling;
        let enc = self.vae_encoder()?;
        let dist = enc.encode_with(&x, tiling)?;
        let z = match draw {
            Draw::Mean => dist.mean,
            Draw::Sample { eps: Some(e), .. } => dist.sample(&e.to_device(&device)?)?,
            Draw::Sample { eps: None, seed } => {
                dist.sample(&sample::seeded_noise(seed, dist.mean.dims4()?, &device)?)?
            }
        };
        Ok(enc.scale(&z.to_dtype(DType::F32)?)?)
    }

    /// FLUX.1 Fill's extra input channels: the masked image's latents (the input with the mask's
    /// pixels set to 0, i.e. mid gray) and the full-resolution mask folded into f x f channels per
    /// latent pixel, as `FluxFillPipeline.prepare_mask_latents` does. (1, C + f^2, h, w) f32.
    fn fill_channels(&mut self, init: &Init, bits: &[u8], seed: u64) -> Result<Tensor> {
        let (width, height) = (init.image.width, init.image.height);
        let f = self.spec.vae.scale_factor();
        let keep: Vec<f32> = bits.iter().map(|&b| 1.0 - f32::from(b)).collect();
        let keep = Tensor::from_vec(keep, (1, 1, height, width), &self.device)?;
        let x = vae::from_rgb8(&init.image, &self.device)?.broadcast_mul(&keep)?;
        let masked = self.encode_pixels(&x, Draw::sample(init, seed, 1))?;
        let m: Vec<f32> = bits.iter().map(|&b| f32::from(b)).collect();
        let folded = Tensor::from_vec(m, (1, height / f, f, width / f, f), &self.device)?
            .permute((0, 2, 4, 1, 3))?
            .reshape((1, f * f, height / f, width / f))?;
        Ok(Tensor::cat(&[&masked, &folded], 1)?)
    }

    /// Latents in sampler space (1, C, h, w) -> RGB image through the VAE (in [`vae_dtype`]).
    pub fn decode(&self, latents: &Tensor) -> Result<RgbImage> {
        Ok(self.decode_all(latents)?.remove(0))
    }

    /// Latents in sampler space (b, C, h, w) -> b RGB images, decoded one at a time (the VAE's
    /// activations are the largest of a run).
    pub fn decode_all(&self, latents: &Tensor) -> Result<Vec<RgbImage>> {
        let dtype = vae_dtype(self.dtype, latents.device());
        // The VAE's activations, the largest of a run, reuse each other's pages.
        let _heap = latents.device().is_cpu().then(cpu::heap::LargeBlocks::keep);
        (0..latents.dim(0)?)
            .map(|k| {
                let z = self
                    .vae
                    .unscale(&latents.narrow(0, k, 1)?.to_dtype(DType::F32)?)?
                    .to_dtype(dtype)?;
                let x = self.vae.decode_with(&z, self.spec.vae_tiling)?;
                let (height, width, data) = vae::to_rgb8(&x)?.remove(0);
                Ok(RgbImage {
                    width,
                    height,
                    data,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// FLUX.2's reference sizes, against `Flux2KleinPipeline`'s (diffusers 0.42.1, multiple 16,
    /// computed with its expressions): larger than 1024 x 1024 pixels resized down to that area
    /// (sides truncated), then cropped to the multiple.
    #[test]
    fn flux2_references_keep_their_size_up_to_a_megapixel() {
        for ((w, h), want) in [
            ((1100, 1000), (1072, 976)),
            ((2000, 500), (2000, 496)),
            ((1024, 1024), (1024, 1024)),
            ((1025, 1024), (1024, 1008)),
            ((4000, 3000), (1168, 880)),
        ] {
            let img = RgbImage {
                width: w,
                height: h,
                data: vec![7; w * h * 3],
            };
            let r = flux2_reference(&img, 0, 16).unwrap();
            assert_eq!((r.width, r.height), want, "{w}x{h}");
        }
    }

    /// Against `FluxKontextPipeline`'s choice (diffusers 0.42.1, multiple 16), computed with its
    /// own expression: `min((abs(ratio - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)`.
    #[test]
    fn kontext_references_take_the_training_resolution_nearest_their_aspect_ratio() {
        let cases = [
            ((1920, 1080), (1392, 752)),
            ((1080, 1920), (752, 1392)),
            ((500, 500), (1024, 1024)),
            ((4000, 3000), (1184, 880)),
            ((333, 1000), (672, 1568)),
            ((1000, 250), (1568, 672)),
            ((817, 613), (1184, 880)),
        ];
        for ((w, h), want) in cases {
            let img = RgbImage {
                width: w,
                height: h,
                data: Vec::new(),
            };
            assert_eq!(reference_size(&img, 16, true).unwrap(), want, "{w}x{h}");
        }
        let img = RgbImage {
            width: 45,
            height: 29,
            data: Vec::new(),
        };
        assert_eq!(reference_size(&img, 4, false).unwrap(), (44, 28));
    }
}
