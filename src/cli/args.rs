//! Arguments shared by `generate` and `bench` (flattened into both), and what they resolve to.

use clap::Args;
use mmdit::presets::{self, Preset};
use mmdit::{device, ModelRef, Spec};
use std::path::{Path, PathBuf};

/// The model `generate` and `bench` use when `--model` is not given: the demo preset (models/demo).
pub const DEFAULT_MODEL: &str = "demo";

/// Which model, where and in what dtype.
#[derive(Args, Debug, Default, Clone)]
pub struct ModelArgs {
    /// Model: a preset (`mmdit models`), a local folder in diffusers layout, a Hub repo id
    /// (org/name) or a single-file .safetensors or .gguf checkpoint (SAI SD3/SD3.5, BFL FLUX.1, Chroma, BFL FLUX.2 [klein]).
    /// Default: the embedded demo model.
    #[arg(long)]
    pub model: Option<String>,
    /// Hub revision (branch, tag or commit) when --model is a repo id.
    #[arg(long)]
    pub revision: Option<String>,
    /// For a single-file .safetensors or .gguf --model: a preset, folder or Hub repo with its configs,
    /// tokenizers and the components the file lacks (default: the preset its shapes match).
    #[arg(long)]
    pub components: Option<String>,
    /// auto (CUDA, then Metal, then CPU), cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// f32, f16 or bf16 (default: the preset's, else bf16 on CUDA and Metal, f32 on CPU).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Quantize the transformer's linear layers at load to a GGML block type (q8_0, q6_k, q5_k,
    /// q5_1, q5_0, q4_k, q4_1, q4_0, q3_k, q2_k), computed on quantized kernels; CPU only.
    #[arg(long, value_name = "TYPE")]
    pub quantize: Option<String>,
    /// For a quantized .gguf --model: dequantize its weights at load and compute in --dtype
    /// (a debug switch for parity; needs the memory of the unquantized model).
    #[arg(long)]
    pub dequantize: bool,
    /// The T5 encoder's weights from this file instead of the model's: a GGUF T5 encoder
    /// (llama.cpp names, as city96's t5-v1_1-xxl-encoder-gguf; computed on its blocks on the CPU)
    /// or a .safetensors one (transformers' names, e.g. ComfyUI's t5xxl_fp16 / t5xxl_fp8_e4m3fn).
    #[arg(long, value_name = "FILE")]
    pub t5: Option<PathBuf>,
    /// Decode (and encode) with the VAE in overlapping tiles, blended as diffusers'
    /// `enable_tiling()`: memory follows the tile, not the image (for large images).
    #[arg(long)]
    pub vae_tiling: bool,
}

/// Size, guidance and T5 length of the images.
#[derive(Args, Debug, Default, Clone)]
pub struct ImageArgs {
    /// Image width in pixels (default: the model's native size).
    #[arg(long)]
    pub width: Option<usize>,
    /// Image height in pixels (default: the model's native size).
    #[arg(long)]
    pub height: Option<usize>,
    /// Guidance scale. SD3: classifier-free guidance, 1 or less turns it off (default 7.0).
    /// FLUX.1-dev: the embedded guidance (default 3.5); ignored by FLUX.1-schnell. Chroma:
    /// classifier-free guidance against --negative-prompt ("" by default), 1 or less turns it off
    /// (default 5; the Chroma1 presets 3). FLUX.2 [klein]: classifier-free guidance as Chroma's,
    /// ignored by the step-distilled 4B and 9B.
    #[arg(long)]
    pub guidance: Option<f64>,
    /// Text sequence length: T5's, or for FLUX.2 Qwen3's (default: 256 for SD3 and FLUX.1-schnell,
    /// 512 for FLUX.1-dev, Chroma and FLUX.2).
    #[arg(long)]
    pub max_sequence_length: Option<usize>,
}

