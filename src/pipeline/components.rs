//! A model's components as files: configs read and checked, weights served per component folder
//! (or from a single-file checkpoint), every component's tensors checked against the file headers
//! before its weights are read, and the text encoders with their tokenizers.

use crate::config::{self, ClipTextConfig, ModelIndex, Qwen3Config, T5Config, VaeConfig};
use crate::error::{Error, Result};
use crate::loader::audit::{Audit, ShapeBackend, TensorMeta};
use crate::loader::single::{Mapping, SingleFile};
use crate::loader::{self, FileSource};
use crate::lora::{LoraSet, MergeBackend};
use crate::nn::linear::read_in_place;
use crate::text::clip::ClipText;
use crate::text::lm::{LmEncoder, LmKind};
use crate::text::t5::T5Encoder;
use crate::text::TextTokenizer;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use candle_transformers::models::t5;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What a family reads its configs from when a model is opened.
pub struct OpenCtx<'a> {
    pub src: &'a dyn FileSource,
    pub index: &'a ModelIndex,
    /// `model_index.json`'s path, named in coupling errors.
    pub index_path: &'a Path,
    pub vae: &'a VaeConfig,
}

impl OpenCtx<'_> {
    /// Reads a component config and validates it.
    pub fn config<T: serde::de::DeserializeOwned + config::Validate>(
        &self,
        rel: &str,
    ) -> Result<(T, PathBuf)> {
        read_checked(self.src, rel)
    }

    /// Fails with a config error on `model_index.json` unless `ok`.
    pub fn check(&self, ok: bool, msg: impl FnOnce() -> String) -> Result<()> {
        config::check(self.index_path, ok, msg)
    }

    /// T5's width must be the transformer's `joint_attention_dim`.
    pub fn check_t5_width(&self, t5: &T5Config, joint_attention_dim: usize) -> Result<()> {
        self.check(t5.d_model == joint_attention_dim, || {
            format!(
                "T5 width {} differs from the transformer's joint_attention_dim {joint_attention_dim}",
                t5.d_model
            )
        })
    }

    /// The transformer takes `per_latent` input channels per VAE latent channel (4 when it packs
    /// 2x2 patches).
    pub fn check_latent_channels(&self, in_channels: usize, per_latent: usize) -> Result<()> {
        let latent = self.vae.latent_channels;
        self.check(latent * per_latent == in_channels, || {
            let packed = if per_latent > 1 {
                format!(" (= {per_latent} x latent channels when packed)")
            } else {
                String::new()
            };
            format!("the VAE has {latent} latent channels but the transformer takes {in_channels}{packed}")
        })
    }
}

/// Reads a JSON file of the model.
pub(super) fn read<T: serde::de::DeserializeOwned>(
    src: &dyn FileSource,
    rel: &str,
) -> Result<(T, PathBuf)> {
    let p = loader::require(src, rel)?;
    Ok((config::read_json(&p)?, p))
}

/// Reads a component config and validates it.
pub(super) fn read_checked<T: serde::de::DeserializeOwned + config::Validate>(
    src: &dyn FileSource,
    rel: &str,
) -> Result<(T, PathBuf)> {
    let (c, p): (T, PathBuf) = read(src, rel)?;
    c.validate(&p)?;
    Ok((c, p))
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

/// Whether the VAE's convolutions take bf16 operands ([`crate::nn::conv::with_bf16_operands`]): a
/// bf16 run on the CPU, whose VAE tensors are f32 ([`vae_dtype`]) but whose convolutions then run
/// on the AMX tiles or fast AVX512-BF16 dot products where the CPU has them, and hold their
/// weights as bf16 either way.
pub fn vae_bf16_operands(dtype: DType, device: &Device) -> bool {
    dtype == DType::BF16 && device.is_cpu()
}

/// The dtype T5 runs in: it overflows in f16, so f32 then.
pub fn t5_dtype(dtype: DType) -> DType {
    if dtype == DType::F16 {
        DType::F32
    } else {
        dtype
    }
}

/// One component's weights checked against its config, headers only.
pub struct ComponentAudit {
    pub name: &'static str,
    pub files: Vec<PathBuf>,
    pub audit: Audit,
}

/// Where each component's weights come from: the model's component folders, or, for a single-file
/// checkpoint, the file for the components it holds and the components model for the rest.
pub(crate) struct Weights<'a> {
    pub src: &'a dyn FileSource,
    pub single: Option<&'a SingleFile>,
    /// A text encoder's weights from a file of their own (`--t5`): its folder and mapping.
    pub own: Option<(&'static str, &'a Mapping)>,
    /// GGUF blocks served dequantized, never as blocks (`--dequantize`).
    pub dequantize: bool,
    /// LoRAs merged into the components they touch as their weights are read.
    pub merge: &'a LoraSet,
}

