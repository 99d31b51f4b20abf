//! Issue 8.12: a bounded, deterministic mutation fuzzer (a property test that runs in CI) over the
//! safetensors header check and config parsing + validation: no input may panic. Iterations per
//! target: `MMDIT_FUZZ_ITERS` (default 3000); longer local runs set it higher.

mod common;

use mmdit::config::{
    ClipTextConfig, FluxTransformerConfig, SchedulerConfig, Sd3TransformerConfig, T5Config,
    VaeConfig,
};
use std::path::Path;

/// xorshift64*: reproducible without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: &[&[u8]] = &[
    b"0",
    b"-1",
    b"1e309",
    b"18446744073709551615",
    b"4294967296",
    b"null",
    b"true",
    b"\"\"",
    b"[]",
    b"{}",
    b"1000000000",
    b"NaN",
    b"\"rms_norm\"",
    b"[0, 18446744073709551615]",
    b"\"F32\"",
    b"\"BF16\"",
    b"\"Q9\"",
];

/// One random edit: flip, insert, delete, splice an interesting token, or truncate.
fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(v.len() + 1);
        match rng.below(5) {
            0 if !v.is_empty() => {
                let i = at.min(v.len() - 1);
                v[i] ^= 1 << rng.below(8);
            }
            1 => v.insert(at, rng.next() as u8),
            2 if at < v.len() => {
                let end = (at + 1 + rng.below(8)).min(v.len());
                v.drain(at..end);
            }
            3 => {
                let tok = INTERESTING[rng.below(INTERESTING.len())];
                let end = (at + rng.below(12)).min(v.len());
                v.splice(at..end, tok.iter().copied());
            }
            _ => v.truncate(at),
        }
    }
    v
}

fn iters() -> usize {
    std::env::var("MMDIT_FUZZ_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000)
}

fn seeds(name: &str) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for fx in ["sd3-dummy", "sd35-tiny", "flux-dev-tiny"] {
        let p = common::fixture(fx).join(name);
        if let Ok(b) = std::fs::read(&p) {
            out.push((p.display().to_string(), b));
        }
    }
    out
}

fn run_config<T: serde::de::DeserializeOwned>(
    rel: &str,
    validate: fn(&T, &Path) -> mmdit::Result<()>,
) -> usize {
    let corpus = seeds(rel);
    assert!(!corpus.is_empty(), "no seed files for {rel}");
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ rel.len() as u64);
    let mut accepted = 0;
    for _ in 0..iters() {
        let (_, seed) = &corpus[rng.below(corpus.len())];
        let input = mutate(&mut rng, seed);
        let text = String::from_utf8_lossy(&input);
        if let Ok(cfg) = serde_json::from_str::<T>(&text) {
            if validate(&cfg, Path::new(rel)).is_ok() {
                accepted += 1;
            }
        }
    }
    accepted
}

#[test]
fn fuzz_config_parsing_never_panics() {
    let n = iters();
    let a = run_config::<Sd3TransformerConfig>("transformer/config.json", |c, p| c.validate(p));
    let b = run_config::<VaeConfig>("vae/config.json", |c, p| c.validate(p));
    let c = run_config::<SchedulerConfig>("scheduler/scheduler_config.json", |c, p| c.validate(p));
    let d = run_config::<ClipTextConfig>("text_encoder/config.json", |c, p| c.validate(p));
    let e = run_config::<T5Config>("text_encoder_3/config.json", |c, p| c.validate(p));
    println!("{n} inputs per config; accepted: transformer {a}, vae {b}, scheduler {c}, clip {d}, t5 {e}");
    let mut rng = Rng(7);
    let flux =
        std::fs::read(common::fixture("flux-dev-tiny").join("transformer/config.json")).unwrap();
    for _ in 0..n {
        let input = mutate(&mut rng, &flux);
        if let Ok(cfg) =
            serde_json::from_str::<FluxTransformerConfig>(&String::from_utf8_lossy(&input))
        {
            let _ = cfg.validate(Path::new("flux"));
        }
    }
}

#[test]
fn fuzz_safetensors_header_check_never_panics() {
    let seed =
        std::fs::read(common::fixture("sd3-dummy").join("vae/diffusion_pytorch_model.safetensors"))
            .unwrap();
    let n = u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize;
    let header = &seed[..8 + n];
    let mut rng = Rng(42);
    let mut ok = 0;
    for _ in 0..iters() {
        // Mutate the header region only (the data is opaque bytes), keep the data tail.
        let mut bytes = mutate(&mut rng, &header[8..]);
        let mut full = (bytes.len() as u64).to_le_bytes().to_vec();
        if rng.below(10) == 0 {
            full = rng.next().to_le_bytes().to_vec(); // a random length prefix
        }
        full.append(&mut bytes);
        full.extend_from_slice(&seed[8 + n..]);
        if mmdit::loader::weights::check_safetensors_bytes(&full, Path::new("fuzz.safetensors"))
            .is_ok()
        {
            ok += 1;
        }
    }
    println!("{} inputs, {ok} accepted", iters());
}