/// Editing: the image to start from and how much of it to repaint.
#[derive(Args, Debug, Default, Clone)]
pub struct EditArgs {
    /// Edit this image (PNG, JPEG or WebP) instead of starting from noise (img2img). The output
    /// size defaults to the image's, rounded down to the model's multiple. FLUX.2 takes it as a
    /// reference, and several: repeat --image.
    #[arg(long)]
    pub image: Vec<PathBuf>,
    /// With --image: inpaint. White repaints, black keeps the input (any size: it is resized to the
    /// output, as diffusers does).
    #[arg(long)]
    pub mask: Option<PathBuf>,
    /// With --image: how much to repaint, in (0, 1]: the share of the steps that run (default 0.6,
    /// as diffusers).
    #[arg(long)]
    pub strength: Option<f64>,
}

/// LoRA adapters and how they are applied.
#[derive(Args, Debug, Default, Clone)]
pub struct LoraArgs {
    /// A LoRA: a .safetensors file or a Hub repo org/name[/file.safetensors], with an optional
    /// weight (`:0.8`, default 1). Repeat it to combine several (their weights as diffusers'
    /// set_adapters). diffusers/PEFT, kohya, XLabs, AI-toolkit and BFL/ComfyUI files are read.
    #[arg(long = "lora", value_name = "SPEC")]
    pub lora: Vec<String>,
    /// How LoRAs reach the transformer: merge (into the weights at load: no cost per step) or
    /// runtime (a term of each layer's output, as for weights that cannot be merged).
    #[arg(long, default_value = "merge", value_name = "HOW")]
    pub lora_apply: String,
}

impl LoraArgs {
    /// The parsed specs and the way to apply them (before any file is read).
    pub fn parse(&self) -> mmdit::Result<(Vec<mmdit::lora::LoraSpec>, mmdit::lora::Apply)> {
        let specs = self
            .lora
            .iter()
            .map(|s| mmdit::lora::LoraSpec::parse(s))
            .collect::<mmdit::Result<Vec<_>>>()?;
        let apply = match self.lora_apply.as_str() {
            "merge" => mmdit::lora::Apply::Merge,
            "runtime" => mmdit::lora::Apply::Runtime,
            other => {
                return Err(mmdit::Error::request(format!(
                    "--lora-apply {other}: unknown; use merge or runtime"
                )))
            }
        };
        Ok((specs, apply))
    }
}

/// An input image as read, with what the PNG metadata records of it.
pub struct InputImage {
    pub path: PathBuf,
    pub image: mmdit::RgbImage,
    /// SHA-256 of the file's bytes, in hex.
    pub sha256: String,
}

impl EditArgs {
    /// Reads `--image` (before any weight is read).
    pub fn read(&self) -> mmdit::Result<Option<InputImage>> {
        read_input(
            self.image.first().map(PathBuf::as_path),
            mmdit::Param::Image,
        )
    }

    /// Reads the further `--image`s (FLUX.2's references after the first).
    pub fn read_references(&self) -> mmdit::Result<Vec<InputImage>> {
        self.image
            .iter()
            .skip(1)
            .map(|p| Ok(read_input(Some(p), mmdit::Param::Image)?.expect("a path was given")))
            .collect()
    }

    /// Reads `--mask`; it needs `--image`.
    pub fn read_mask(&self) -> mmdit::Result<Option<InputImage>> {
        if self.mask.is_some() && self.image.is_empty() {
            return Err(mmdit::Error::request(
                "--mask needs --image: the mask marks what to repaint in that image",
            ));
        }
        read_input(self.mask.as_deref(), mmdit::Param::Mask)
    }
}

fn read_input(path: Option<&Path>, what: mmdit::Param) -> mmdit::Result<Option<InputImage>> {
    let Some(path) = path else {
        return Ok(None);
    };
    let image = mmdit::image_io::read_rgb(path, what)?;
    let sha256 = sha256_file(path, what)?;
    Ok(Some(InputImage {
        path: path.to_path_buf(),
        image,
        sha256,
    }))
}

