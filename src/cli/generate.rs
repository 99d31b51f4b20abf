//! `mmdit generate`: one image from a prompt, or a replay of a PNG's recorded parameters (`--from`).

use super::args::{sha256_file, EditArgs, ImageArgs, InputImage, LoraArgs, ModelArgs};
use super::flag;
use anyhow::Context;
use clap::Args;
use mmdit::sampling::Sampler;
use mmdit::{device, output, ModelRef, Param, Request};
use std::path::{Path, PathBuf};

#[derive(Args, Debug, Default)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub image: ImageArgs,
    #[command(flatten)]
    pub edit: EditArgs,
    #[command(flatten)]
    pub lora: LoraArgs,
    /// The prompt (required unless --from gives one).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Negative prompt for classifier-free guidance (default "").
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Sampling steps (default: 28 for SD3 and FLUX.1-dev, 4 for FLUX.1-schnell).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Noise seed (random when absent; printed and stored in the PNG).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Initial latents: a safetensors file with one tensor `noise` of shape (1, C, H/f, W/f).
    #[arg(long)]
    pub noise: Option<PathBuf>,
    /// ODE integrator: euler (as diffusers), heun, midpoint or adams2.
    #[arg(long)]
    pub sampler: Option<String>,
    /// Step caching: fbcache:THRESHOLD, teacache:THRESHOLD or taylorseer:ORDER:INTERVAL, each
    /// with an optional :WARMUP (none by default).
    #[arg(long, value_name = "SPEC")]
    pub cache: Option<String>,
    /// FLUX.1: true classifier-free guidance scale (needs --negative-prompt); Chroma takes
    /// --guidance for this.
    #[arg(long)]
    pub true_cfg: Option<f64>,
    /// Keep the text encoders in memory after encoding the prompt (by default they are released
    /// before denoising, which lowers peak memory).
    #[arg(long)]
    pub keep_text_encoders: bool,
    /// Output image: .png (with the generation parameters, for --from), .jpg or .webp.
    #[arg(long, short, default_value = "out.png")]
    pub output: PathBuf,
    /// Replace the output file if it exists.
    #[arg(long)]
    pub overwrite: bool,
    /// Replay the parameters recorded in a PNG made by mmdit; flags given here override them.
    #[arg(long)]
    pub from: Option<PathBuf>,
    /// Images to make, with seeds seed, seed + 1, ...: written as OUT-1.png .. OUT-N.png (one
    /// after the other, the model loaded once).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub num_images: usize,
    /// Every N steps, write a preview of the step's prediction (a linear map of the latents,
    /// fitted to the model's VAE at load) beside the output: OUT-preview-STEP.png.
    #[arg(long, value_name = "N")]
    pub preview_every: Option<usize>,
}

fn load_noise(path: &Path) -> anyhow::Result<candle_core::Tensor> {
    let bad = |msg: String| mmdit::Error::request(format!("--noise {}: {msg}", path.display()));
    if !path.exists() {
        return Err(bad("no such file".into()).into());
    }
    if !path.is_file() {
        return Err(bad("is not a file; pass a .safetensors file".into()).into());
    }
    // The file is the user's, not a download: its problem in --noise's words, without the advice
    // to download it again that a model's weight file gets.
    mmdit::loader::weights::check_safetensors(path).map_err(|e| match e {
        mmdit::Error::BadWeights { msg, .. } => bad(format!("{msg}; save it with safetensors")),
        other => other,
    })?;
    let mut t = candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .map_err(|e| bad(format!("cannot read ({e})")))?;
    let noise = t
        .remove("noise")
        .ok_or_else(|| bad("has no tensor named `noise`".into()))?;
    Ok(noise.to_dtype(candle_core::DType::F32)?)
}

