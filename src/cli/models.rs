//! `mmdit models`, `mmdit fetch` and `mmdit inspect`.

use clap::Args;
use mmdit::presets::{self, Preset};
use mmdit::Spec;
use std::path::Path;

#[derive(Args, Debug)]
pub struct FetchArgs {
    /// A preset (`mmdit models`) or a Hub repo id.
    pub model: String,
    #[arg(long)]
    pub revision: Option<String>,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// A preset, a Hub repo id, a model folder, or a single .safetensors or .gguf file.
    pub model: Option<String>,
    /// The model, as a flag (with --lora: the model the LoRA is fitted to).
    #[arg(long = "model", value_name = "MODEL")]
    pub model_flag: Option<String>,
    /// A LoRA file (or Hub org/name[/file]): its format, ranks, the layers it touches and every key
    /// that fits nothing (fitted to the model when one is given).
    #[arg(long)]
    pub lora: Option<String>,
    #[arg(long)]
    pub revision: Option<String>,
    /// For a single-file checkpoint: the preset, folder or repo with its configs (default: the
    /// preset its shapes match). Without one, only the file's own mapping is checked.
    #[arg(long)]
    pub components: Option<String>,
}

pub fn list() -> anyhow::Result<()> {
    println!("| preset | family | source | download | gated | steps | guidance | T5 length | dtype (cpu) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for p in Preset::all() {
        let d = &p.defaults;
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            p.name,
            p.family,
            p.repo
                .clone()
                .unwrap_or_else(|| format!("models/{}", p.path.clone().unwrap_or_default())),
            p.download_gb
                .map_or("bundled".into(), |g| format!("{g:.1} GB")),
            if p.gated { "yes" } else { "no" },
            opt(d.steps.map(|s| s.to_string())),
            opt(d.guidance.map(|s| s.to_string())),
            opt(d.max_sequence_length.map(|s| s.to_string())),
            opt(d.dtype_cpu.clone()),
        );
    }
    Ok(())
}

pub fn fetch(a: FetchArgs) -> anyhow::Result<()> {
    let (model, preset) = presets::resolve(&a.model, a.revision.as_deref())?;
    if let Some(p) = &preset {
        eprintln!("{}: {} ({})", p.name, p.description, p.licence);
    }
    let spec = Spec::open(&model)?;
    let files = spec.fetch_all()?;
    let bytes: u64 = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    println!(
        "{}: {} files, {:.2} GB, ready",
        spec.name(),
        files.len(),
        bytes as f64 / 1e9
    );
    Ok(())
}

pub fn inspect(mut a: InspectArgs) -> anyhow::Result<()> {
    let model = a.model_flag.take().or(a.model.take());
    if let Some(l) = &a.lora {
        return inspect_lora(l, model.as_deref(), &a);
    }
    let Some(model) = model else {
        return Err(mmdit::Error::request(
            "inspect needs a model (a preset, folder, Hub repo or .safetensors file) or --lora FILE",
        )
        .into());
    };
    let a = InspectArgs {
        model: Some(model),
        ..a
    };
    let model = a.model.as_deref().unwrap_or_default();
    let p = Path::new(model);
    let mut problems = 0;
    let spec = if p.is_file() {
        let Some(single) = inspect_file(p, &mut problems)? else {
            return Ok(());
        };
        let comps = match &a.components {
            Some(c) => presets::resolve(c, None).map(|(m, _)| m),
            None => presets::default_preset(&single).map(|p| p.model_ref(None)),
        };
        let opened = comps.and_then(|c| {
            Spec::open(&mmdit::ModelRef::SingleFile {
                file: p.to_path_buf(),
                components: Some(Box::new(c)),
            })
        });
        match opened {
            Ok(spec) => spec,
            Err(e) => {
                println!("configs not checked: {}", e.render(&super::flag));
                return finish(problems);
            }
        }
    } else {
        if a.components.is_some() {
            return Err(mmdit::Error::request(
                "--components applies to single-file .safetensors checkpoints only",
            )
            .into());
        }
        let (model, _) = presets::resolve(model, a.revision.as_deref())?;
        let spec = Spec::open(&model)?;
        println!("model   {}", spec.name());
        println!("layout  diffusers (model_index.json)");
        spec
    };
    println!("variant {}", spec.variant());
    for c in spec.audit()? {
        let a = &c.audit;
        let dtypes: Vec<String> = a.dtypes.iter().map(|(d, n)| format!("{d} {n}")).collect();
        println!(
            "{:<15} {:>14} parameters  {:<2} file(s)  dtypes: {}",
            c.name,
            a.params,
            c.files.len(),
            dtypes.join(", ")
        );
        for (n, want) in &a.missing {
            println!("  missing     {n} {want:?}");
        }
        for (n, want, got) in &a.wrong_shape {
            println!("  wrong shape {n}: expected {want:?}, file has {got:?}");
        }
        for n in &a.unexpected {
            println!("  unexpected  {n}");
        }
        problems += a.missing.len() + a.wrong_shape.len() + a.unexpected.len();
    }
    finish(problems)
}

