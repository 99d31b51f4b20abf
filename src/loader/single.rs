//! Original single-file checkpoints: Stability AI's `sd3*.safetensors` (MMDiT under an optional
//! `model.diffusion_model.` prefix, optionally the VAE under `first_stage_model.` and the text encoders
//! under `text_encoders.{clip_l,clip_g,t5xxl}.transformer.`) and Black Forest Labs' `flux1-*.safetensors`
//! (with `ae.safetensors` beside it for the VAE).
//!
//! Each format has one mapping from its tensor names to diffusers' parameter names (REFERENCE.md
//! sections 2 and 3): fused q/k/v rows split in three, Flux's single-block `linear1` split in four,
//! `swap_scale_shift` on the final (and SD3's last context) modulation, the LDM VAE names with its
//! reversed decoder levels and 1x1-convolution attention weights. A [`Mapping`] serves a component to
//! candle as a [`VarBuilder`] under diffusers' names, transforming each tensor as it is read, and
//! gives the mapped names and shapes for header-only audits.

use super::audit::TensorMeta;
use super::gguf::GgufFile;
use crate::error::{Error, Result};
use candle_core::quantized::GgmlDType;
use candle_core::Result as TensorResult;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::Init;
use candle_nn::VarBuilder;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Which original layout a file is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Stability AI SD3 / SD3.5.
    Sd3,
    /// Black Forest Labs FLUX.1.
    Flux,
    /// Lodestone Rock's Chroma: FLUX.1's names without the modulation layers, plus
    /// `distilled_guidance_layer.*`.
    Chroma,
    /// Black Forest Labs FLUX.2: FLUX.1's block names, shared modulations
    /// (`double_stream_modulation_img.lin`, ...), fused single-block projections kept whole.
    Flux2,
}

impl Format {
    /// The family's short name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Format::Sd3 => "sd3",
            Format::Flux => "flux",
            Format::Chroma => "chroma",
            Format::Flux2 => "flux2",
        }
    }

    /// The `general.architecture` GGUF files of this layout carry: ComfyUI-GGUF's converter labels
    /// Chroma files `flux` (its FLUX.1 keys match them) and its loader knows no `chroma`, so
    /// `convert` writes `flux` too; the tensors tell the two apart.
    pub fn gguf_architecture(self) -> &'static str {
        match self {
            Format::Chroma => "flux",
            f => f.name(),
        }
    }
}

/// How a diffusers tensor is made from a file tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transform {
    /// As stored.
    Whole,
    /// Rows `start..start + len` along dim 0 (a slice of a fused projection).
    Rows { start: usize, len: usize },
    /// The two halves along dim 0 swapped: (shift, scale) <-> (scale, shift).
    SwapHalves,
    /// A 1x1 convolution kernel [o, i, 1, 1] as a linear weight [o, i].
    Squeeze1x1,
    /// An identity matrix of this size, stored nowhere (CLIP-L's projection in SAI files).
    Identity(usize),
}

impl Transform {
    /// The transform as row ranges of a tensor of `rows` rows, concatenated (`start`, `len`):
    /// `None` for those that are not a choice of rows.
    fn row_ranges(&self, rows: usize) -> Option<Vec<(usize, usize)>> {
        let half = rows / 2;
        match self {
            Transform::Whole => Some(vec![(0, rows)]),
            Transform::Rows { start, len } => Some(vec![(*start, *len)]),
            Transform::SwapHalves => Some(vec![(half, half), (0, half)]),
            Transform::Squeeze1x1 | Transform::Identity(_) => None,
        }
    }
}

/// Where one diffusers tensor comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// Index into the mapping's files.
    pub file: usize,
    /// The tensor's name in that file (empty for [`Transform::Identity`]).
    pub key: String,
    pub transform: Transform,
}

/// One component of a single-file checkpoint under diffusers' names.
#[derive(Debug, Clone, Default)]
pub struct Mapping {
    pub files: Vec<PathBuf>,
    /// diffusers name -> source.
    pub entries: BTreeMap<String, Source>,
    /// Shapes and dtypes of the source tensors, by (file, key).
    metas: BTreeMap<(usize, String), TensorMeta>,
}

impl Mapping {
    fn add(&mut self, name: String, file: usize, key: &str, transform: Transform) {
        self.entries.insert(
            name,
            Source {
                file,
                key: key.to_string(),
                transform,
            },
        );
    }

    /// The mapped tensors' names, shapes and dtypes, as a diffusers-layout header would list them.
    pub fn metas(&self) -> BTreeMap<String, TensorMeta> {
        self.entries
            .iter()
            .filter_map(|(name, s)| {
                let shape = match &s.transform {
                    Transform::Identity(n) => {
                        return Some((
                            name.clone(),
                            TensorMeta {
                                shape: vec![*n, *n],
                                dtype: "identity".into(),
                            },
                        ))
                    }
                    t => {
                        let m = self.metas.get(&(s.file, s.key.clone()))?;
                        (mapped_shape(&m.shape, t), m.dtype.clone())
                    }
                };
                Some((
                    name.clone(),
                    TensorMeta {
                        shape: shape.0,
                        dtype: shape.1,
                    },
                ))
            })
            .collect()
    }

    /// Memory-maps the files and serves the component to candle at `dtype` on `device`.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        Ok(VarBuilder::from_backend(
            self.backend()?,
            dtype,
            device.clone(),
        ))
    }

    /// Opens the files (memory-mapping safetensors, reading GGUF headers) and serves the
    /// component under diffusers' names; GGUF tensors dequantized.
    pub fn backend(&self) -> Result<Box<dyn SimpleBackend>> {
        let mut maps = Vec::with_capacity(self.files.len());
        for f in &self.files {
            if is_gguf(f) {
                maps.push(Opened::Gguf(Arc::new(GgufFile::open(f)?)));
                continue;
            }
            let m = super::weights::Safetensors::open(std::slice::from_ref(f))?;
            maps.push(Opened::Safetensors(m));
        }
        Ok(Box::new(MappedBackend {
            maps,
            entries: self.entries.clone(),
        }))
    }

    /// The component's weights stored in GGML blocks (a GGUF file's quantized tensors), served
    /// as blocks under diffusers' names; `None` when the component has none.
    pub fn blocks(&self) -> Result<Option<Blocks>> {
        let Some(path) = self.files.first().filter(|f| is_gguf(f)) else {
            return Ok(None);
        };
        let file = GgufFile::open(path)?;
        let any = self.entries.values().any(|s| {
            s.file == 0
                && file
                    .tensors
                    .get(&s.key)
                    .is_some_and(|t| is_block_type(t.dtype))
        });
        Ok(any.then(|| Blocks {
            file,
            entries: self.entries.clone(),
        }))
    }
}

