//! `mmdit bench`: speed per phase and few-step fidelity against a many-step reference.

use super::args::{EditArgs, ImageArgs, LoraArgs, ModelArgs};
use anyhow::Context;
use clap::Args;
use mmdit::bench::{self, report, Stat};
use mmdit::cache::{CacheSpec, CallKind};
use mmdit::sampling::Sampler;
use mmdit::{device, output, Request};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub image: ImageArgs,
    #[command(flatten)]
    pub edit: EditArgs,
    #[command(flatten)]
    pub lora: LoraArgs,
    /// Step counts to measure, comma-separated.
    #[arg(long, default_value = "4,10,28", value_delimiter = ',')]
    pub steps: Vec<usize>,
    /// Samplers to measure, comma-separated (euler, heun, midpoint, adams2).
    #[arg(long, default_value = "euler", value_delimiter = ',')]
    pub sampler: Vec<String>,
    /// Step caches to measure, comma-separated (none, fbcache:THRESHOLD, teacache:THRESHOLD,
    /// taylorseer:ORDER:INTERVAL); the reference runs uncached.
    #[arg(long, default_value = "none", value_delimiter = ',')]
    pub cache: Vec<String>,
    /// Steps of the Euler reference image that fidelity is measured against.
    #[arg(long, default_value_t = 100)]
    pub reference_steps: usize,
    /// Prompt (repeatable); ignored when --prompts is given.
    #[arg(long)]
    pub prompt: Vec<String>,
    /// A file with one prompt per line.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Timed repeats of each configuration (after one warm-up run).
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// table, json or csv (printed to stdout).
    #[arg(long, default_value = "table")]
    pub format: String,
    /// Writes results.json, results.csv, grid.png and plot.svg here.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Another engine's results JSON (scripts/bench_diffusers.py) to print side by side.
    #[arg(long)]
    pub compare: Option<PathBuf>,
    /// Skip the fidelity reference (speed only).
    #[arg(long)]
    pub no_reference: bool,
}

/// Measurements of one (sampler, steps, cache) configuration, over prompts and repeats.
#[derive(Default)]
struct Acc {
    sampler: Sampler,
    steps: usize,
    cache: Option<CacheSpec>,
    /// Per prompt: model calls per branch that ran in full, and partly.
    full: Vec<f64>,
    partial: Vec<f64>,
    text: Vec<f64>,
    step: Vec<f64>,
    denoise: Vec<f64>,
    decode: Vec<f64>,
    psnr: Vec<f64>,
    rmse: Vec<f64>,
}