const WEIGHT_STEMS: [&str; 2] = ["diffusion_pytorch_model", "model"];

/// The [`crate::nn::source::Source`] of a folder's safetensors files: each tensor's bytes where
/// the files are mapped, their pages released after the visit or kept, as the layer asks.
fn source_of(st: &loader::weights::Safetensors) -> crate::nn::source::Source {
    use crate::nn::source::{Pages, Visit};
    let st = st.clone();
    std::sync::Arc::new(move |name: &str, pages: Pages, f: &mut Visit| {
        let f = |d, s: &[usize], b: &[u8], done: &dyn Fn(&[u8])| f(d, s, b, done);
        match pages {
            Pages::Release => st.with_raw(name, f),
            Pages::Keep => st.with_raw_resident(name, f),
        }
        .is_some()
    })
}

impl Weights<'_> {
    /// Where component `dir` comes from when not from its folder: a file of its own, or the
    /// single-file checkpoint.
    fn mapping(&self, dir: &str) -> Option<&Mapping> {
        match self.own {
            Some((d, m)) if d == dir => Some(m),
            _ => self.single.and_then(|s| s.component(dir)),
        }
    }

    /// The component in folder `dir` as a [`VarBuilder`] at `dtype`.
    pub(super) fn var_builder(
        &self,
        dir: &str,
        dtype: DType,
        device: &Device,
    ) -> Result<VarBuilder<'static>> {
        Ok(self.var_builder_and_source(dir, dtype, device)?.0)
    }

    /// [`Self::var_builder`], and for a folder's safetensors files read as they are (no LoRA
    /// merged in) the [`crate::nn::source::Source`] its packed layers read their bytes from.
    fn var_builder_and_source(
        &self,
        dir: &str,
        dtype: DType,
        device: &Device,
    ) -> Result<(VarBuilder<'static>, Option<crate::nn::source::Source>)> {
        let deltas = self.merge.deltas(dir);
        let (backend, source): (Box<dyn candle_nn::var_builder::SimpleBackend>, _) =
            match self.mapping(dir) {
                Some(m) => (m.backend()?, None),
                None => {
                    let files = loader::component_weights(self.src, dir, &WEIGHT_STEMS)?;
                    let st = loader::weights::Safetensors::open(&files)?;
                    let source = deltas.is_empty().then(|| source_of(&st));
                    (Box::new(st), source)
                }
            };
        let backend = if deltas.is_empty() {
            backend
        } else {
            Box::new(MergeBackend {
                inner: backend,
                deltas,
            })
        };
        Ok((
            VarBuilder::from_backend(backend, dtype, device.clone()),
            source,
        ))
    }

    /// The component's weights a GGUF file stores in GGML blocks, if it has any.
    pub fn blocks(&self, dir: &str) -> Result<Option<loader::single::Blocks>> {
        if self.dequantize {
            return Ok(None);
        }
        match self.mapping(dir) {
            Some(m) => m.blocks(),
            None => Ok(None),
        }
    }

    /// The component's files and its tensors' names and shapes (headers only).
    pub fn headers(&self, dir: &str) -> Result<(Vec<PathBuf>, BTreeMap<String, TensorMeta>)> {
        if let Some(m) = self.mapping(dir) {
            return Ok((m.files.clone(), m.metas()));
        }
        let files = loader::component_weights(self.src, dir, &WEIGHT_STEMS)?;
        let headers = loader::audit::read_headers(&files)?;
        Ok((files, headers))
    }

    /// Builds the component in `dir` with `build`: first on the names and shapes of its files'
    /// headers, so that a missing or misshapen tensor is named before any weight is read, then on
    /// the weights themselves.
    pub fn load<T>(
        &self,
        dir: &str,
        dtype: DType,
        device: &Device,
        build: impl Fn(VarBuilder) -> candle_core::Result<T>,
    ) -> Result<T> {
        let (_, headers) = self.headers(dir)?;
        // On names and shapes only: blocks a file stores are not read for it.
        let audit = crate::nn::quant::with_stored(None, || {
            ShapeBackend::audit(headers, |vb| build(vb).map(drop), |_| true)
        })?;
        if let Some((name, want)) = audit.missing.into_iter().next() {
            return Err(Error::Tensor {
                name,
                msg: format!("missing from the weight files (expected shape {want:?})"),
            });
        }
        if let Some((name, want, got)) = audit.wrong_shape.into_iter().next() {
            return Err(Error::Tensor {
                name,
                msg: format!("wrong shape: expected {want:?}, got {got:?}"),
            });
        }
        let (vb, source) = self.var_builder_and_source(dir, dtype, device)?;
        Ok(crate::nn::source::with_source(source, || build(vb))?)
    }

    /// Checks the component in `dir` against what `build` reads, headers only; `ignore` marks
    /// tensors the engine deliberately does not read. A single-file model is audited for the
    /// components its file holds.
    pub fn audit(
        &self,
        dir: &'static str,
        build: impl FnOnce(VarBuilder) -> candle_core::Result<()>,
        ignore: impl Fn(&str) -> bool,
    ) -> Result<Option<ComponentAudit>> {
        if self.single.is_some() && self.mapping(dir).is_none() {
            return Ok(None);
        }
        let (files, headers) = self.headers(dir)?;
        let audit = ShapeBackend::audit(headers, build, ignore)?;
        Ok(Some(ComponentAudit {
            name: dir,
            files,
            audit,
        }))
    }
}

