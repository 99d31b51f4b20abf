//! Argument structs and dispatch, one file per subcommand.

mod args;
mod batch;
mod bench;
mod convert;
mod generate;
mod models;
mod serve;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "mmdit",
    version,
    about = "Text-to-image with SD3 / SD3.5 MMDiT models"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate an image from a prompt.
    Generate(generate::GenerateArgs),
    /// Measure speed per phase and few-step fidelity at several step counts and samplers.
    Bench(bench::BenchArgs),
    /// List the model presets.
    Models,
    /// Download a model ahead of time (preset or Hub repo id).
    Fetch(models::FetchArgs),
    /// Check a model's weights against its configs, reading only file headers.
    Inspect(models::InspectArgs),
    /// Write a model's transformer as a quantized GGUF file (stable-diffusion.cpp / ComfyUI-GGUF
    /// naming).
    Convert(convert::ConvertArgs),
    /// Generate one image (or n) per line of a JSONL file of requests, by line number; shardable
    /// and resumable.
    Batch(batch::BatchArgs),
    /// Serve the model over HTTP: OpenAI's images API, with a bounded queue, an optional API key
    /// and Prometheus metrics.
    Serve(serve::ServeArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Models => models::list(),
        Command::Fetch(a) => models::fetch(a),
        Command::Inspect(a) => models::inspect(a),
        Command::Convert(a) => convert::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Batch(a) => batch::run(a),
    }
}

/// A library parameter as the CLI names it: its flag.
pub fn flag(p: mmdit::Param) -> String {
    if p == mmdit::Param::Lora {
        // The request's list `loras` is the repeatable `--lora`.
        return "--lora".into();
    }
    format!("--{}", p.name().replace('_', "-"))
}

/// The error and its causes on one line, parameters named by their flags.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for c in e.chain() {
        let text = match c.downcast_ref::<mmdit::Error>() {
            Some(m) => m.render(&flag),
            None => c.to_string(),
        };
        // First line only: candle appends a backtrace to its messages when RUST_BACKTRACE is set.
        let s = text.lines().next().unwrap_or_default().trim().to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ")
}

/// 130 for an interrupt (as shells report SIGINT), 2 for bad input, 1 otherwise.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    match e.downcast_ref::<mmdit::Error>() {
        Some(mmdit::Error::Interrupted) => 130,
        Some(mmdit::Error::InvalidRequest(_) | mmdit::Error::Lora { .. }) => 2,
        _ => 1,
    }
}