/// LoRA files as they come from the network: a mutated header (names, shapes, dtypes, offsets) is
/// read, grouped and fitted to a model without a panic.
#[test]
fn fuzz_lora_files_never_panic() {
    let seed = std::fs::read(common::fixture("lora").join("flux_kohya.safetensors")).unwrap();
    let n = u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize;
    let header = &seed[..8 + n];
    let spec = mmdit::Spec::open(
        &mmdit::ModelRef::parse(common::fixture("flux-dev-tiny").to_str().unwrap(), None).unwrap(),
    )
    .unwrap();
    let layers = spec.model_layers().unwrap();
    let mut rng = Rng(7);
    let (mut read, mut fitted) = (0, 0);
    for _ in 0..iters() / 3 {
        let mut bytes = mutate(&mut rng, &header[8..]);
        let mut full = (bytes.len() as u64).to_le_bytes().to_vec();
        full.append(&mut bytes);
        full.extend_from_slice(&seed[8 + n..]);
        if let Ok(f) = mmdit::lora::LoraFile::from_bytes(&full, Path::new("fuzz.safetensors")) {
            read += 1;
            if mmdit::lora::fit(&f, &layers).is_ok() {
                fitted += 1;
            }
        }
    }
    println!("{} inputs, {read} read, {fitted} fitted", iters() / 3);
}

/// Valid files with mutated contents: tensors renamed (block indices, roles, prefixes), reshaped
/// (same size, other shape), dropped, or given odd alphas; read and fitted without a panic.
#[test]
fn fuzz_lora_contents_never_panic() {
    use candle_core::{Device, Tensor};
    let path = common::fixture("lora").join("flux_kohya.safetensors");
    let base = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let mut keys: Vec<String> = base.keys().cloned().collect();
    keys.sort();
    let spec = mmdit::Spec::open(
        &mmdit::ModelRef::parse(common::fixture("flux-dev-tiny").to_str().unwrap(), None).unwrap(),
    )
    .unwrap();
    let layers = spec.model_layers().unwrap();
    let dir = common::tmp("fuzz-lora");
    let mut rng = Rng(11);
    let swaps = [
        ("lora_down", "lora_up"),
        ("_0_", "_7_"),
        ("lora_unet_", "lora_te2_"),
        ("lora_unet_", "diffusion_model."),
        ("lora_unet_", "lora_transformer_"),
        ("qkv", "proj"),
        ("linear1", "linear2"),
        (".lora_down.weight", ".hada_w1_a"),
    ];
    let (mut read, mut fitted) = (0, 0);
    let n = iters() / 20;
    for i in 0..n {
        let mut t = base.clone();
        for _ in 0..1 + rng.below(3) {
            let k = &keys[rng.below(keys.len())];
            let Some(v) = t.remove(k) else { continue };
            match rng.below(5) {
                0 => {
                    let (from, to) = swaps[rng.below(swaps.len())];
                    t.insert(k.replace(from, to), v);
                }
                1 => {
                    let dims = v.dims().to_vec();
                    let shape: Vec<usize> = match rng.below(3) {
                        0 => vec![v.elem_count()],
                        1 => dims.iter().rev().copied().collect(),
                        _ => [vec![1], dims].concat(),
                    };
                    t.insert(k.clone(), v.reshape(shape).unwrap());
                }
                2 => {}
                3 => {
                    let a = [0.0f32, -4.0, 1e30][rng.below(3)];
                    t.insert(k.clone(), Tensor::new(&[a], &Device::Cpu).unwrap());
                }
                _ => {
                    t.insert(k.clone(), v.zeros_like().unwrap());
                }
            }
        }
        let f = dir.join(format!("{i}.safetensors"));
        candle_core::safetensors::save(&t, &f).unwrap();
        if let Ok(file) = mmdit::lora::LoraFile::read(&f) {
            read += 1;
            if mmdit::lora::fit(&file, &layers).is_ok() {
                fitted += 1;
            }
        }
        std::fs::remove_file(&f).unwrap();
    }
    println!("{n} inputs, {read} read, {fitted} fitted");
}