/// Whether a file is read as GGUF (by its extension, as `--model` tells them apart).
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// Whether a GGML type is a block type (computed on the quantized kernels) rather than a float.
fn is_block_type(t: GgmlDType) -> bool {
    !matches!(t, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

/// A component's quantized tensors in a GGUF file, by diffusers name.
pub struct Blocks {
    file: GgufFile,
    entries: BTreeMap<String, Source>,
}

impl Blocks {
    /// The blocks of tensor `name` (a fused projection's rows sliced, swapped halves swapped, all
    /// on whole rows of blocks) as type, shape and bytes, or `None` when it is not stored in a
    /// block type.
    pub fn get(&self, name: &str) -> Option<candle_core::Result<super::gguf::BlockBytes>> {
        let s = self.entries.get(name).filter(|s| s.file == 0)?;
        let t = self.file.tensors.get(&s.key)?;
        if !is_block_type(t.dtype) || !t.rows_are_blocks() {
            return None;
        }
        let ranges = s
            .transform
            .row_ranges(t.shape.first().copied().unwrap_or(1))?;
        Some(self.file.block_bytes(&s.key, &ranges))
    }

    /// The quantized tensors' count and bytes.
    pub fn summary(&self) -> (usize, u64) {
        let q = self
            .file
            .tensors
            .values()
            .filter(|t| is_block_type(t.dtype));
        q.fold((0, 0), |(n, b), t| (n + 1, b + t.bytes))
    }
}

fn mapped_shape(shape: &[usize], t: &Transform) -> Vec<usize> {
    match t {
        Transform::Whole | Transform::SwapHalves => shape.to_vec(),
        Transform::Rows { len, .. } => {
            let mut s = shape.to_vec();
            if let Some(d) = s.first_mut() {
                *d = *len;
            }
            s
        }
        Transform::Squeeze1x1 => shape.iter().take(2).copied().collect(),
        Transform::Identity(n) => vec![*n, *n],
    }
}

/// A file of a mapping, opened.
enum Opened {
    Safetensors(super::weights::Safetensors),
    Gguf(Arc<GgufFile>),
}

struct MappedBackend {
    maps: Vec<Opened>,
    entries: BTreeMap<String, Source>,
}

/// `t` (a file tensor) made into the diffusers tensor by `transform`.
fn transformed(t: Tensor, transform: &Transform) -> candle_core::Result<Tensor> {
    Ok(match transform {
        Transform::Whole | Transform::Identity(_) => t,
        Transform::Rows { start, len } => t.narrow(0, *start, *len)?,
        Transform::SwapHalves => {
            let half = t.dim(0)? / 2;
            Tensor::cat(&[t.narrow(0, half, half)?, t.narrow(0, 0, half)?], 0)?
        }
        Transform::Squeeze1x1 => {
            let (o, i) = (t.dim(0)?, t.dim(1)?);
            t.reshape((o, i))?
        }
    })
}

/// A GGUF tensor in f32 under `transform`: its rows read as blocks where rows are whole blocks
/// (only those rows are read), else the whole tensor dequantized and transformed.
fn gguf_tensor(g: &GgufFile, key: &str, transform: &Transform) -> candle_core::Result<Tensor> {
    let info = g
        .tensors
        .get(key)
        .ok_or_else(|| candle_core::Error::CannotFindTensor { path: key.into() })?;
    let rows = info.shape.first().copied().unwrap_or(1);
    match transform
        .row_ranges(rows)
        .filter(|_| info.rows_are_blocks())
    {
        Some(ranges) => g.blocks(key, &ranges)?.dequantize(&Device::Cpu),
        None => transformed(g.dequantized(key)?, transform),
    }
}

impl MappedBackend {
    fn read(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let s = self
            .entries
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.into() })?;
        if let Transform::Identity(n) = &s.transform {
            return Tensor::eye(*n, dtype, dev);
        }
        let t = match &self.maps[s.file] {
            // Converted to the run's dtype as it is read from the mapping (no reshaping copy).
            Opened::Safetensors(m)
                if matches!(s.transform, Transform::Whole | Transform::Squeeze1x1) =>
            {
                let t = m.get_unchecked(&s.key, dtype, &Device::Cpu)?;
                return transformed(t, &s.transform)?.to_device(dev);
            }
            Opened::Safetensors(m) => transformed(m.load(&s.key)?, &s.transform)?,
            Opened::Gguf(g) => gguf_tensor(g, &s.key, &s.transform)?,
        };
        t.to_dtype(dtype)?.to_device(dev)
    }
}

impl SimpleBackend for MappedBackend {
    fn get(&self, s: Shape, name: &str, _: Init, dt: DType, dev: &Device) -> TensorResult<Tensor> {
        super::weights::expect_shape(self.read(name, dt, dev)?, s, name)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.read(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }
}

/// The shapes that tell released checkpoints of a format apart (the presets in `models/` list theirs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fingerprint {
    /// Joint (SD3) or double-stream (Flux) blocks.
    #[serde(default)]
    pub blocks: usize,
    /// Single-stream blocks (Flux).
    #[serde(default)]
    pub single_blocks: usize,
    /// Width of the image stream.
    #[serde(default)]
    pub hidden: usize,
    /// Entries of the position-embedding table (SD3).
    #[serde(default)]
    pub positions: usize,
    /// Has a guidance embedding (FLUX.1-dev).
    #[serde(default)]
    pub guidance: bool,
    /// Input channels of the patch embedding (16 for SD3's latents, 64 for Flux's packed ones,
    /// 384 for FLUX.1 Fill's latents, masked image and mask).
    #[serde(default)]
    pub input_channels: usize,
}

/// What the names and shapes of a checkpoint say it is.
#[derive(Debug, Clone, PartialEq)]
pub struct Detected {
    pub format: Format,
    /// The shapes that identify a released model.
    pub fingerprint: Fingerprint,
    /// `model.diffusion_model.` or empty.
    pub prefix: &'static str,
}

const DIFFUSION_PREFIX: &str = "model.diffusion_model.";