fn commit() -> String {
    option_env!("MMDIT_COMMIT")
        .map(str::to_owned)
        .unwrap_or_else(|| {
            std::process::Command::new("git")
                .args(["rev-parse", "--short", "HEAD"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_else(|| "unknown".into())
        })
}

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    if !matches!(a.format.as_str(), "table" | "json" | "csv") {
        return Err(mmdit::Error::request(format!(
            "--format {}: use table, json or csv",
            a.format
        ))
        .into());
    }
    let samplers = a
        .sampler
        .iter()
        .map(|s| Sampler::parse(s))
        .collect::<mmdit::Result<Vec<_>>>()?;
    let caches = a
        .cache
        .iter()
        .map(|c| CacheSpec::parse(c))
        .collect::<mmdit::Result<Vec<_>>>()?;
    for &s in a.steps.iter().chain([&a.reference_steps]) {
        mmdit::request::check_steps(s)?;
    }
    if a.repeat == 0 {
        return Err(mmdit::Error::request("--repeat 0: must be at least 1").into());
    }
    let prompts: Vec<String> = match &a.prompts {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("--prompts {}", p.display()))?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect(),
        None if a.prompt.is_empty() => vec!["a red circle on a white background".into()],
        None => a.prompt.clone(),
    };
    let theirs: Option<report::Results> = match &a.compare {
        Some(p) => Some(
            serde_json::from_str(
                &std::fs::read_to_string(p)
                    .with_context(|| format!("--compare {}", p.display()))?,
            )
            .with_context(|| format!("--compare {}: not a bench results JSON", p.display()))?,
        ),
        None => None,
    };
    if let Some(d) = &a.output_dir {
        std::fs::create_dir_all(d).with_context(|| format!("--output-dir {}", d.display()))?;
    }
    let chosen = a.model.choose()?;
    let (lora_specs, lora_apply) = a.lora.parse()?;
    let input = a.edit.read()?;
    let more = a.edit.read_references()?;
    let mask = a.edit.read_mask()?;
    let (dev, dtype) = (&chosen.device, chosen.dtype);
    let spec = chosen.open()?;
    let base = |prompt: &str, steps: usize, sampler: Sampler| {
        let mut r = Request {
            prompt: prompt.to_owned(),
            steps: Some(steps),
            sampler: Some(sampler),
            cache: None,
            seed: Some(a.seed),
            width: a.image.width,
            height: a.image.height,
            guidance: a.image.guidance,
            max_sequence_length: a.image.max_sequence_length,
            image: input.as_ref().map(|i| i.image.clone()),
            reference_images: more.iter().map(|i| i.image.clone()).collect(),
            strength: a.edit.strength,
            mask: mask.as_ref().map(|m| m.image.clone()),
            loras: lora_specs.clone(),
            ..Default::default()
        };
        chosen.apply_preset(&mut r);
        r
    };
    // The weights text-to-image generation reads (transformer, text encoders, VAE decoder), at the
    // run's dtype: for unquantized runs, where that is what the engine holds.
    let weight_bytes = match (chosen.quantize, &chosen.t5, spec.stored_blocks()?) {
        (None, None, None) => spec
            .read_params()?
            .map(|n| n as u64 * dtype.size_in_bytes() as u64),
        _ => None,
    };
    let r0 = spec.resolve(&base(&prompts[0], a.steps[0], samplers[0]))?;
    for &steps in &a.steps[1..] {
        spec.resolve(&base(&prompts[0], steps, samplers[0]))?;
    }
    // Caches that cannot skip a call at some step count are said once, before the runs.
    for &cache in caches.iter().flatten() {
        for &sampler in &samplers {
            for &steps in &a.steps {
                let r = spec.resolve(&Request {
                    cache: Some(cache),
                    ..base(&prompts[0], steps, sampler)
                })?;
                for n in &r.notices {
                    eprintln!("notice: {}", n.render(&super::flag));
                }
            }
        }
    }
    let name = spec.name().to_string();

    let loras = spec.fit_loras(&lora_specs)?;
    for n in loras.notices() {
        eprintln!("warning: {}", n.render(&super::flag));
    }
    let t0 = Instant::now();
    let mut pipe = spec
        .load_with(dev, dtype, loras, lora_apply)
        .context("loading the model")?;
    let load_s = t0.elapsed().as_secs_f64();
    // Warm-up: one short run, timed apart from the measured runs (it reads the weights that are
    // read on first use).
    let t0 = Instant::now();
    pipe.generate(&base(&prompts[0], 1, Sampler::Euler), &mut |_| {})?;
    let first_run_s = t0.elapsed().as_secs_f64();
    let held_bytes = bench::rss_bytes();
    mmdit::profile::reset();
    // Steps and their wall time since the warm-up, for the profile's per-step figures.
    let mut prof = (0usize, std::time::Duration::ZERO);

    let mut rows = Vec::new();
    let mut grid_images = Vec::new();
    let cols = a.steps.len() * caches.len() + usize::from(!a.no_reference);
    let mut per_cfg: Vec<Acc> = Vec::new();
    for prompt in &prompts {
        let r = pipe.resolve(&base(prompt, 1, Sampler::Euler))?;
        let noise = pipe.initial_noise(&r)?;
        let reference = if a.no_reference {
            None
        } else {
            eprintln!(
                "reference: {} Euler steps for {prompt:?}",
                a.reference_steps
            );
            let req = Request {
                noise: Some(noise.clone()),
                ..base(prompt, a.reference_steps, Sampler::Euler)
            };
            let out = pipe.generate(&req, &mut |_| {})?;
            prof.0 += out.timings.steps.len();
            prof.1 += out.timings.denoise();
            Some(out)
        };
        for &sampler in &samplers {
            for (&steps, &cache) in a
                .steps
                .iter()
                .flat_map(|s| caches.iter().map(move |c| (s, c)))
            {
                let idx = match per_cfg
                    .iter()
                    .position(|c| c.sampler == sampler && c.steps == steps && c.cache == cache)
                {
                    Some(i) => i,
                    None => {
                        per_cfg.push(Acc {
                            sampler,
                            steps,
                            cache,
                            ..Default::default()
                        });
                        per_cfg.len() - 1
                    }
                };
                for rep in 0..a.repeat {
                    eprintln!(
                        "{} x {steps} steps, cache {}, repeat {}/{} for {prompt:?}",
                        sampler.name(),
                        cache_name(cache),
                        rep + 1,
                        a.repeat
                    );
                    let req = Request {
                        noise: Some(noise.clone()),
                        cache,
                        ..base(prompt, steps, sampler)
                    };
                    let out = pipe.generate(&req, &mut |_| {})?;
                    prof.0 += out.timings.steps.len();
                    prof.1 += out.timings.denoise();
                    let c = &mut per_cfg[idx];
                    c.text.push(out.timings.text.as_secs_f64());
                    c.step
                        .extend(out.timings.steps.iter().map(|d| d.as_secs_f64()));
                    c.denoise.push(out.timings.denoise().as_secs_f64());
                    c.decode.push(out.timings.decode.as_secs_f64());
                    if rep == 0 {
                        let (full, partial) = calls(&out.cache_calls, out.timings.steps.len());
                        c.full.push(full);
                        c.partial.push(partial);
                        if let Some(refr) = &reference {
                            c.psnr.push(bench::psnr(&out.image, &refr.image));
                            c.rmse.push(bench::rmse(&out.latents, &refr.latents)?);
                        }
                        grid_images.push(out.image);
                    }
                }
            }
            if let Some(refr) = &reference {
                grid_images.push(refr.image.clone());
            }
        }
    }
    let sched = |steps: usize| {
        pipe.spec.schedule(&mmdit::Resolved {
            steps,
            ..r0.clone()
        })
    };
    let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    for c in per_cfg {
        let sigmas = sched(c.steps).sigmas;
        let step_s = Stat::of(&c.step);
        let nfe = c.sampler.nfe(c.steps, &sigmas);
        rows.push(report::Row {
            sampler: c.sampler.name().into(),
            steps: c.steps,
            cache: cache_name(c.cache),
            nfe,
            nfe_full: mean(&c.full).map(|f| if c.cache.is_none() { nfe as f64 } else { f }),
            nfe_partial: mean(&c.partial),
            text_s: Stat::of(&c.text),
            step_s,
            denoise_s: Stat::of(&c.denoise),
            decode_s: Stat::of(&c.decode),
            // Steps over the whole denoise: a cache's steps differ in cost.
            steps_per_s: Stat::of(&c.denoise)
                .map(|d| c.step.len() as f64 / c.denoise.len() as f64 / d.median),
            psnr_db: mean(&c.psnr),
            psnr_min_db: c.psnr.iter().copied().reduce(f64::min),
            latent_rmse: mean(&c.rmse),
        });
    }
    let results = report::Results {
        engine: "mmdit".into(),
        commit: commit(),
        device: format!("{dev:?}").to_lowercase(),
        dtype: match chosen.quantize {
            Some(q) => format!(
                "{} ({})",
                device::dtype_name(dtype),
                mmdit::nn::quant::name(q)
            ),
            None => device::dtype_name(dtype).into(),
        },
        threads: candle_core::utils::get_num_threads(),
        model: name,
        width: r0.width,
        height: r0.height,
        reference_steps: a.reference_steps,
        repeat: a.repeat,
        load_s,
        first_run_s: Some(first_run_s),
        peak_rss_bytes: bench::peak_rss_bytes(),
        weight_bytes,
        held_bytes,
        loras: lora_specs
            .iter()
            .map(|s| format!("{} ({})", s.display(), a.lora.lora_apply))
            .collect(),
        rows,
    };
    match a.format.as_str() {
        "json" => println!("{}", results.json()),
        "csv" => print!("{}", results.csv()),
        _ => print!("{}", results.table()),
    }
    if let Some(t) = &theirs {
        println!("\n{}", report::compare(&results, t));
    }
    let profile = mmdit::profile::enabled().then(|| mmdit::profile::report(prof.0, prof.1));
    if let Some(p) = &profile {
        println!(
            "\nprofile (MMDIT_PROFILE=1): transformer phases per step over {} steps, device synchronised around each\n\n{p}",
            prof.0
        );
    }
    if let Some(d) = &a.output_dir {
        std::fs::write(d.join("results.json"), results.json())?;
        std::fs::write(d.join("results.csv"), results.csv())?;
        if let Some(p) = &profile {
            std::fs::write(d.join("profile.md"), p)?;
        }
        std::fs::write(d.join("plot.svg"), bench::plot::svg(&results))?;
        std::fs::write(d.join("pareto.svg"), bench::plot::pareto_svg(&results))?;
        let g = bench::grid(&grid_images, cols);
        let grid_path = d.join("grid.png");
        let _ = std::fs::remove_file(&grid_path);
        output::write_png(
            &grid_path,
            &g,
            &[(
                "columns".into(),
                format!("steps {:?} x caches {:?} then reference", a.steps, a.cache),
            )],
        )?;
        eprintln!(
            "wrote {}/{{results.json,results.csv,plot.svg,pareto.svg,grid.png}}",
            d.display()
        );
    }
    Ok(())
}

fn cache_name(c: Option<CacheSpec>) -> String {
    c.map_or_else(|| "none".into(), |c| c.to_string())
}

/// Model calls per guidance branch that ran in full and partly; without a cache, every one of
/// the `steps` steps' calls ran in full (`steps` stands in: the row's NFE replaces it).
fn calls(kinds: &[Vec<CallKind>], steps: usize) -> (f64, f64) {
    if kinds.is_empty() {
        return (steps as f64, 0.0);
    }
    let n = kinds.len() as f64;
    let count = |k: CallKind| kinds.iter().flatten().filter(|&&x| x == k).count() as f64 / n;
    (count(CallKind::Full), count(CallKind::Partial))
}
