//! `mmdit generate`: one image from a prompt.

use anyhow::Context;
use clap::Args;
use mmdit::{device, output, ModelRef, Request, Spec};
use std::path::PathBuf;

/// The model `generate` uses when `--model` is not given: the demo model shipped in models/.
pub const DEFAULT_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/demo");

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Model: a local folder in diffusers layout or a Hub repo id (org/name).
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Hub revision (branch, tag or commit) when --model is a repo id.
    #[arg(long)]
    pub revision: Option<String>,
    #[arg(long)]
    pub prompt: String,
    /// Negative prompt for classifier-free guidance (default "").
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Sampling steps (default: 28 for SD3 and FLUX.1-dev, 4 for FLUX.1-schnell).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Guidance scale. SD3: classifier-free guidance, 1 or less turns it off (default 7.0).
    /// FLUX.1-dev: the embedded guidance (default 3.5); ignored by FLUX.1-schnell.
    #[arg(long)]
    pub guidance: Option<f64>,
    /// Image width in pixels (default: the model's native size).
    #[arg(long)]
    pub width: Option<usize>,
    /// Image height in pixels (default: the model's native size).
    #[arg(long)]
    pub height: Option<usize>,
    /// Noise seed (random when absent; printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Initial latents: a safetensors file with one tensor `noise` of shape (1, C, H/f, W/f).
    #[arg(long)]
    pub noise: Option<PathBuf>,
    /// ODE integrator: euler (as diffusers), heun, midpoint or adams2.
    #[arg(long, default_value = "euler")]
    pub sampler: String,
    /// Flux: true classifier-free guidance scale (needs --negative-prompt).
    #[arg(long)]
    pub true_cfg: Option<f64>,
    /// T5 sequence length (default: 256 for SD3 and FLUX.1-schnell, 512 for FLUX.1-dev).
    #[arg(long)]
    pub max_sequence_length: Option<usize>,
    /// cpu, cuda, cuda:N, metal or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, f16 or bf16 (default: bf16 on CUDA, f32 on CPU).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Output PNG.
    #[arg(long, short, default_value = "out.png")]
    pub output: PathBuf,
    /// Replace the output file if it exists.
    #[arg(long)]
    pub overwrite: bool,
}

fn load_noise(path: &std::path::Path) -> anyhow::Result<candle_core::Tensor> {
    let bad = |msg: String| mmdit::Error::request(format!("--noise {}: {msg}", path.display()));
    mmdit::loader::weights::check_safetensors(path)?;
    let mut t = candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .map_err(|e| bad(format!("cannot read ({e})")))?;
    let noise = t
        .remove("noise")
        .ok_or_else(|| bad("has no tensor named `noise`".into()))?;
    Ok(noise.to_dtype(candle_core::DType::F32)?)
}

pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    // Everything the user typed is checked before any weight is read.
    let dev = device::parse_device(&a.device)?;
    let dtype = match &a.dtype {
        Some(s) => device::parse_dtype(s)?,
        None => device::default_dtype(&dev),
    };
    let sampler = mmdit::sampling::Sampler::parse(&a.sampler)?;
    output::check_output_path(&a.output, a.overwrite)?;
    let noise = a.noise.as_deref().map(load_noise).transpose()?;
    let model = ModelRef::parse(&a.model, a.revision.as_deref())?;
    let spec = Spec::open(&model)?;
    let req = Request {
        prompt: a.prompt.clone(),
        negative_prompt: a.negative_prompt.clone(),
        steps: a.steps,
        guidance: a.guidance,
        width: a.width,
        height: a.height,
        seed: a.seed,
        noise,
        max_sequence_length: a.max_sequence_length,
        true_cfg: a.true_cfg,
        sampler: Some(sampler),
    };
    let resolved = spec.resolve(&req)?;
    let req = Request {
        seed: Some(resolved.seed),
        ..req
    };
    for n in &resolved.notices {
        eprintln!("notice: {n}");
    }
    eprintln!(
        "model {} | {}x{} | {} steps | guidance {} | seed {}{}",
        spec.name(),
        resolved.width,
        resolved.height,
        resolved.steps,
        resolved.guidance,
        resolved.seed,
        if req.noise.is_some() {
            " (noise from file)"
        } else {
            ""
        }
    );

    let t0 = std::time::Instant::now();
    let mut pipe = spec.load(&dev, dtype).context("loading the model")?;
    let load = t0.elapsed();
    let bar = indicatif::ProgressBar::new(resolved.steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}]",
        )
        .expect("valid template"),
    );
    let out = pipe.generate(&req, &mut |_| bar.inc(1));
    bar.finish_and_clear();
    let out = out?;
    for t in &out.truncations {
        eprintln!(
            "warning: prompt too long for {} ({} tokens): {} tokens were dropped",
            t.encoder, t.limit, t.dropped
        );
    }
    let r = &out.request;
    let text = vec![
        ("prompt".to_string(), r.prompt.clone()),
        ("negative_prompt".to_string(), r.negative_prompt.clone()),
        ("seed".to_string(), r.seed.to_string()),
        ("steps".to_string(), r.steps.to_string()),
        ("sampler".to_string(), r.sampler.name().to_string()),
        ("guidance".to_string(), r.guidance.to_string()),
        ("width".to_string(), r.width.to_string()),
        ("height".to_string(), r.height.to_string()),
        (
            "max_sequence_length".to_string(),
            r.max_sequence_length.to_string(),
        ),
        ("model".to_string(), model.describe()),
        ("dtype".to_string(), device::dtype_name(dtype).to_string()),
        (
            "mmdit_version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
    ];
    output::write_png(&a.output, &out.image, &text)?;
    let t = &out.timings;
    eprintln!(
        "wrote {} | load {:.2}s, text {:.2}s, {} steps {:.2}s ({:.3}s/step), decode {:.2}s",
        a.output.display(),
        load.as_secs_f64(),
        t.text.as_secs_f64(),
        t.steps.len(),
        t.denoise().as_secs_f64(),
        t.denoise().as_secs_f64() / t.steps.len().max(1) as f64,
        t.decode.as_secs_f64()
    );
    Ok(())
}