/// Reads a file's header and names its format and shapes.
pub fn detect(metas: &BTreeMap<String, TensorMeta>, path: &Path) -> Result<Detected> {
    let prefix = if metas.keys().any(|k| k.starts_with(DIFFUSION_PREFIX)) {
        DIFFUSION_PREFIX
    } else {
        ""
    };
    let has = |k: &str| metas.contains_key(&format!("{prefix}{k}"));
    let dim = |k: &str, i: usize| {
        metas
            .get(&format!("{prefix}{k}"))
            .and_then(|m| m.shape.get(i).copied())
            .unwrap_or(0)
    };
    let count = |block: &str| {
        metas
            .keys()
            .filter_map(|k| k.strip_prefix(prefix)?.strip_prefix(block))
            .filter_map(|r| r.split('.').next()?.parse::<usize>().ok())
            .max()
            .map_or(0, |m| m + 1)
    };
    let (format, fingerprint) = if has("x_embedder.proj.weight") && count("joint_blocks.") > 0 {
        let f = Fingerprint {
            blocks: count("joint_blocks."),
            hidden: dim("x_embedder.proj.weight", 0),
            positions: dim("pos_embed", 1),
            input_channels: dim("x_embedder.proj.weight", 1),
            ..Default::default()
        };
        (Format::Sd3, f)
    } else if has("img_in.weight") && has("double_stream_modulation_img.lin.weight") {
        let f = Fingerprint {
            blocks: count("double_blocks."),
            single_blocks: count("single_blocks."),
            hidden: dim("img_in.weight", 0),
            guidance: has("guidance_in.in_layer.weight"),
            input_channels: dim("img_in.weight", 1),
            ..Default::default()
        };
        (Format::Flux2, f)
    } else if has("img_in.weight") && has("distilled_guidance_layer.in_proj.weight") {
        let f = Fingerprint {
            blocks: count("double_blocks."),
            single_blocks: count("single_blocks."),
            hidden: dim("img_in.weight", 0),
            input_channels: dim("img_in.weight", 1),
            ..Default::default()
        };
        (Format::Chroma, f)
    } else if has("img_in.weight") && count("double_blocks.") > 0 {
        let f = Fingerprint {
            blocks: count("double_blocks."),
            single_blocks: count("single_blocks."),
            hidden: dim("img_in.weight", 0),
            guidance: has("guidance_in.in_layer.weight"),
            input_channels: dim("img_in.weight", 1),
            ..Default::default()
        };
        (Format::Flux, f)
    } else {
        return Err(Error::BadWeights {
            path: path.to_path_buf(),
            msg: "not a single-file SD3/SD3.5 (joint_blocks.*), FLUX.1 or Chroma (double_blocks.*) checkpoint; \
                  pass a model folder in diffusers layout, a Hub repo id or a preset instead"
                .into(),
        });
    };
    Ok(Detected {
        format,
        fingerprint,
        prefix,
    })
}

/// GGUF architectures of the image models this engine runs.
fn known_image_arch(a: &str) -> bool {
    a == "flux" || a == "sd3" || a == "chroma" || a == "flux2"
}

/// Refuses a GGUF file whose `general.architecture` is not a FLUX.1 or SD3 model (stable-diffusion.cpp
/// files have none, and some converters write `pig`: their tensor names decide).
fn check_architecture(arch: Option<&str>, path: &Path) -> Result<()> {
    let bad = |msg: String| Error::BadWeights {
        path: path.to_path_buf(),
        msg,
    };
    match arch {
        None | Some("pig") => Ok(()),
        Some(a) if known_image_arch(a) => Ok(()),
        Some(a @ ("t5" | "t5encoder" | "llama" | "qwen2" | "qwen2vl" | "qwen3" | "mistral" | "gemma2" | "gemma3" | "clip")) => Err(bad(format!(
            "is a GGUF text model (architecture {a}), not a FLUX.1 or SD3 image model; pass the image model's .gguf as --model"
        ))),
        Some(a) => Err(bad(format!(
            "is a GGUF {a} model; this engine runs FLUX.1 (flux), Chroma (chroma) and SD3/SD3.5 (sd3) GGUF files"
        ))),
    }
}

/// A single-file checkpoint: its format and the components it holds, under diffusers' names.
#[derive(Debug, Clone)]
pub struct SingleFile {
    pub path: PathBuf,
    pub detected: Detected,
    /// Component folder name (`transformer`, `vae`, `text_encoder`, ...) -> mapping.
    pub components: BTreeMap<&'static str, Mapping>,
}

impl SingleFile {
    /// Reads the headers of `path` (and, for Flux, of `ae.safetensors` beside it, when present) and
    /// maps every component found. A GGUF file holds the transformer alone.
    pub fn open(path: &Path) -> Result<Self> {
        let files = vec![path.to_path_buf()];
        let (main, architecture) = if is_gguf(path) {
            let g = GgufFile::open(path)?;
            let arch = g.architecture().map(str::to_string);
            check_architecture(arch.as_deref(), path)?;
            (g.metas(), arch)
        } else {
            (super::audit::read_headers(&files)?, None)
        };
        let detected = detect(&main, path)?;
        if let Some(a) = architecture.filter(|a| known_image_arch(a)) {
            if a != detected.format.name() && a != detected.format.gguf_architecture() {
                return Err(Error::BadWeights {
                    path: path.to_path_buf(),
                    msg: format!(
                        "says general.architecture = {a} but its tensors are a {} model; the file is mislabelled",
                        detected.format.name()
                    ),
                });
            }
        }
        let ae_path = path.with_file_name("ae.safetensors");
        let flux_like = matches!(detected.format, Format::Flux | Format::Chroma);
        let ae = if flux_like && ae_path.is_file() && ae_path != path {
            Some((
                ae_path.clone(),
                super::audit::read_headers(std::slice::from_ref(&ae_path))?,
            ))
        } else {
            None
        };
        let components = map_components(path, &main, &detected, ae.as_ref());
        Ok(Self {
            path: path.to_path_buf(),
            detected,
            components,
        })
    }

    /// Builds the mappings from headers already read (shape manifests in tests).
    pub fn from_metas(
        path: &Path,
        main: &BTreeMap<String, TensorMeta>,
        ae: Option<(PathBuf, BTreeMap<String, TensorMeta>)>,
    ) -> Result<Self> {
        let detected = detect(main, path)?;
        let components = map_components(path, main, &detected, ae.as_ref());
        Ok(Self {
            path: path.to_path_buf(),
            detected,
            components,
        })
    }

    pub fn component(&self, dir: &str) -> Option<&Mapping> {
        self.components.get(dir)
    }