/// A file's blocks as the layers built in [`crate::nn::quant::with_stored`] take them.
pub(super) fn stored(blocks: loader::single::Blocks) -> crate::nn::quant::Stored {
    let b = std::sync::Arc::new(blocks);
    std::sync::Arc::new(move |name: &str| {
        b.get(name).map(|r| {
            r.map(|(dtype, shape, bytes)| crate::nn::quant::StoredWeight {
                dtype,
                shape,
                bytes,
            })
        })
    })
}

/// The tokenizer folder `dir`, fetched (for Hub models) file by file: `tokenizer.json`, or the slow
/// tokenizer's `vocab.json` + `merges.txt` when the folder has no `tokenizer.json` (CLIP in the SD3
/// and Flux repos), and the special-token configs.
pub(super) fn tokenizer_dir(src: &dyn FileSource, dir: &str) -> Result<PathBuf> {
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
    for extra in [
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    ] {
        src.file(&format!("{dir}/{extra}"))?;
    }
    Ok(main.parent().map(PathBuf::from).unwrap_or_default())
}

/// A CLIP text encoder of a pipeline and its tokenizer folder.
#[derive(Debug, Clone)]
pub struct ClipPart {
    /// Component folder (`text_encoder`).
    pub dir: &'static str,
    pub tokenizer: &'static str,
    pub config: ClipTextConfig,
    /// Has `text_projection` (`CLIPTextModelWithProjection`).
    pub projection: bool,
}

/// A T5 encoder of a pipeline and its tokenizer folder.
#[derive(Debug, Clone)]
pub struct T5Part {
    pub dir: &'static str,
    pub tokenizer: &'static str,
    /// Its `config.json`, read whole by candle-transformers' T5.
    pub config: PathBuf,
}

/// A language model as text encoder of a pipeline (FLUX.2's Qwen3 or Mistral 3), its tokenizer
/// folder and the hidden states taken from it.
#[derive(Debug, Clone)]
pub struct LmPart {
    pub dir: &'static str,
    pub tokenizer: &'static str,
    pub kind: LmKind,
    /// The decoder's config (Mistral 3's `text_config`).
    pub config: Qwen3Config,
    /// Indices into transformers' `hidden_states` (diffusers' `text_encoder_out_layers`).
    pub layers: Vec<usize>,
}

