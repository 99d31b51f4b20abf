//! What differs between model families, as traits the generic pipeline ([`super::Spec`],
//! [`super::Pipeline`]) drives: which configs a family reads, its request defaults and guidance,
//! its schedule, its text encoders and its transformer. Everything else (opening, request checks,
//! weight checks and loading, text-encoder lifetime, noise, sampling, guidance, decoding) is written
//! once in the pipeline.
//!
//! A family is a file in this folder that implements [`Family`] and [`Transformer`] and names
//! itself in [`FAMILIES`].

use super::components::{OpenCtx, TextLoader, TextPart};
use super::{chroma, flux, flux2, sd3};
use crate::config::{SchedulerConfig, VaeConfig};
use crate::error::Result;
use crate::loader::single::Format;
use crate::mmdit::cache::BlockCache;
use crate::request::Resolved;
use crate::sampling::Schedule;
use crate::text::{Conditioning, PromptEncoder};
use candle_core::Tensor;
use candle_nn::VarBuilder;

/// A family as the registry knows it.
#[derive(Debug)]
pub struct FamilyEntry {
    /// Short name (`sd3`), as presets name their family.
    pub name: &'static str,
    /// diffusers' pipeline class in `model_index.json`.
    pub pipeline_class: &'static str,
    /// The layout of this family's original single-file checkpoints.
    pub single_file: Format,
    /// Reads and checks the family's own configs (transformer, text encoders) and their coupling.
    pub open: fn(&OpenCtx) -> Result<Box<dyn Family>>,
}

impl FamilyEntry {
    const fn new(
        name: &'static str,
        pipeline_class: &'static str,
        single_file: Format,
        open: fn(&OpenCtx) -> Result<Box<dyn Family>>,
    ) -> Self {
        Self {
            name,
            pipeline_class,
            single_file,
            open,
        }
    }
}

/// Every family the engine runs.
pub const FAMILIES: &[FamilyEntry] = &[
    FamilyEntry::new("sd3", "StableDiffusion3Pipeline", Format::Sd3, sd3::open),
    FamilyEntry::new("flux", "FluxPipeline", Format::Flux, flux::open),
    FamilyEntry::new(
        "flux-fill",
        "FluxFillPipeline",
        Format::Flux,
        flux::open_fill,
    ),
    FamilyEntry::new(
        "flux-kontext",
        "FluxKontextPipeline",
        Format::Flux,
        flux::open_kontext,
    ),
    FamilyEntry::new("chroma", "ChromaPipeline", Format::Chroma, chroma::open),
    FamilyEntry::new("flux2-dev", "Flux2Pipeline", Format::Flux2, flux2::open_dev),
    FamilyEntry::new(
        "flux2-klein",
        "Flux2KleinPipeline",
        Format::Flux2,
        flux2::open_klein,
    ),
];

/// The family whose pipeline class this is.
pub fn by_class(class: &str) -> Option<&'static FamilyEntry> {
    FAMILIES.iter().find(|f| f.pipeline_class == class)
}

/// The family of this short name.
pub fn by_name(name: &str) -> Option<&'static FamilyEntry> {
    FAMILIES.iter().find(|f| f.name == name)
}

/// A request's defaults and limits for one model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Defaults {
    /// Image side (pixels) when the request gives none.
    pub side: usize,
    /// Image sides must be multiples of this: pixels per latent token.
    pub size_multiple: usize,
    /// Largest image side.
    pub max_side: usize,
    pub steps: usize,
    pub guidance: f64,
    /// T5 length when the request gives none.
    pub max_sequence_length: usize,
    /// Longest T5 sequence the pipeline accepts.
    pub max_sequence_limit: usize,
}

/// Classifier-free guidance of one request: `v = v_neg + scale (v_pos - v_neg)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cfg {
    pub scale: f64,
    /// Both prompts in one batch of two (SD3), or two model calls (Flux's true CFG), as diffusers
    /// runs them.
    pub batched: bool,
}