    /// Tensors of the file that no component maps (an incomplete or foreign checkpoint).
    pub fn unmapped(&self, main: &BTreeMap<String, TensorMeta>) -> Vec<String> {
        let used: std::collections::BTreeSet<&str> = self
            .components
            .values()
            .flat_map(|m| m.entries.values())
            .filter(|s| s.file == 0)
            .map(|s| s.key.as_str())
            .collect();
        main.keys()
            .filter(|k| !used.contains(k.as_str()) && !k.ends_with("position_ids") && !fp8_extra(k))
            .cloned()
            .collect()
    }
}

fn map_components(
    path: &Path,
    main: &BTreeMap<String, TensorMeta>,
    d: &Detected,
    ae: Option<&(PathBuf, BTreeMap<String, TensorMeta>)>,
) -> BTreeMap<&'static str, Mapping> {
    let mut out = BTreeMap::new();
    let base = || Mapping {
        files: vec![path.to_path_buf()],
        metas: main
            .iter()
            .map(|(k, m)| ((0, k.clone()), m.clone()))
            .collect(),
        ..Default::default()
    };
    let mut transformer = base();
    let sub = strip(main, d.prefix);
    match d.format {
        Format::Sd3 => sd3_transformer(&mut transformer, &sub, None),
        Format::Flux | Format::Chroma => bfl_transformer(&mut transformer, &sub, &BFL_FLUX),
        Format::Flux2 => bfl_transformer(&mut transformer, &sub, &BFL_FLUX2),
    }
    out.insert("transformer", transformer);
    // SAI files may embed the VAE and the text encoders.
    let vae_keys = strip(main, "first_stage_model.");
    if !vae_keys.is_empty() {
        let mut vae = base();
        ldm_vae(&mut vae, 0, &vae_keys);
        out.insert("vae", vae);
    } else if let Some((ae_path, ae_metas)) = ae {
        let mut vae = Mapping {
            files: vec![path.to_path_buf(), ae_path.clone()],
            metas: ae_metas
                .iter()
                .map(|(k, m)| ((1, k.clone()), m.clone()))
                .collect(),
            ..Default::default()
        };
        let keys = strip(ae_metas, "");
        ldm_vae(&mut vae, 1, &keys);
        out.insert("vae", vae);
    }
    for (dir, prefix, identity_projection) in [
        ("text_encoder", "text_encoders.clip_l.transformer.", true),
        ("text_encoder_2", "text_encoders.clip_g.transformer.", false),
        ("text_encoder_3", "text_encoders.t5xxl.transformer.", false),
    ] {
        let keys = strip(main, prefix);
        if keys.is_empty() {
            continue;
        }
        let mut m = base();
        for (rest, full) in &keys {
            if !rest.ends_with("position_ids") {
                m.add(rest.clone(), 0, full, Transform::Whole);
            }
        }
        if identity_projection && !m.entries.contains_key("text_projection.weight") {
            let norm = main.get(&format!("{prefix}text_model.final_layer_norm.weight"));
            if let Some(&width) = norm.and_then(|w| w.shape.first()) {
                m.entries.insert(
                    "text_projection.weight".into(),
                    Source {
                        file: 0,
                        key: String::new(),
                        transform: Transform::Identity(width),
                    },
                );
            }
        }
        out.insert(dir, m);
    }
    out
}

/// (name without `prefix`, full name) of every tensor under `prefix`.
fn strip(metas: &BTreeMap<String, TensorMeta>, prefix: &str) -> Vec<(String, String)> {
    metas
        .keys()
        .filter_map(|k| k.strip_prefix(prefix).map(|r| (r.to_string(), k.clone())))
        .collect()
}

/// Scaled fp8's tensors beside the weights: each weight's scale (read with the weight,
/// [`super::weights::Safetensors`]), the input scales and the file's marker (unused).
fn fp8_extra(name: &str) -> bool {
    name.ends_with("scaled_fp8")
        || name.ends_with(".scale_weight")
        || name.ends_with(".scale_input")
}

/// Splits `name = <block>.<i>.<rest>` into (i, rest).
fn block<'a>(name: &'a str, block: &str) -> Option<(usize, &'a str)> {
    let r = name.strip_prefix(block)?.strip_prefix('.')?;
    let (i, rest) = r.split_once('.')?;
    Some((i.parse().ok()?, rest))
}

/// Maps a fused q/k/v (`<param>` = weight or bias) into three equal row slices.
fn split3(m: &mut Mapping, full: &str, names: [String; 3]) {
    let rows = m
        .metas
        .get(&(0, full.to_string()))
        .and_then(|t| t.shape.first().copied())
        .unwrap_or(0);
    let len = rows / 3;
    for (k, n) in names.into_iter().enumerate() {
        m.add(
            n,
            0,
            full,
            Transform::Rows {
                start: k * len,
                len,
            },
        );
    }
}

/// The last `.weight` / `.bias` (or other) suffix of a name.
fn param(rest: &str) -> &str {
    rest.rsplit('.').next().unwrap_or(rest)
}

/// Renames `from.` prefixes to `to.` (first match wins).
fn rename(rest: &str, table: &[(&str, &str)]) -> Option<String> {
    table
        .iter()
        .find_map(|(from, to)| rest.strip_prefix(from).map(|r| format!("{to}{r}")))
}

/// The transformer table of `format` applied to tensors under their original names (no prefix),
/// given by shape: for each diffusers name, where it comes from. `last_block` is the model's last
/// joint block, for tensors that are not a whole checkpoint (SD3 stores that block's context
/// modulation swapped); LoRA files map their layers through this.
pub fn transformer_table(
    format: Format,
    metas: &BTreeMap<String, TensorMeta>,
    last_block: Option<usize>,
) -> BTreeMap<String, Source> {
    let mut m = Mapping {
        metas: metas
            .iter()
            .map(|(k, t)| ((0, k.clone()), t.clone()))
            .collect(),
        ..Default::default()
    };
    let keys = strip(metas, "");
    match format {
        Format::Sd3 => sd3_transformer(&mut m, &keys, last_block),
        Format::Flux | Format::Chroma => bfl_transformer(&mut m, &keys, &BFL_FLUX),
        Format::Flux2 => bfl_transformer(&mut m, &keys, &BFL_FLUX2),
    }
    m.entries
}

/// SAI SD3 top-level prefixes -> diffusers.
const SD3_TOP: &[(&str, &str)] = &[
    ("x_embedder.proj.", "pos_embed.proj."),
    (
        "t_embedder.mlp.0.",
        "time_text_embed.timestep_embedder.linear_1.",
    ),
    (
        "t_embedder.mlp.2.",
        "time_text_embed.timestep_embedder.linear_2.",
    ),
    (
        "y_embedder.mlp.0.",
        "time_text_embed.text_embedder.linear_1.",
    ),
    (
        "y_embedder.mlp.2.",
        "time_text_embed.text_embedder.linear_2.",
    ),
    ("context_embedder.", "context_embedder."),
    ("final_layer.linear.", "proj_out."),
];