fn finish(problems: usize) -> anyhow::Result<()> {
    if problems > 0 {
        return Err(mmdit::Error::request(format!(
            "{problems} tensor problem(s) listed above; the weights do not match the configs: re-download the model"
        ))
        .into());
    }
    println!("all tensors match their configs");
    Ok(())
}

/// Header-only summary of one safetensors file: its format and, for a single-file checkpoint, the
/// detected variant, the components it holds and any tensor no component maps. Returns the mapping
/// of a single-file checkpoint.
fn inspect_file(
    p: &Path,
    problems: &mut usize,
) -> anyhow::Result<Option<mmdit::loader::single::SingleFile>> {
    let gguf = match mmdit::loader::single::is_gguf(p) {
        true => Some(mmdit::loader::gguf::GgufFile::open(p)?),
        false => None,
    };
    let headers = match &gguf {
        Some(g) => g.metas(),
        None => mmdit::loader::audit::read_headers(&[p.to_path_buf()])?,
    };
    let params: usize = headers
        .values()
        .map(|t| t.shape.iter().product::<usize>())
        .sum();
    let mut dtypes = std::collections::BTreeMap::new();
    for t in headers.values() {
        *dtypes.entry(t.dtype.clone()).or_insert(0usize) += 1;
    }
    println!("file    {}", p.display());
    println!(
        "tensors {} ({} parameters), dtypes {:?}",
        headers.len(),
        params,
        dtypes
    );
    if let Some(g) = &gguf {
        print_gguf(g);
    }
    let single = match mmdit::loader::single::SingleFile::open(p) {
        Ok(s) => s,
        Err(_) => {
            let has = |k: &str| headers.keys().any(|n| n.contains(k));
            let format = if has("transformer_blocks.") {
                "diffusers transformer weights (inspect its model folder instead)"
            } else if has("decoder.up.") || has("decoder.up_blocks.") {
                "VAE weights"
            } else {
                "unrecognised"
            };
            println!("format  {format}");
            return Ok(None);
        }
    };
    let d = &single.detected;
    println!(
        "format  {} single-file checkpoint{}",
        match d.format {
            mmdit::loader::single::Format::Sd3 => "SAI SD3/SD3.5",
            mmdit::loader::single::Format::Flux => "BFL FLUX.1",
            mmdit::loader::single::Format::Chroma => "Chroma",
            mmdit::loader::single::Format::Flux2 => "BFL FLUX.2",
        },
        if d.prefix.is_empty() {
            String::new()
        } else {
            format!(" (prefix `{}`)", d.prefix)
        }
    );
    match Preset::for_single_file(d) {
        Some(p) => println!("detected {}", p.name),
        None => println!("detected no released model's shapes (pass --components)"),
    }
    for (name, m) in &single.components {
        let n: usize = m
            .metas()
            .values()
            .map(|t| t.shape.iter().product::<usize>())
            .sum();
        let from = if m.files.len() > 1 {
            format!(" (from {})", m.files[1].display())
        } else {
            String::new()
        };
        println!("in file {name:<15} {n:>14} parameters{from}");
    }
    let unmapped = single.unmapped(&headers);
    for n in &unmapped {
        println!("  unexpected  {n}");
    }
    *problems += unmapped.len();
    Ok(Some(single))
}

