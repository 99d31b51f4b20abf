//! `mmdit convert`: a model's transformer written as a quantized GGUF file.

use anyhow::Context;
use clap::Args;
use mmdit::presets;
use mmdit::Spec;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// A preset, a model folder, a Hub repo id, or a single-file .safetensors/.gguf checkpoint.
    pub model: String,
    /// The GGML type of the weights: q8_0, q6_k, q5_k, q5_1, q5_0, q4_k, q4_1, q4_0, q3_k, q2_k,
    /// f16, bf16 or f32.
    #[arg(long, value_name = "TYPE")]
    pub quantize: String,
    /// The GGUF file to write.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: PathBuf,
    /// Hub revision when MODEL is a repo id.
    #[arg(long)]
    pub revision: Option<String>,
    /// For a single-file MODEL: the preset, folder or repo with its configs.
    #[arg(long)]
    pub components: Option<String>,
}

/// The types `convert` writes: the block types and the float ones.
fn parse_type(name: &str) -> Option<candle_core::quantized::GgmlDType> {
    use candle_core::quantized::GgmlDType;
    match name.to_ascii_lowercase().as_str() {
        "f32" => Some(GgmlDType::F32),
        "f16" => Some(GgmlDType::F16),
        "bf16" => Some(GgmlDType::BF16),
        n => mmdit::nn::quant::parse(n),
    }
}

pub fn run(a: ConvertArgs) -> anyhow::Result<()> {
    let want = parse_type(&a.quantize).ok_or_else(|| {
        let names: Vec<&str> = mmdit::nn::quant::TYPES.iter().map(|(n, _)| *n).collect();
        mmdit::Error::invalid(
            mmdit::Param::Quantize,
            format!(
                " {}: unknown; use one of {}, f16, bf16, f32 (IQ types are not written)",
                a.quantize,
                names.join(", ")
            ),
        )
    })?;
    let ext = a.output.extension().and_then(|e| e.to_str()).unwrap_or("");
    if !ext.eq_ignore_ascii_case("gguf") {
        return Err(mmdit::Error::request(format!(
            "--output {}: name the file .gguf (it is written as GGUF)",
            a.output.display()
        ))
        .into());
    }
    let dir = match a.output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(mmdit::Error::request(format!(
            "--output {}: the folder {} does not exist; create it first",
            a.output.display(),
            dir.display()
        ))
        .into());
    }
    let input = std::path::Path::new(&a.model);
    if input.is_file() && a.output.canonicalize().ok() == input.canonicalize().ok() {
        return Err(mmdit::Error::request(format!(
            "--output {}: is the model being converted; write to another file",
            a.output.display()
        ))
        .into());
    }
    let (model, _) =
        presets::resolve_with(&a.model, a.revision.as_deref(), a.components.as_deref())?;
    let spec = Spec::open(&model)?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} tensors [{elapsed_precise}]")
            .expect("valid template"),
    );
    let t0 = std::time::Instant::now();
    let done = spec.write_gguf(&a.output, want, &mut |i, n| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
    });
    bar.finish_and_clear();
    let done = done.with_context(|| format!("writing {}", a.output.display()))?;
    let types: Vec<String> = done
        .types
        .iter()
        .map(|(t, (n, b))| format!("{t} x{n} ({:.1} MB)", *b as f64 / 1e6))
        .collect();
    println!(
        "wrote {} | {:.1} MB | {} | {:.1}s",
        a.output.display(),
        done.bytes as f64 / 1e6,
        types.join(", "),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