/// SAI SD3 joint-block prefixes -> diffusers (after `joint_blocks.<i>.`).
const SD3_BLOCK: &[(&str, &str)] = &[
    ("x_block.attn.proj.", "attn.to_out.0."),
    ("x_block.attn.ln_q.", "attn.norm_q."),
    ("x_block.attn.ln_k.", "attn.norm_k."),
    ("x_block.attn2.proj.", "attn2.to_out.0."),
    ("x_block.attn2.ln_q.", "attn2.norm_q."),
    ("x_block.attn2.ln_k.", "attn2.norm_k."),
    ("x_block.adaLN_modulation.1.", "norm1.linear."),
    ("x_block.mlp.fc1.", "ff.net.0.proj."),
    ("x_block.mlp.fc2.", "ff.net.2."),
    ("context_block.attn.proj.", "attn.to_add_out."),
    ("context_block.attn.ln_q.", "attn.norm_added_q."),
    ("context_block.attn.ln_k.", "attn.norm_added_k."),
    ("context_block.mlp.fc1.", "ff_context.net.0.proj."),
    ("context_block.mlp.fc2.", "ff_context.net.2."),
];

/// BFL FLUX.1 top-level prefixes -> diffusers.
const FLUX_TOP: &[(&str, &str)] = &[
    (
        "time_in.in_layer.",
        "time_text_embed.timestep_embedder.linear_1.",
    ),
    (
        "time_in.out_layer.",
        "time_text_embed.timestep_embedder.linear_2.",
    ),
    (
        "vector_in.in_layer.",
        "time_text_embed.text_embedder.linear_1.",
    ),
    (
        "vector_in.out_layer.",
        "time_text_embed.text_embedder.linear_2.",
    ),
    (
        "guidance_in.in_layer.",
        "time_text_embed.guidance_embedder.linear_1.",
    ),
    (
        "guidance_in.out_layer.",
        "time_text_embed.guidance_embedder.linear_2.",
    ),
    ("txt_in.", "context_embedder."),
    ("img_in.", "x_embedder."),
    ("final_layer.linear.", "proj_out."),
    // Chroma's approximator; its layers are renamed by `CHROMA_APPROXIMATOR`.
    (
        "distilled_guidance_layer.in_proj.",
        "distilled_guidance_layer.in_proj.",
    ),
    (
        "distilled_guidance_layer.out_proj.",
        "distilled_guidance_layer.out_proj.",
    ),
];

/// Chroma's approximator layers -> diffusers (after `distilled_guidance_layer.layers.<i>.`; the
/// norms are `distilled_guidance_layer.norms.<i>.scale`).
const CHROMA_APPROXIMATOR: &[(&str, &str)] =
    &[("in_layer.", "linear_1."), ("out_layer.", "linear_2.")];

/// BFL's fused q/k/v of a double block (FLUX.1, Chroma, FLUX.2) and the diffusers layers they
/// split into.
const BFL_QKV: &[(&[&str], &str)] = &[
    (&["attn.to_q", "attn.to_k", "attn.to_v"], "img_attn.qkv"),
    (
        &["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
        "txt_attn.qkv",
    ),
];

/// Maps a BFL double block's fused q/k/v tensor (`r` after `double_blocks.<i>.`) onto the diffusers
/// block `b`; false when `r` is not one.
fn bfl_qkv(m: &mut Mapping, b: &str, r: &str, full: &str) -> bool {
    let p = param(r);
    match BFL_QKV
        .iter()
        .find(|(_, fused)| r.starts_with(&format!("{fused}.")))
    {
        Some((names, _)) => {
            split3(m, full, [0, 1, 2].map(|k| format!("{b}{}.{p}", names[k])));
            true
        }
        None => false,
    }
}

/// BFL FLUX.1 double-block prefixes -> diffusers (after `double_blocks.<i>.`).
const FLUX_DOUBLE: &[(&str, &str)] = &[
    ("img_mod.lin.", "norm1.linear."),
    ("txt_mod.lin.", "norm1_context.linear."),
    ("img_attn.norm.query_norm.scale", "attn.norm_q.weight"),
    ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
    ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
    ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight"),
    ("img_attn.proj.", "attn.to_out.0."),
    ("txt_attn.proj.", "attn.to_add_out."),
    ("img_mlp.0.", "ff.net.0.proj."),
    ("img_mlp.2.", "ff.net.2."),
    ("txt_mlp.0.", "ff_context.net.0.proj."),
    ("txt_mlp.2.", "ff_context.net.2."),
];

/// BFL FLUX.1 single-block prefixes -> diffusers (after `single_blocks.<i>.`).
const FLUX_SINGLE: &[(&str, &str)] = &[
    ("linear2.", "proj_out."),
    ("norm.query_norm.scale", "attn.norm_q.weight"),
    ("norm.key_norm.scale", "attn.norm_k.weight"),
    ("modulation.lin.", "norm.linear."),
];

fn sd3_transformer(m: &mut Mapping, keys: &[(String, String)], last_block: Option<usize>) {
    let last = last_block.or_else(|| {
        keys.iter()
            .filter_map(|(r, _)| block(r, "joint_blocks").map(|b| b.0))
            .max()
    });
    for (rest, full) in keys.iter().filter(|(r, _)| !fp8_extra(r)) {
        if rest == "pos_embed" {
            m.add("pos_embed.pos_embed".into(), 0, full, Transform::Whole);
        } else if let Some(p) = rest.strip_prefix("final_layer.adaLN_modulation.1.") {
            m.add(
                format!("norm_out.linear.{p}"),
                0,
                full,
                Transform::SwapHalves,
            );
        } else if let Some((i, r)) = block(rest, "joint_blocks") {
            let b = format!("transformer_blocks.{i}.");
            let p = param(r);
            let qkv = |names: [&str; 3]| names.map(|n| format!("{b}{n}.{p}"));
            if r.starts_with("x_block.attn.qkv.") {
                split3(m, full, qkv(["attn.to_q", "attn.to_k", "attn.to_v"]));
            } else if r.starts_with("x_block.attn2.qkv.") {
                split3(m, full, qkv(["attn2.to_q", "attn2.to_k", "attn2.to_v"]));
            } else if r.starts_with("context_block.attn.qkv.") {
                let names = ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"];
                split3(m, full, qkv(names));
            } else if let Some(p) = r.strip_prefix("context_block.adaLN_modulation.1.") {
                // The last block keeps only (shift, scale) of the context stream, stored swapped.
                let t = if Some(i) == last {
                    Transform::SwapHalves
                } else {
                    Transform::Whole
                };
                m.add(format!("{b}norm1_context.linear.{p}"), 0, full, t);
            } else if let Some(n) = rename(r, SD3_BLOCK) {
                m.add(format!("{b}{n}"), 0, full, Transform::Whole);
            }
        } else if let Some(n) = rename(rest, SD3_TOP) {
            m.add(n, 0, full, Transform::Whole);
        }
    }
}

/// The tables of one BFL layout: FLUX.1's (Chroma's too: it lacks the modulation layers and adds
/// the approximator, which only it has), or FLUX.2's.
struct Bfl {
    top: &'static [(&'static str, &'static str)],
    double: &'static [(&'static str, &'static str)],
    single: &'static [(&'static str, &'static str)],
    /// FLUX.1's single-block `linear1` splits into q, k, v and the MLP input; FLUX.2's stays whole.
    split_linear1: bool,
}

const BFL_FLUX: Bfl = Bfl {
    top: FLUX_TOP,
    double: FLUX_DOUBLE,
    single: FLUX_SINGLE,
    split_linear1: true,
};

const BFL_FLUX2: Bfl = Bfl {
    top: FLUX2_TOP,
    double: FLUX2_DOUBLE,
    single: FLUX2_SINGLE,
    split_linear1: false,
};

/// The BFL tables of `format`, if it is a BFL layout.
fn bfl(format: Format) -> Option<&'static Bfl> {
    match format {
        Format::Flux | Format::Chroma => Some(&BFL_FLUX),
        Format::Flux2 => Some(&BFL_FLUX2),
        Format::Sd3 => None,
    }
}