/// GGUF files as they come from the network: a mutated small file (metadata with an
/// `orig_shape` array, tensors of several types) is opened and every tensor it lists read, whole
/// and by rows, without a panic.
#[test]
fn fuzz_gguf_files_never_panic() {
    use candle_core::quantized::gguf_file::{self, Value};
    use candle_core::quantized::{GgmlDType, QTensor};
    let dev = candle_core::Device::Cpu;
    let mut tensors = Vec::new();
    for (k, (t, cols)) in [
        (GgmlDType::F32, 8),
        (GgmlDType::BF16, 8),
        (GgmlDType::Q8_0, 64),
        (GgmlDType::Q4_0, 32),
        (GgmlDType::Q4K, 256),
        (GgmlDType::Q6K, 256),
    ]
    .into_iter()
    .enumerate()
    {
        let x = candle_core::Tensor::randn(0f32, 1.0, (2, cols), &dev).unwrap();
        tensors.push((
            format!("double_blocks.0.t{k}.weight"),
            QTensor::quantize(&x, t).unwrap(),
        ));
    }
    let arch = Value::String("flux".into());
    let orig = Value::Array(vec![Value::I32(4), Value::I32(4)]);
    let meta = [
        ("general.architecture", &arch),
        ("comfy.gguf.orig_shape.double_blocks.0.t0.weight", &orig),
    ];
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, q)| (n.as_str(), q)).collect();
    let mut seed = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut seed, &meta, &refs).unwrap();
    let seed = seed.into_inner();
    let dir = common::tmp("fuzz_gguf");
    let path = dir.join("f.gguf");
    let mut rng = Rng(7);
    let (mut opened, mut read) = (0, 0);
    for _ in 0..iters() {
        // Mostly the header (the first 600 bytes), sometimes anywhere.
        let cut = if rng.below(4) == 0 { seed.len() } else { 600 };
        let mut bytes = mutate(&mut rng, &seed[..cut]);
        bytes.extend_from_slice(&seed[cut..]);
        std::fs::write(&path, &bytes).unwrap();
        let Ok(g) = mmdit::loader::gguf::GgufFile::open(&path) else {
            continue;
        };
        opened += 1;
        for (k, t) in &g.tensors {
            if g.dequantized(k).is_ok() {
                read += 1;
            }
            let rows = t.shape[0];
            let _ = g.blocks(k, &[(rows / 2, rows - rows / 2), (0, rows / 2)]);
        }
    }
    println!("{} inputs, {opened} opened, {read} tensors read", iters());
    assert!(opened > 0, "no mutation kept the file readable");
}

/// Single-file headers as they come from the network: names and shapes of a FLUX.1 and an SD3
/// checkpoint with shapes emptied, zeroed or enlarged and names cut, mapped to the diffusers layout
/// and back without a panic.
#[test]
fn fuzz_single_file_mappings_never_panic() {
    use mmdit::loader::single::{original_layout, Format, SingleFile};
    let mut corpus = Vec::new();
    for (fx, f) in [
        ("flux-dev-tiny", "flux1-dev-tiny.safetensors"),
        ("sd3-dummy", "sd3_dummy.safetensors"),
    ] {
        let p = common::fixture("single").join(fx).join(f);
        corpus.push(mmdit::loader::audit::read_headers(&[p]).unwrap());
    }
    let mut rng = Rng(11);
    for _ in 0..iters() {
        let mut metas = corpus[rng.below(corpus.len())].clone();
        let keys: Vec<String> = metas.keys().cloned().collect();
        for _ in 0..1 + rng.below(6) {
            let k = &keys[rng.below(keys.len())];
            let Some(mut m) = metas.remove(k) else {
                continue;
            };
            let name = match rng.below(5) {
                0 => {
                    m.shape.clear();
                    k.clone()
                }
                1 => {
                    m.shape = vec![0, 0];
                    k.clone()
                }
                2 => {
                    m.shape = vec![rng.below(1 << 20) + 1];
                    k.clone()
                }
                3 => format!("{k}.scale_weight"),
                _ => k[..rng.below(k.len())].to_string(),
            };
            metas.insert(name, m);
        }
        let path = Path::new("fuzz.safetensors");
        if let Ok(s) = SingleFile::from_metas(path, &metas, None) {
            let _ = s.unmapped(&metas);
            for m in s.components.values() {
                let _ = m.metas();
            }
            if let Some(t) = s.component("transformer") {
                let _ = original_layout(s.detected.format, &t.metas());
            }
        }
        for f in [Format::Flux, Format::Sd3] {
            let _ = mmdit::loader::single::transformer_table(f, &metas, None);
        }
    }
}