/// Fills every argument the user did not give from the PNG's text chunks.
fn apply_from(a: &mut GenerateArgs, png: &Path) -> anyhow::Result<()> {
    let bad = |msg: String| mmdit::Error::request(format!("--from {}: {msg}", png.display()));
    let (_, text) = output::read_png(png).map_err(|e| bad(format!("cannot read it ({e})")))?;
    let get = |k: &str| {
        text.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    if get("mmdit_version").is_none() {
        return Err(bad(
            "has no mmdit generation parameters; pass a PNG written by `mmdit generate`".into(),
        )
        .into());
    }
    fn num<T: std::str::FromStr>(
        v: Option<String>,
        key: &str,
        png: &Path,
    ) -> anyhow::Result<Option<T>> {
        v.map(|s| {
            s.parse::<T>().map_err(|_| {
                mmdit::Error::request(format!(
                    "--from {}: recorded `{key}` ({s:?}) is not valid",
                    png.display()
                ))
                .into()
            })
        })
        .transpose()
    }
    a.prompt = a.prompt.take().or(get("prompt"));
    a.negative_prompt = a
        .negative_prompt
        .take()
        .or(get("negative_prompt").filter(|s| !s.is_empty()));
    let m = &mut a.model;
    m.model = m.model.take().or(get("model"));
    m.revision = m.revision.take().or(get("revision"));
    m.components = m.components.take().or(get("components"));
    m.dtype = m.dtype.take().or(get("dtype"));
    m.quantize = m.quantize.take().or(get("quantize"));
    m.dequantize = m.dequantize || get("dequantize").is_some_and(|v| v == "true");
    m.t5 = m.t5.take().or(get("t5").map(PathBuf::from));
    m.vae_tiling = m.vae_tiling || get("vae_tiling").is_some_and(|v| v == "true");
    a.sampler = a.sampler.take().or(get("sampler"));
    a.cache = a.cache.take().or(get("cache"));
    a.noise = a.noise.take().or(get("noise_file").map(PathBuf::from));
    a.seed = a.seed.or(num(get("seed"), "seed", png)?);
    a.steps = a.steps.or(num(get("steps"), "steps", png)?);
    let i = &mut a.image;
    i.guidance = i.guidance.or(num(get("guidance"), "guidance", png)?);
    i.width = i.width.or(num(get("width"), "width", png)?);
    i.height = i.height.or(num(get("height"), "height", png)?);
    i.max_sequence_length =
        i.max_sequence_length
            .or(num(get("max_sequence_length"), "max_sequence_length", png)?);
    let true_cfg: Option<f64> = num(get("true_cfg"), "true_cfg", png)?;
    a.true_cfg = a.true_cfg.or(true_cfg.filter(|&g| g != 1.0));
    // An edit replays from the same input files, unless --image / --mask name others.
    let e = &mut a.edit;
    let mut mask: Vec<PathBuf> = e.mask.take().into_iter().collect();
    // Several images (FLUX.2's references) are recorded one per line.
    for (key, slot) in [("image", &mut e.image), ("mask", &mut mask)] {
        if !slot.is_empty() {
            continue;
        }
        let (paths, shas) = (
            get(key).unwrap_or_default(),
            get(&format!("{key}_sha256")).unwrap_or_default(),
        );
        let shas: Vec<&str> = shas.lines().collect();
        for (k, path) in paths
            .lines()
            .filter(|l| !l.is_empty())
            .map(PathBuf::from)
            .enumerate()
        {
            let what = format!("the {key} it was edited from, {}", path.display());
            if !path.is_file() {
                return Err(bad(format!("{what}, is missing; put it back or pass --{key}")).into());
            }
            let param = if key == "image" {
                Param::Image
            } else {
                Param::Mask
            };
            if sha256_file(&path, param)? != shas.get(k).copied().unwrap_or_default() {
                return Err(bad(format!(
                    "{what}, has changed since (its SHA-256 differs); pass --{key} {} to use the file as it is now",
                    path.display()
                ))
                .into());
            }
            slot.push(path);
        }
    }
    e.mask = mask.pop();
    if !e.image.is_empty() {
        e.strength = e.strength.or(num(get("strength"), "strength", png)?);
    }
    // LoRAs replay from the same files (each checked by its SHA-256), unless --lora names others.
    if a.lora.lora.is_empty() {
        let specs = get("lora").unwrap_or_default();
        let shas = get("lora_sha256").unwrap_or_default();
        let (specs, shas): (Vec<&str>, Vec<&str>) = (
            specs.lines().filter(|l| !l.is_empty()).collect(),
            shas.lines().collect(),
        );
        for (k, line) in specs.iter().enumerate() {
            let spec = mmdit::lora::LoraSpec::parse(line)
                .map_err(|_| bad(format!("recorded LoRA {line:?} is not valid")))?;
            let path = spec.local_file().map_err(|_| {
                bad(format!(
                    "the LoRA it was made with, {}, is missing; put it back or pass --lora",
                    spec.source
                ))
            })?;
            if shas.get(k).copied() != Some(sha256_file(&path, Param::Lora)?.as_str()) {
                return Err(bad(format!(
                    "the LoRA it was made with, {}, has changed since (its SHA-256 differs); pass --lora {} to use the file as it is now",
                    spec.source,
                    line
                ))
                .into());
            }
            a.lora.lora.push(line.to_string());
        }
    }
    Ok(())
}

pub fn run(mut a: GenerateArgs) -> anyhow::Result<()> {
    // Everything the user typed is checked before any weight is read.
    if let Some(png) = a.from.clone() {
        apply_from(&mut a, &png)?;
    }
    if a.preview_every == Some(0) {
        return Err(mmdit::Error::request(
            "--preview-every 0: must be at least 1 (steps between previews)",
        )
        .into());
    }
    let prompt = a.prompt.clone().ok_or_else(|| {
        mmdit::Error::request("--prompt is required (or --from a PNG made by mmdit)")
    })?;
    let chosen = a.model.choose()?;
    let (lora_specs, lora_apply) = a.lora.parse()?;
    let sampler = Sampler::parse(a.sampler.as_deref().unwrap_or("euler"))?;
    let cache = match &a.cache {
        Some(c) => mmdit::cache::CacheSpec::parse(c)?,
        None => None,
    };
    if a.num_images == 0 {
        return Err(mmdit::Error::request("--num-images 0: must be at least 1").into());
    }
    let outputs = numbered(&a.output, a.num_images);
    for o in &outputs {
        output::check_output_path(o, a.overwrite)?;
    }
    let noise = a.noise.as_deref().map(load_noise).transpose()?;
    let input = a.edit.read()?;
    let more = a.edit.read_references()?;
    let mask = a.edit.read_mask()?;
    let spec = chosen.open()?;
    let i = &a.image;
    let mut req = Request {
        prompt,
        negative_prompt: a.negative_prompt.clone(),
        steps: a.steps,
        guidance: i.guidance,
        width: i.width,
        height: i.height,
        seed: a.seed,
        noise,
        max_sequence_length: i.max_sequence_length,
        true_cfg: a.true_cfg,
        sampler: Some(sampler),
        cache,
        image: input.as_ref().map(|i| i.image.clone()),
        reference_images: more.iter().map(|i| i.image.clone()).collect(),
        strength: a.edit.strength,
        mask: mask.as_ref().map(|m| m.image.clone()),
        encode_noise: Vec::new(),
        reference_auto_resize: None,
        loras: lora_specs.clone(),
    };
    chosen.apply_preset(&mut req);
    let resolved = spec.resolve(&req)?;
    let req = Request {
        seed: Some(resolved.seed),
        ..req
    };
    for n in &resolved.notices {
        eprintln!("notice: {}", n.render(&flag));
    }
    let edit = match &resolved.init {
        Some(i) => format!(
            " | edit at strength {} ({} of {} steps run)",
            i.strength,
            resolved.steps_to_run(),
            resolved.steps
        ),
        None => String::new(),
    };
    eprintln!(
        "model {}{} | {}x{} | {} steps {}{edit} | guidance {} | seed {}{}",
        spec.name(),
        chosen.quantize.map_or(String::new(), |q| format!(
            " ({})",
            mmdit::nn::quant::name(q)
        )),
        resolved.width,
        resolved.height,
        resolved.steps,
        resolved.sampler.name(),
        resolved.guidance,
        resolved.seed,
        if req.noise.is_some() {
            " (noise from file)"
        } else {
            ""
        }
    );
    let (dev, dtype) = (&chosen.device, chosen.dtype);
    // LoRA files are read and fitted to the model before its weights are.
    let loras = spec.fit_loras(&lora_specs)?;
    for n in loras.notices() {
        eprintln!("warning: {}", n.render(&flag));
    }
    let lora_shas = lora_specs
        .iter()
        .map(|s| sha256_file(&s.local_file()?, Param::Lora))
        .collect::<mmdit::Result<Vec<_>>>()?;
    for (spec, f) in &loras.adapters {
        eprintln!(
            "LoRA {} ({}, rank {}) x {}: {} layers",
            spec.source,
            f.format.name(),
            f.ranks
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join("/"),
            spec.scale,
            f.layers.len()
        );
    }

    // Ctrl-C stops at the next step; nothing is written.
    let _ = ctrlc::set_handler(mmdit::interrupt::request);
    let t0 = std::time::Instant::now();
    let mut pipe = spec
        .load_with(dev, dtype, loras, lora_apply)
        .context("loading the model")?;
    pipe.keep_text_encoders(a.keep_text_encoders);
    let load = t0.elapsed();
    let mut preview = None;
    // Images of one batched forward (text-to-image; edits and given noise run one at a time).
    let batch = pipe.batch_size(&resolved);
    for chunk in (0..outputs.len()).step_by(batch) {
        let len = batch.min(outputs.len() - chunk);
        let req_k = Request {
            seed: Some(resolved.seed.wrapping_add(chunk as u64)),
            ..req.clone()
        };
        if a.preview_every.is_some() && preview.is_none() {
            preview = Some(mmdit::pipeline::preview::Preview::fit(&mut pipe)?);
        }
        let bar = indicatif::ProgressBar::new(resolved.steps_to_run() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}]",
            )
            .expect("valid template"),
        );
        let mut run =
            |obs: &mut dyn mmdit::pipeline::sample::Observer| pipe.generate_batch(&req_k, len, obs);
        let outs = match (a.preview_every, &preview) {
            (Some(every), Some(preview)) => {
                let mut obs = Previews {
                    every,
                    preview: preview.clone(),
                    output: outputs[chunk].clone(),
                    bar: &bar,
                    error: None,
                };
                let outs = run(&mut obs);
                if let Some(e) = obs.error {
                    return Err(e.into());
                }
                outs
            }
            _ => run(&mut |_| bar.inc(1)),
        };
        bar.finish_and_clear();
        for (j, out) in outs?.into_iter().enumerate() {
            let out_path = &outputs[chunk + j];
            for t in &out.truncations {
                eprintln!(
                    "warning: prompt too long for {} ({} tokens): {} tokens were dropped",
                    t.encoder, t.limit, t.dropped
                );
            }
            let r = &out.request;
            let mut text = Vec::new();
            if let ModelRef::Hub { revision, .. } = &chosen.model {
                text.push(("revision", revision.clone()));
            }
            if let Some(c) = &a.model.components {
                text.push(("components", c.clone()));
            }
            if let Some(q) = chosen.quantize {
                text.push(("quantize", mmdit::nn::quant::name(q).to_string()));
            }
            if chosen.dequantize {
                text.push(("dequantize", "true".to_string()));
            }
            if chosen.vae_tiling {
                text.push(("vae_tiling", "true".to_string()));
            }
            if let Some(f) = &chosen.t5 {
                let path = std::fs::canonicalize(f).unwrap_or_else(|_| f.clone());
                text.push(("t5", path.display().to_string()));
            }
            if let Some(n) = &a.noise {
                text.push(("noise_file", n.display().to_string()));
            }
            let images: Vec<&InputImage> = input.iter().chain(&more).collect();
            for (key, files) in [("image", images), ("mask", mask.iter().collect())] {
                if files.is_empty() {
                    continue;
                }
                let path = |f: &InputImage| {
                    let p = std::fs::canonicalize(&f.path).unwrap_or_else(|_| f.path.clone());
                    p.display().to_string()
                };
                let lines = |v: Vec<String>| v.join("\n");
                text.push((key, lines(files.iter().map(|f| path(f)).collect())));
                let sha_key = if key == "image" {
                    "image_sha256"
                } else {
                    "mask_sha256"
                };
                text.push((
                    sha_key,
                    lines(files.iter().map(|f| f.sha256.clone()).collect()),
                ));
            }
            if !lora_specs.is_empty() {
                let lines = |v: Vec<String>| v.join("\n");
                text.push((
                    "lora",
                    lines(lora_specs.iter().map(|s| s.display()).collect()),
                ));
                text.push(("lora_sha256", lines(lora_shas.clone())));
            }
            // The strength as given: a replay on the same model takes the same default, and a model that
            // takes no strength (FLUX.1 Kontext) gets none back.
            if let Some(s) = a.edit.strength {
                text.push(("strength", s.to_string()));
            }
            let text: Vec<(String, String)> = r
                .parameters(&chosen.name, device::dtype_name(dtype))
                .into_iter()
                .chain(text.into_iter().map(|(k, v)| (k.to_string(), v)))
                .collect();
            output::write_image(out_path, &out.image, &text)?;
            let t = &out.timings;
            eprintln!(
                "wrote {} | load {:.2}s, text {:.2}s, {}{} steps {:.2}s ({:.3}s/step), decode {:.2}s",
                out_path.display(),
                load.as_secs_f64(),
                t.text.as_secs_f64(),
                if r.init.is_some() {
                    format!("encode {:.2}s, ", t.encode.as_secs_f64())
                } else {
                    String::new()
                },
                t.steps.len(),
                t.denoise().as_secs_f64(),
                t.denoise().as_secs_f64() / t.steps.len().max(1) as f64,
                t.decode.as_secs_f64()
            );
            if let Some(c) = r.cache {
                eprintln!("cache {c}: {}", mmdit::cache::summary(&out.cache_calls));
            }
        }
    }
    Ok(())
}