fn bfl_transformer(m: &mut Mapping, keys: &[(String, String)], t: &Bfl) {
    for (rest, full) in keys.iter().filter(|(r, _)| !fp8_extra(r)) {
        if let Some(p) = rest.strip_prefix("final_layer.adaLN_modulation.1.") {
            m.add(
                format!("norm_out.linear.{p}"),
                0,
                full,
                Transform::SwapHalves,
            );
        } else if let Some((i, r)) = block(rest, "double_blocks") {
            let b = format!("transformer_blocks.{i}.");
            if !bfl_qkv(m, &b, r, full) {
                if let Some(n) = rename(r, t.double) {
                    m.add(format!("{b}{n}"), 0, full, Transform::Whole);
                }
            }
        } else if let Some((i, r)) = block(rest, "single_blocks") {
            let b = format!("single_transformer_blocks.{i}.");
            if t.split_linear1 && r.starts_with("linear1.") {
                // rows: q, k, v (hidden each), then the MLP input (the rest).
                let meta = m.metas.get(&(0, full.clone())).cloned();
                let shape = meta.map(|t| t.shape).unwrap_or_default();
                let rows = shape.first().copied().unwrap_or(0);
                // hidden = the weight's input width; a bias alone gives no width: use its weight's.
                let weight = full.replace(".bias", ".weight");
                let hidden = m
                    .metas
                    .get(&(0, weight))
                    .and_then(|t| t.shape.get(1).copied())
                    .unwrap_or(0);
                let p = param(r);
                let parts = [
                    ("attn.to_q", 0, hidden),
                    ("attn.to_k", hidden, hidden),
                    ("attn.to_v", 2 * hidden, hidden),
                    ("proj_mlp", 3 * hidden, rows.saturating_sub(3 * hidden)),
                ];
                for (n, start, len) in parts {
                    m.add(
                        format!("{b}{n}.{p}"),
                        0,
                        full,
                        Transform::Rows { start, len },
                    );
                }
            } else if let Some(n) = rename(r, t.single) {
                m.add(format!("{b}{n}"), 0, full, Transform::Whole);
            }
        } else if let Some((i, r)) = block(rest, "distilled_guidance_layer.layers") {
            if let Some(n) = rename(r, CHROMA_APPROXIMATOR) {
                let name = format!("distilled_guidance_layer.layers.{i}.{n}");
                m.add(name, 0, full, Transform::Whole);
            }
        } else if let Some((i, "scale")) = block(rest, "distilled_guidance_layer.norms") {
            let name = format!("distilled_guidance_layer.norms.{i}.weight");
            m.add(name, 0, full, Transform::Whole);
        } else if let Some(n) = rename(rest, t.top) {
            m.add(n, 0, full, Transform::Whole);
        }
    }
}

/// BFL FLUX.2 top-level prefixes -> diffusers.
const FLUX2_TOP: &[(&str, &str)] = &[
    ("img_in.", "x_embedder."),
    ("txt_in.", "context_embedder."),
    (
        "time_in.in_layer.",
        "time_guidance_embed.timestep_embedder.linear_1.",
    ),
    (
        "time_in.out_layer.",
        "time_guidance_embed.timestep_embedder.linear_2.",
    ),
    (
        "guidance_in.in_layer.",
        "time_guidance_embed.guidance_embedder.linear_1.",
    ),
    (
        "guidance_in.out_layer.",
        "time_guidance_embed.guidance_embedder.linear_2.",
    ),
    (
        "double_stream_modulation_img.lin.",
        "double_stream_modulation_img.linear.",
    ),
    (
        "double_stream_modulation_txt.lin.",
        "double_stream_modulation_txt.linear.",
    ),
    (
        "single_stream_modulation.lin.",
        "single_stream_modulation.linear.",
    ),
    ("final_layer.linear.", "proj_out."),
];

/// BFL FLUX.2 double-block prefixes -> diffusers (after `double_blocks.<i>.`).
const FLUX2_DOUBLE: &[(&str, &str)] = &[
    ("img_attn.norm.query_norm.scale", "attn.norm_q.weight"),
    ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
    ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
    ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight"),
    ("img_attn.proj.", "attn.to_out.0."),
    ("txt_attn.proj.", "attn.to_add_out."),
    ("img_mlp.0.", "ff.linear_in."),
    ("img_mlp.2.", "ff.linear_out."),
    ("txt_mlp.0.", "ff_context.linear_in."),
    ("txt_mlp.2.", "ff_context.linear_out."),
];