/// A text encoder of a pipeline.
#[derive(Debug, Clone)]
pub enum TextPart {
    Clip(ClipPart),
    T5(T5Part),
    Lm(LmPart),
}

impl TextPart {
    pub fn dir(&self) -> &'static str {
        match self {
            TextPart::Clip(p) => p.dir,
            TextPart::T5(p) => p.dir,
            TextPart::Lm(p) => p.dir,
        }
    }

    pub fn tokenizer(&self) -> &'static str {
        match self {
            TextPart::Clip(p) => p.tokenizer,
            TextPart::T5(p) => p.tokenizer,
            TextPart::Lm(p) => p.tokenizer,
        }
    }

    /// Tensors of the checkpoint the encoder deliberately leaves unread (a language model's head
    /// and the layers after the last hidden state taken).
    pub fn unread(&self, name: &str) -> bool {
        match self {
            TextPart::Lm(p) => LmEncoder::unread(&p.config, p.kind, &p.layers, name),
            _ => false,
        }
    }

    /// What builds the encoder on a [`VarBuilder`] and drops it (for audits).
    #[allow(clippy::type_complexity)]
    pub(super) fn builder(
        &self,
    ) -> Result<Box<dyn Fn(VarBuilder) -> candle_core::Result<()> + '_>> {
        Ok(match self {
            TextPart::Clip(p) => {
                Box::new(move |vb| ClipText::new(&p.config, p.projection, vb).map(drop))
            }
            TextPart::T5(p) => {
                let cfg: t5::Config = config::read_json(&p.config)?;
                Box::new(move |vb| T5Encoder::new(vb, &cfg).map(drop))
            }
            TextPart::Lm(p) => {
                Box::new(move |vb| LmEncoder::new(&p.config, p.kind, &p.layers, vb).map(drop))
            }
        })
    }
}

/// Loads a family's text encoders and tokenizers at the run's device and dtype (T5 in
/// [`t5_dtype`]). They run once per prompt: their f32 layers on the AVX-512 kernel read their
/// weights where the files hold them rather than packing copies ([`read_in_place`]).
pub struct TextLoader<'a> {
    pub(super) weights: Weights<'a>,
    pub device: Device,
    pub dtype: DType,
}

impl TextLoader<'_> {
    pub fn clip(&self, p: &ClipPart) -> Result<(ClipText, TextTokenizer)> {
        let model = read_in_place(|| {
            self.weights.load(p.dir, self.dtype, &self.device, |vb| {
                ClipText::new(&p.config, p.projection, vb)
            })
        })?;
        Ok((model, self.tokenizer(p.tokenizer)?))
    }

    /// T5, on the GGML blocks of a GGUF file when it comes from one (unless a LoRA must be merged
    /// into it: then dequantized).
    pub fn t5(&self, p: &T5Part) -> Result<(T5Encoder, TextTokenizer)> {
        let cfg: t5::Config = config::read_json(&p.config)?;
        let dtype = t5_dtype(self.dtype);
        let blocks = match self.weights.merge.deltas(p.dir).is_empty() {
            true => self.weights.blocks(p.dir)?,
            false => None,
        };
        if blocks.is_some() && !self.device.is_cpu() {
            return Err(Error::Device(crate::error::Message::from(
                "a quantized GGUF T5 runs on the CPU only for now; use --device cpu",
            )));
        }
        let model = crate::nn::quant::with_stored(blocks.map(stored), || {
            read_in_place(|| {
                self.weights
                    .load(p.dir, dtype, &self.device, |vb| T5Encoder::new(vb, &cfg))
            })
        })?;
        Ok((model, self.tokenizer(p.tokenizer)?))
    }

    /// A language model at the run's dtype, taking `p.layers`.
    pub fn lm(&self, p: &LmPart) -> Result<(LmEncoder, TextTokenizer)> {
        let model = read_in_place(|| {
            self.weights.load(p.dir, self.dtype, &self.device, |vb| {
                LmEncoder::new(&p.config, p.kind, &p.layers, vb)
            })
        })?;
        Ok((model, self.tokenizer(p.tokenizer)?))
    }

    fn tokenizer(&self, dir: &str) -> Result<TextTokenizer> {
        TextTokenizer::from_dir(&tokenizer_dir(self.weights.src, dir)?)
    }
}