/// How a family's model takes an edit's mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edit {
    /// Inpainting by putting the input back outside the mask after each step (diffusers'
    /// `*InpaintPipeline`s).
    Latents,
    /// The masked image's latents and the mask as extra input channels of a model trained for
    /// them (FLUX.1 Fill); the mask is required.
    MaskChannels,
    /// The image is a reference: its latents are extra tokens beside the generated ones, which
    /// start from noise (FLUX.1 Kontext); no mask, no strength.
    Reference,
    /// Several reference images, each at its own size (cropped to the model's multiple), their
    /// tokens after the generated ones with time ids 10, 20, ... (FLUX.2); no mask, no strength.
    References,
}

/// The configs and choices of one family's model.
pub trait Family: Send + Sync {
    /// One line on the model's variant (`mmdit inspect`).
    fn describe(&self) -> String;

    /// Request defaults and limits.
    fn defaults(&self, vae: &VaeConfig) -> Defaults;

    /// Checks and notices of the family's own (after the shared checks); `model` names the model.
    fn check(&self, r: &mut Resolved, model: &str) -> Result<()>;

    /// The classifier-free guidance a resolved request runs, if any.
    fn guidance(&self, r: &Resolved) -> Option<Cfg>;

    /// The schedule of `steps` steps for an image of `tokens` latent tokens.
    fn schedule(&self, scheduler: &SchedulerConfig, steps: usize, tokens: usize) -> Schedule;

    /// Builds the transformer on its weights (or on the weight audit's stand-ins).
    fn transformer(&self, vb: VarBuilder) -> candle_core::Result<Box<dyn Transformer>>;

    /// The text encoders and their tokenizers, in the order they are loaded.
    fn text_parts(&self) -> Vec<TextPart>;

    /// Loads the text encoders.
    fn load_text(&self, load: &TextLoader) -> Result<Box<dyn PromptEncoder>>;

    /// How the model takes an edit's mask.
    fn edit(&self) -> Edit {
        Edit::Latents
    }

    /// An edit's strength when the request gives none (diffusers' default for the pipeline).
    fn default_strength(&self) -> f64 {
        0.6
    }

    /// TeaCache's rescaling polynomial for the model ([`crate::cache`]); the identity unless a
    /// fit was published.
    fn teacache_rescale(&self) -> &'static [f64] {
        crate::cache::IDENTITY_RESCALE
    }
}

/// A transformer bound to one request.
pub type Bound<'a> = Result<Box<dyn Denoise + 'a>>;

/// Each text stream's embedding for one request: the sampler hands every step the same conditioning
/// tensors (a clone shares candle's tensor id), so a family's bound transformer runs its context
/// embedder once per stream (two: a prompt and its negative) rather than once per step.
#[derive(Default)]
pub(super) struct EmbeddedTexts(std::cell::RefCell<Vec<(candle_core::TensorId, Tensor)>>);

impl EmbeddedTexts {
    /// `text`'s embedding, computed by `embed` the first time it is asked for.
    pub fn get(
        &self,
        text: &Tensor,
        embed: impl FnOnce() -> candle_core::Result<Tensor>,
    ) -> Result<Tensor> {
        if let Some((_, e)) = self.0.borrow().iter().find(|(id, _)| *id == text.id()) {
            return Ok(e.clone());
        }
        let e = embed()?;
        let mut kept = self.0.borrow_mut();
        if kept.len() == 2 {
            kept.remove(0);
        }
        kept.push((text.id(), e.clone()));
        Ok(e)
    }
}

/// A request's step embeddings, computed ahead with every modulation layer's product for all of
/// the request's timesteps at once (the models' `remember_steps`: each modulation weight read
/// once per request, not once per step), per stream as [`EmbeddedTexts`] keeps texts (by the
/// pooled text's tensor id): a stream's first step remembers all its steps. What the layers keep
/// is theirs to drop under [`Self::token`] when the request ends (the family's step's `Drop`).
pub(super) struct StepEmbeddings {
    token: u64,
    timesteps: Vec<f32>,
    kept: std::cell::RefCell<Vec<(candle_core::TensorId, Option<Vec<Tensor>>)>>,
}