/// BFL FLUX.2 single-block prefixes -> diffusers (after `single_blocks.<i>.`); `linear1` stays
/// fused (q, k, v and the SwiGLU input are one projection in diffusers too).
const FLUX2_SINGLE: &[(&str, &str)] = &[
    ("linear1.", "attn.to_qkv_mlp_proj."),
    ("linear2.", "attn.to_out."),
    ("norm.query_norm.scale", "attn.norm_q.weight"),
    ("norm.key_norm.scale", "attn.norm_k.weight"),
];

/// The original name (`format`'s layout, no prefix) a diffusers transformer tensor is stored
/// under: its own, or the fused tensor it is a slice of. The tables above read backwards.
fn original_name(format: Format, name: &str) -> Option<String> {
    let unrename = |rest: &str, table: &[(&str, &str)]| {
        table
            .iter()
            .find_map(|(from, to)| rest.strip_prefix(to).map(|r| format!("{from}{r}")))
    };
    let p = param(name);
    if let Some(q) = name.strip_prefix("norm_out.linear.") {
        return Some(format!("final_layer.adaLN_modulation.1.{q}"));
    }
    let fused = |r: &str, parts: &[(&[&str], &str)]| {
        let stem = r.strip_suffix(&format!(".{p}"))?;
        parts
            .iter()
            .find(|(names, _)| names.contains(&stem))
            .map(|(_, to)| format!("{to}.{p}"))
    };
    match format {
        Format::Sd3 => {
            if name == "pos_embed.pos_embed" {
                return Some("pos_embed".into());
            }
            if let Some((i, r)) = block(name, "transformer_blocks") {
                let b = format!("joint_blocks.{i}.");
                let qkv: &[(&[&str], &str)] = &[
                    (&["attn.to_q", "attn.to_k", "attn.to_v"], "x_block.attn.qkv"),
                    (
                        &["attn2.to_q", "attn2.to_k", "attn2.to_v"],
                        "x_block.attn2.qkv",
                    ),
                    (
                        &["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
                        "context_block.attn.qkv",
                    ),
                ];
                if let Some(f) = fused(r, qkv) {
                    return Some(format!("{b}{f}"));
                }
                if let Some(q) = r.strip_prefix("norm1_context.linear.") {
                    return Some(format!("{b}context_block.adaLN_modulation.1.{q}"));
                }
                return unrename(r, SD3_BLOCK).map(|n| format!("{b}{n}"));
            }
            unrename(name, SD3_TOP)
        }
        Format::Flux | Format::Chroma | Format::Flux2 => {
            let t = bfl(format)?;
            if let Some((i, r)) = block(name, "distilled_guidance_layer.layers") {
                let b = format!("distilled_guidance_layer.layers.{i}.");
                return unrename(r, CHROMA_APPROXIMATOR).map(|n| format!("{b}{n}"));
            }
            if let Some((i, "weight")) = block(name, "distilled_guidance_layer.norms") {
                return Some(format!("distilled_guidance_layer.norms.{i}.scale"));
            }
            if let Some((i, r)) = block(name, "transformer_blocks") {
                let b = format!("double_blocks.{i}.");
                if let Some(f) = fused(r, BFL_QKV) {
                    return Some(format!("{b}{f}"));
                }
                return unrename(r, t.double).map(|n| format!("{b}{n}"));
            }
            if let Some((i, r)) = block(name, "single_transformer_blocks") {
                let b = format!("single_blocks.{i}.");
                let parts: &[(&[&str], &str)] = &[(
                    &["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
                    "linear1",
                )];
                if let Some(f) = fused(r, parts).filter(|_| t.split_linear1) {
                    return Some(format!("{b}{f}"));
                }
                return unrename(r, t.single).map(|n| format!("{b}{n}"));
            }
            unrename(name, t.top)
        }
    }
}

/// A transformer in diffusers names (`metas`) laid out as `format`'s original checkpoint: each
/// original tensor's shape and dtype, and for each, the diffusers tensors it is made of and how
/// (the [`transformer_table`] of that layout, which is checked to give back exactly `metas`).
#[allow(clippy::type_complexity)]
pub fn original_layout(
    format: Format,
    metas: &BTreeMap<String, TensorMeta>,
) -> std::result::Result<BTreeMap<String, (TensorMeta, Vec<(String, Transform)>)>, String> {
    let mut shapes: BTreeMap<String, TensorMeta> = BTreeMap::new();
    for (name, m) in metas {
        let orig = original_name(format, name)
            .ok_or_else(|| format!("`{name}` has no place in the {} layout", format.name()))?;
        let e = shapes.entry(orig).or_insert_with(|| TensorMeta {
            shape: Vec::new(),
            dtype: m.dtype.clone(),
        });
        if e.shape.is_empty() {
            e.shape = m.shape.clone();
        } else if let Some(d) = e.shape.first_mut() {
            // A slice of a fused tensor: the rows add up.
            *d += m.shape.first().copied().unwrap_or(0);
        }
    }
    let table = transformer_table(format, &shapes, None);
    let back: BTreeMap<&String, Vec<usize>> = table
        .iter()
        .map(|(n, s)| (n, mapped_shape(&shapes[&s.key].shape, &s.transform)))
        .collect();
    for (name, m) in metas {
        match back.get(name) {
            Some(shape) if *shape == m.shape => {}
            Some(shape) => {
                return Err(format!(
                    "`{name}` would read back as {shape:?}, not {:?}",
                    m.shape
                ))
            }
            None => return Err(format!("`{name}` would not read back")),
        }
    }
    if let Some(extra) = table.keys().find(|n| !metas.contains_key(*n)) {
        return Err(format!(
            "`{extra}` would read back but the model has no such tensor"
        ));
    }
    let mut out: BTreeMap<String, (TensorMeta, Vec<(String, Transform)>)> = shapes
        .into_iter()
        .map(|(k, m)| (k, (m, Vec::new())))
        .collect();
    for (name, s) in table {
        if let Some(e) = out.get_mut(&s.key) {
            e.1.push((name, s.transform));
        }
    }
    Ok(out)
}

/// llama.cpp's T5 encoder names (GGUF T5 files such as city96's `t5-v1_1-xxl-encoder-gguf`) ->
/// transformers' `T5EncoderModel`; block parts after `enc.blk.<i>.`.
const T5_GGUF_BLOCK: &[(&str, &str)] = &[
    ("attn_q.", "layer.0.SelfAttention.q."),
    ("attn_k.", "layer.0.SelfAttention.k."),
    ("attn_v.", "layer.0.SelfAttention.v."),
    ("attn_o.", "layer.0.SelfAttention.o."),
    (
        "attn_rel_b.",
        "layer.0.SelfAttention.relative_attention_bias.",
    ),
    ("attn_norm.", "layer.0.layer_norm."),
    ("ffn_gate.", "layer.1.DenseReluDense.wi_0."),
    ("ffn_up.", "layer.1.DenseReluDense.wi_1."),
    ("ffn_down.", "layer.1.DenseReluDense.wo."),
    ("ffn_norm.", "layer.1.layer_norm."),
];

/// Prefixes a T5 encoder file may carry before transformers' names (ComfyUI's full checkpoints).
const T5_PREFIXES: &[&str] = &["text_encoders.t5xxl.transformer.", "t5xxl.transformer."];

/// A T5 encoder in one file, served under transformers' names: a GGUF file in llama.cpp's names
/// (`token_embd`, `enc.blk.<i>.attn_q`, ..., ungated T5's `ffn_up` as `wi`) or transformers' own,
/// or a safetensors file in transformers' names (ComfyUI's `t5xxl_fp16` / `t5xxl_fp8_e4m3fn`).
pub fn t5_file(path: &Path) -> Result<Mapping> {
    let bad = |msg: String| Error::BadWeights {
        path: path.to_path_buf(),
        msg,
    };
    let metas = if is_gguf(path) {
        let g = GgufFile::open(path)?;
        match g.architecture() {
            None | Some("t5" | "t5encoder") => {}
            Some(a) => {
                return Err(bad(format!(
                    "is a GGUF {a} model, not a T5 encoder; pass a T5 encoder file (architecture t5encoder)"
                )))
            }
        }
        g.metas()
    } else {
        super::audit::read_headers(&[path.to_path_buf()])?
    };
    let gated = metas.keys().any(|k| k.contains(".ffn_gate."));
    let mut m = Mapping {
        files: vec![path.to_path_buf()],
        metas: metas
            .iter()
            .map(|(k, t)| ((0, k.clone()), t.clone()))
            .collect(),
        ..Default::default()
    };
    for key in metas
        .keys()
        .filter(|k| !k.ends_with("position_ids") && !fp8_extra(k))
    {
        let plain = T5_PREFIXES
            .iter()
            .find_map(|p| key.strip_prefix(p))
            .unwrap_or(key);
        let name = if let Some(r) = plain.strip_prefix("token_embd.") {
            format!("shared.{r}")
        } else if let Some(r) = plain.strip_prefix("enc.output_norm.") {
            format!("encoder.final_layer_norm.{r}")
        } else if let Some((i, r)) = block(plain, "enc.blk") {
            let r = match (r.strip_prefix("ffn_up."), gated) {
                (Some(p), false) => format!("layer.1.DenseReluDense.wi.{p}"),
                _ => rename(r, T5_GGUF_BLOCK).unwrap_or_else(|| r.to_string()),
            };
            format!("encoder.block.{i}.{r}")
        } else {
            plain.to_string()
        };
        m.add(name, 0, key, Transform::Whole);
    }
    if !m.entries.keys().any(|k| k.starts_with("encoder.block.")) {
        return Err(bad(
            "holds no T5 encoder layers (encoder.block.* or enc.blk.*); pass a T5 encoder file"
                .into(),
        ));
    }
    Ok(m)
}

/// LDM (original Stable Diffusion / BFL) VAE names -> diffusers `AutoencoderKL`.
fn ldm_vae(m: &mut Mapping, file: usize, keys: &[(String, String)]) {
    let levels = keys
        .iter()
        .filter_map(|(r, _)| block(r, "decoder.up").map(|b| b.0))
        .max()
        .map_or(0, |x| x + 1);
    let resnet: &[(&str, &str)] = &[("nin_shortcut.", "conv_shortcut.")];
    let attn: &[(&str, &str)] = &[
        ("norm.", "group_norm."),
        ("q.", "to_q."),
        ("k.", "to_k."),
        ("v.", "to_v."),
        ("proj_out.", "to_out.0."),
    ];
    for (rest, full) in keys {
        let Some((side, r)) = rest.split_once('.') else {
            // quant_conv / post_quant_conv are single names with a dot; anything else is skipped.
            continue;
        };
        if side == "quant_conv" || side == "post_quant_conv" {
            m.add(rest.clone(), file, full, Transform::Whole);
            continue;
        }
        if side != "encoder" && side != "decoder" {
            continue;
        }
        let mapped = if let Some(p) = r.strip_prefix("norm_out.") {
            Some((format!("conv_norm_out.{p}"), Transform::Whole))
        } else if r.starts_with("conv_in.") || r.starts_with("conv_out.") {
            Some((r.to_string(), Transform::Whole))
        } else if let Some(x) = r.strip_prefix("mid.") {
            if let Some(p) = x.strip_prefix("block_1.") {
                Some((format!("mid_block.resnets.0.{p}"), Transform::Whole))
            } else if let Some(p) = x.strip_prefix("block_2.") {
                Some((format!("mid_block.resnets.1.{p}"), Transform::Whole))
            } else if let Some(p) = x.strip_prefix("attn_1.") {
                rename(p, attn).map(|n| {
                    let t = if n.ends_with(".weight") && !n.starts_with("group_norm.") {
                        Transform::Squeeze1x1
                    } else {
                        Transform::Whole
                    };
                    (format!("mid_block.attentions.0.{n}"), t)
                })
            } else {
                None
            }
        } else if let Some((i, x)) = block(r, "down") {
            if let Some((j, p)) = block(x, "block") {
                let p = rename(p, resnet).unwrap_or_else(|| p.to_string());
                Some((format!("down_blocks.{i}.resnets.{j}.{p}"), Transform::Whole))
            } else {
                x.strip_prefix("downsample.conv.").map(|p| {
                    (
                        format!("down_blocks.{i}.downsamplers.0.conv.{p}"),
                        Transform::Whole,
                    )
                })
            }
        } else if let Some((k, x)) = block(r, "up") {
            let i = levels.saturating_sub(1 + k);
            if let Some((j, p)) = block(x, "block") {
                let p = rename(p, resnet).unwrap_or_else(|| p.to_string());
                Some((format!("up_blocks.{i}.resnets.{j}.{p}"), Transform::Whole))
            } else {
                x.strip_prefix("upsample.conv.").map(|p| {
                    (
                        format!("up_blocks.{i}.upsamplers.0.conv.{p}"),
                        Transform::Whole,
                    )
                })
            }
        } else {
            None
        };
        if let Some((n, t)) = mapped {
            m.add(format!("{side}.{n}"), file, full, t);
        }
    }
}