/// A GGUF file's header: version, architecture, bytes per type, and the type of every group of
/// tensors (block numbers as `*`).
fn print_gguf(g: &mmdit::loader::gguf::GgufFile) {
    use mmdit::loader::gguf::type_name;
    use std::collections::BTreeMap;
    println!(
        "gguf    version {}, architecture {}",
        g.version,
        g.architecture().unwrap_or("(none: named by its tensors)")
    );
    let mut types: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
    let mut groups: BTreeMap<String, BTreeMap<&str, usize>> = BTreeMap::new();
    for (name, t) in &g.tensors {
        let ty = type_name(t.dtype);
        let e = types.entry(ty).or_default();
        e.0 += 1;
        e.1 += t.bytes;
        let group: Vec<&str> = name
            .split('.')
            .map(|p| if p.parse::<usize>().is_ok() { "*" } else { p })
            .collect();
        *groups
            .entry(group.join("."))
            .or_default()
            .entry(ty)
            .or_default() += 1;
    }
    let total: u64 = types.values().map(|t| t.1).sum();
    let list: Vec<String> = types
        .iter()
        .map(|(t, (n, b))| format!("{t} x{n} ({:.1} MB)", *b as f64 / 1e6))
        .collect();
    println!(
        "types   {} | {:.1} MB of tensor data",
        list.join(", "),
        total as f64 / 1e6
    );
    for (group, ts) in &groups {
        let ts: Vec<String> = ts.iter().map(|(t, n)| format!("{t} x{n}")).collect();
        println!("  {group:<58} {}", ts.join(", "));
    }
}

/// `inspect --lora FILE [--model M]`: what the file is, and with a model, what of it fits.
fn inspect_lora(source: &str, model: Option<&str>, a: &InspectArgs) -> anyhow::Result<()> {
    let spec = mmdit::lora::LoraSpec::parse(source)?;
    let path = spec.local_file()?;
    let file = mmdit::lora::LoraFile::read(&path)?;
    let ranks: Vec<String> = file.ranks().iter().map(|r| r.to_string()).collect();
    let alphas = file.modules.values().filter(|m| m.alpha.is_some()).count();
    let dora = match file
        .modules
        .values()
        .filter(|m| m.magnitude.is_some())
        .count()
    {
        0 => String::new(),
        n => format!("; {n} DoRA"),
    };
    println!("LoRA    {}", path.display());
    println!("format  {}", file.format.name());
    println!(
        "modules {} (rank {}; {} with alpha{dora}{})",
        file.modules.len(),
        ranks.join(", "),
        alphas,
        if file.adapter_metadata.is_some() {
            "; PEFT LoraConfig metadata"
        } else {
            ""
        }
    );
    let names = file.modules.keys().map(String::as_str);
    if let Some(f) = mmdit::lora::names::made_for(names) {
        println!("made for {f} (from its layer names)");
    }
    let Some(model) = model else {
        for (name, m) in &file.modules {
            let (o, i) = m.dims();
            println!("  {name}  rank {}  {o}x{i}", m.rank());
        }
        for k in &file.other {
            println!("  not a LoRA factor: {k}");
        }
        return Ok(());
    };
    let (mref, _) = presets::resolve_with(model, a.revision.as_deref(), a.components.as_deref())?;
    let spec_m = Spec::open(&mref)?;
    let fitted = mmdit::lora::fit(&file, &spec_m.model_layers()?)?;
    println!("model   {} ({})", spec_m.name(), spec_m.variant());
    let mut per: std::collections::BTreeMap<&str, usize> = Default::default();
    for (dir, _) in fitted.layers.keys() {
        *per.entry(dir.as_str()).or_default() += 1;
    }
    let touched: Vec<String> = per.iter().map(|(d, n)| format!("{d} {n}")).collect();
    println!("layers  {}", touched.join(", "));
    for ((dir, weight), pieces) in &fitted.layers {
        let layer = weight.strip_suffix(".weight").unwrap_or(weight);
        for p in pieces {
            println!(
                "  {dir}/{layer} <- {} (rank {}, scale {})",
                p.module,
                p.down.dims()[0],
                p.scale
            );
        }
    }
    println!("unmatched keys: {}", fitted.unmatched.len());
    for k in &fitted.unmatched {
        println!("  {k}");
    }
    Ok(())
}