/// Tokens of [`StepEmbeddings`], one per request.
static NEXT_TOKEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl StepEmbeddings {
    pub fn new(timesteps: &[f32]) -> Self {
        Self {
            token: NEXT_TOKEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            timesteps: timesteps.to_vec(),
            kept: Default::default(),
        }
    }

    /// The request's token, under which the layers keep its products.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// The embedding of the step at timestep `t` for the stream of `pooled`: on the stream's first
    /// step, `remember(token, timesteps)` computes every step's (or declines, None); None where `t`
    /// is not one of the request's timesteps (a sampler's midpoint) or remembering declined.
    pub fn get(
        &self,
        t: f32,
        pooled: &Tensor,
        remember: impl FnOnce(u64, &[f32]) -> candle_core::Result<Option<Vec<Tensor>>>,
    ) -> Result<Option<Tensor>> {
        let i = self
            .timesteps
            .iter()
            .position(|&s| s.to_bits() == t.to_bits());
        let found = |embs: &Option<Vec<Tensor>>| Some(embs.as_ref()?.get(i?)?.clone());
        if let Some((_, embs)) = self.kept.borrow().iter().find(|(id, _)| *id == pooled.id()) {
            return Ok(found(embs));
        }
        let embs = remember(self.token, &self.timesteps)?;
        let emb = found(&embs);
        let mut kept = self.kept.borrow_mut();
        if kept.len() == 2 {
            kept.remove(0);
        }
        kept.push((pooled.id(), embs));
        Ok(emb)
    }
}

/// A family's loaded transformer.
pub trait Transformer: Send + Sync + AsAny {
    /// The transformer bound to one request: `prompt` is the positive prompt's conditioning (its
    /// length sets Flux's position ids), `latent` the (h, w) of the latents, `references` an
    /// edit's reference latents, each (1, C, h', w'), for a family that takes them
    /// ([`Edit::Reference`], [`Edit::References`]), `timesteps` the schedule's (sigma x 1000,
    /// those that run).
    fn bind<'a>(
        &'a self,
        r: &Resolved,
        prompt: &Conditioning,
        latent: (usize, usize),
        references: &[Tensor],
        timesteps: &[f32],
    ) -> Bound<'a>;
}

/// The model itself, for callers that know its type (the parity tests).
pub trait AsAny {
    fn as_any(&self) -> &dyn std::any::Any;
}

impl<T: std::any::Any> AsAny for T {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// One step's model call, as guidance sees it.
pub trait Denoise {
    /// The velocity for latents x (b, C, h, w) in the run dtype at `timestep` (sigma x 1000),
    /// conditioned on a batch of b prompts; (b, C, h, w) in the run dtype. `cache`: a step
    /// cache's hold on the blocks, for this call.
    fn velocity(
        &self,
        x: &Tensor,
        timestep: f32,
        cond: &Conditioning,
        cache: Option<&mut dyn BlockCache>,
    ) -> Result<Tensor>;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each text embedded once while it is one of the last two asked for; clones share the entry.
    #[test]
    fn each_text_is_embedded_once() {
        let texts = EmbeddedTexts::default();
        let dev = candle_core::Device::Cpu;
        let (a, b, c) = (
            Tensor::zeros(3, candle_core::DType::F32, &dev).unwrap(),
            Tensor::ones(3, candle_core::DType::F32, &dev).unwrap(),
            Tensor::ones(3, candle_core::DType::F32, &dev).unwrap(),
        );
        let calls = std::cell::Cell::new(0);
        let embed = |t: &Tensor| {
            calls.set(calls.get() + 1);
            t + 1.0
        };
        let sum = |t: Tensor| t.sum_all().unwrap().to_scalar::<f32>().unwrap();
        for _ in 0..3 {
            assert_eq!(sum(texts.get(&a, || embed(&a)).unwrap()), 3.0);
            assert_eq!(sum(texts.get(&b.clone(), || embed(&b)).unwrap()), 6.0);
        }
        assert_eq!(calls.get(), 2);
        // A third text (equal in value to b, but another tensor) pushes out the oldest, a.
        texts.get(&c, || embed(&c)).unwrap();
        texts.get(&b, || embed(&b)).unwrap();
        assert_eq!(calls.get(), 3);
        texts.get(&a, || embed(&a)).unwrap();
        assert_eq!(calls.get(), 4);
    }
}
