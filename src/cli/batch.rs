//! `mmdit batch prompts.jsonl --output-dir D`: one request per line, in the body format of the
//! server's `POST /v1/images/generations`, the outputs named by line number. A shard takes every
//! N-th line and `--resume` skips the lines whose outputs exist, so the jobs of any scheduler's
//! array (Slurm, Kubernetes Indexed Jobs) split a prompt list with no coordination.

use super::args::{LoraDirArgs, ModelArgs};
use crate::server::api::Generation;
use anyhow::Context;
use clap::Args;
use mmdit::device;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct BatchArgs {
    /// The requests, one JSON object per line: `prompt` and optionally `n`, `size` ("WxH"),
    /// `negative_prompt`, `steps`, `guidance`, `seed` (default: the line number), `sampler`,
    /// `cache`, `loras` (names in --lora-dir). Blank lines are skipped but counted.
    pub requests: PathBuf,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Folder for the images: line L (from 1) writes L.png, or L-1.png .. L-n.png for n > 1.
    #[arg(long)]
    pub output_dir: PathBuf,
    /// This job's share of the lines, I/N: the lines L with (L - 1) mod N = I (I from 0, as
    /// Kubernetes' JOB_COMPLETION_INDEX and Slurm's SLURM_ARRAY_TASK_ID from 0).
    #[arg(long, value_name = "I/N")]
    pub shard: Option<String>,
    /// Skip the lines whose images all exist (a rerun after an interruption).
    #[arg(long)]
    pub resume: bool,
    #[command(flatten)]
    pub lora_dir: LoraDirArgs,
}

/// A line to run: its number, request, image count and output files.
struct Line {
    number: usize,
    req: mmdit::Request,
    n: usize,
    outputs: Vec<PathBuf>,
}

fn parse_shard(s: &str) -> mmdit::Result<(usize, usize)> {
    let bad = || {
        mmdit::Error::request(format!(
            "--shard {s}: write it as I/N with 0 <= I < N, e.g. 0/4"
        ))
    };
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (i, n): (usize, usize) = (
        i.trim().parse().map_err(|_| bad())?,
        n.trim().parse().map_err(|_| bad())?,
    );
    if n == 0 || i >= n {
        return Err(bad());
    }
    Ok((i, n))
}

fn outputs(dir: &Path, number: usize, n: usize) -> Vec<PathBuf> {
    match n {
        1 => vec![dir.join(format!("{number}.png"))],
        _ => (1..=n)
            .map(|k| dir.join(format!("{number}-{k}.png")))
            .collect(),
    }
}

pub fn run(a: BatchArgs) -> anyhow::Result<()> {
    // Every line is read and checked (against the model's configs too) before any weight is.
    let (shard, of) = a
        .shard
        .as_deref()
        .map(parse_shard)
        .transpose()?
        .unwrap_or((0, 1));
    if !a.output_dir.is_dir() {
        return Err(mmdit::Error::request(format!(
            "--output-dir {}: no such folder; create it first",
            a.output_dir.display()
        ))
        .into());
    }
    let lora_dir = a.lora_dir.checked()?;
    let text = std::fs::read_to_string(&a.requests).map_err(|e| {
        mmdit::Error::request(format!("{}: cannot read it ({e})", a.requests.display()))
    })?;
    let chosen = a.model.choose()?;
    let spec = chosen.open()?;
    let mut lines = Vec::new();
    let (mut skipped, mut total) = (0, 0);
    for (k, raw) in text.lines().enumerate() {
        let number = k + 1;
        if raw.trim().is_empty() || k % of != shard {
            continue;
        }
        total += 1;
        let at = |msg: String| {
            mmdit::Error::request(format!("{} line {number}: {msg}", a.requests.display()))
        };
        let body: Generation =
            serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(raw))
                .map_err(|e| {
                    let (_, reason) = crate::server::api::decoder_reason(&e.to_string());
                    at(format!("not a request ({reason})"))
                })?;
        let checked = body.check(lora_dir).map_err(|e| at(e.message))?;
        let mut req = checked.req;
        req.seed = req.seed.or(Some(number as u64));
        chosen.apply_preset(&mut req);
        spec.resolve(&req)
            .map_err(|e| at(e.render(&crate::server::api::api_name)))?;
        let outs = outputs(&a.output_dir, number, checked.n);
        if outs.iter().all(|p| p.exists()) && a.resume {
            skipped += 1;
            continue;
        }
        if let Some(p) = outs.iter().find(|p| p.exists()) {
            return Err(at(format!(
                "{} exists already; pass --resume to skip the lines that are done",
                p.display()
            ))
            .into());
        }
        lines.push(Line {
            number,
            req,
            n: checked.n,
            outputs: outs,
        });
    }
    eprintln!(
        "{} | shard {shard}/{of}: {total} lines, {skipped} done already, {} to run",
        spec.name(),
        lines.len()
    );
    if lines.is_empty() {
        return Ok(());
    }
    let _ = ctrlc::set_handler(mmdit::interrupt::request);
    let (dev, dtype) = (&chosen.device, chosen.dtype);
    let mut pipe = spec
        .load_with(
            dev,
            dtype,
            mmdit::lora::LoraSet::default(),
            mmdit::lora::Apply::Runtime,
        )
        .context("loading the model")?;
    let images: usize = lines.iter().map(|l| l.n).sum();
    let bar = indicatif::ProgressBar::new(images as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} images [{elapsed_precise}<{eta_precise}]",
        )
        .expect("valid template"),
    );
    for line in &lines {
        // Batched forwards where the size allows ([`mmdit::Pipeline::batch_size`]).
        let batch = pipe.batch_size(&pipe.resolve(&line.req)?);
        let seed = line.req.seed.unwrap_or(0);
        for first in (0..line.n).step_by(batch) {
            let len = batch.min(line.n - first);
            let req = mmdit::Request {
                seed: Some(seed.wrapping_add(first as u64)),
                ..line.req.clone()
            };
            let made = pipe
                .generate_batch(&req, len, &mut |_| {})
                .with_context(|| format!("line {}", line.number))?;
            for (k, g) in made.into_iter().enumerate() {
                let text = g
                    .request
                    .parameters(&chosen.name, device::dtype_name(dtype));
                mmdit::output::write_png(&line.outputs[first + k], &g.image, &text)?;
                bar.inc(1);
            }
        }
    }
    bar.finish_and_clear();
    eprintln!("wrote {images} images to {}", a.output_dir.display());
    Ok(())
}