/// `out.png` for one image; `out-1.png` .. `out-N.png` for N.
fn numbered(out: &Path, n: usize) -> Vec<PathBuf> {
    if n == 1 {
        return vec![out.to_path_buf()];
    }
    let stem = out.file_stem().unwrap_or_default().to_string_lossy();
    let ext = out
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    (1..=n)
        .map(|k| out.with_file_name(format!("{stem}-{k}{ext}")))
        .collect()
}

/// Writes a preview PNG beside the output every `every` steps.
struct Previews<'a> {
    every: usize,
    preview: mmdit::pipeline::preview::Preview,
    output: PathBuf,
    bar: &'a indicatif::ProgressBar,
    error: Option<mmdit::Error>,
}

impl Previews<'_> {
    fn path(&self, step: usize) -> PathBuf {
        let stem = self
            .output
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy();
        self.output
            .with_file_name(format!("{stem}-preview-{step:03}.png"))
    }
}

impl mmdit::pipeline::sample::Observer for Previews<'_> {
    fn step(&mut self, _: usize) {
        self.bar.inc(1);
    }

    fn wants_prediction(&self, i: usize) -> bool {
        (i + 1).is_multiple_of(self.every)
    }

    fn prediction(&mut self, i: usize, x0: &candle_core::Tensor) {
        let written = self
            .preview
            .image(x0)
            .and_then(|img| output::write_png(&self.path(i + 1), &img, &[]));
        if let Err(e) = written {
            self.error.get_or_insert(e);
        }
    }
}