/// SHA-256 of a file's bytes, in lowercase hex.
pub fn sha256_file(path: &Path, what: mmdit::Param) -> mmdit::Result<String> {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).map_err(|e| {
        mmdit::Error::invalid(what, format!(" {}: cannot read it ({e})", path.display()))
    })?;
    Ok(Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// What [`ModelArgs`] name, checked; nothing opened yet.
pub struct Chosen {
    /// `--model` as given (or the default), for the PNG metadata.
    pub name: String,
    pub model: ModelRef,
    pub preset: Option<Preset>,
    pub device: candle_core::Device,
    pub dtype: candle_core::DType,
    pub quantize: Option<candle_core::quantized::GgmlDType>,
    pub dequantize: bool,
    pub t5: Option<PathBuf>,
    pub vae_tiling: bool,
}

impl ModelArgs {
    /// Parses the device, resolves the model (a preset, folder, repo or single file and its
    /// components) and picks the dtype: `--dtype`, else the preset's for the device, else the
    /// device's default.
    pub fn choose(&self) -> mmdit::Result<Chosen> {
        let dev = device::parse_device(&self.device)?;
        let name = self.model.clone().unwrap_or_else(|| DEFAULT_MODEL.into());
        let (model, preset) =
            presets::resolve_with(&name, self.revision.as_deref(), self.components.as_deref())?;
        let dtype = match self
            .dtype
            .as_deref()
            .or_else(|| preset.as_ref().and_then(|p| p.dtype_for(&dev)))
        {
            Some(s) => device::parse_dtype(s)?,
            None => device::default_dtype(&dev),
        };
        if let Some(f) = &self.t5 {
            let ext = f.extension().and_then(|e| e.to_str()).unwrap_or("");
            if !f.is_file() {
                return Err(mmdit::Error::invalid(
                    mmdit::Param::T5,
                    format!(" {}: no such file", f.display()),
                ));
            }
            if !["gguf", "safetensors"].contains(&ext.to_ascii_lowercase().as_str()) {
                return Err(mmdit::Error::invalid(
                    mmdit::Param::T5,
                    format!(
                        " {}: pass a T5 encoder as .gguf or .safetensors",
                        f.display()
                    ),
                ));
            }
        }
        let quantize = match &self.quantize {
            None => None,
            Some(q) => {
                let names: Vec<&str> = mmdit::nn::quant::TYPES.iter().map(|(n, _)| *n).collect();
                let t = mmdit::nn::quant::parse(q).ok_or_else(|| {
                    mmdit::Error::invalid(
                        mmdit::Param::Quantize,
                        format!(
                            " {q}: unknown; use one of {} (IQ types are not supported)",
                            names.join(", ")
                        ),
                    )
                })?;
                if !dev.is_cpu() {
                    return Err(mmdit::Error::invalid(
                        mmdit::Param::Quantize,
                        format!(
                            " {q}: quantized layers run on the CPU only for now; pass --device cpu"
                        ),
                    ));
                }
                Some(t)
            }
        };
        Ok(Chosen {
            name,
            model,
            preset,
            device: dev,
            dtype,
            quantize,
            dequantize: self.dequantize,
            t5: self.t5.clone(),
            vae_tiling: self.vae_tiling,
        })
    }
}

impl Chosen {
    /// Reads and checks the model's configs, with the preset's scheduler shift.
    pub fn open(&self) -> mmdit::Result<Spec> {
        let mut spec = Spec::open(&self.model)?;
        if let Some(s) = self.preset.as_ref().and_then(|p| p.defaults.shift) {
            spec.set_shift(s);
        }
        spec.set_quantize(self.quantize);
        spec.set_dequantize(self.dequantize);
        spec.set_vae_tiling(self.vae_tiling);
        if let Some(f) = &self.t5 {
            spec.set_t5_file(f)?;
        }
        Ok(spec)
    }

    /// Fills the request's unset fields from the preset's defaults.
    pub fn apply_preset(&self, req: &mut mmdit::Request) {
        if let Some(p) = &self.preset {
            p.apply(req);
        }
    }
}

/// A folder of LoRA files that requests name in `loras` (`serve`, `batch`).
#[derive(Args, Debug, Default, Clone)]
pub struct LoraDirArgs {
    /// Folder of LoRA .safetensors files that requests name in `loras`.
    #[arg(long)]
    pub lora_dir: Option<PathBuf>,
}

impl LoraDirArgs {
    /// The folder, checked to exist.
    pub fn checked(&self) -> mmdit::Result<Option<&Path>> {
        match &self.lora_dir {
            Some(d) if !d.is_dir() => Err(mmdit::Error::request(format!(
                "--lora-dir {}: no such folder",
                d.display()
            ))),
            d => Ok(d.as_deref()),
        }
    }
}
