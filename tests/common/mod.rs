//! Helpers shared by the integration tests: fixture paths and tensor comparisons.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

/// The repository root: `MMDIT_TEST_ROOT` when set (test binaries copied to a GPU machine by
/// scripts/gpu_check.sh), else the crate's folder.
pub fn root() -> PathBuf {
    std::env::var_os("MMDIT_TEST_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

pub fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

/// The device the parity tests run on: `MMDIT_TEST_DEVICE` (cpu, cuda, cuda:N, metal; default cpu).
pub fn device() -> Device {
    let name = std::env::var("MMDIT_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    mmdit::device::parse_device(&name).unwrap()
}

/// A fixture's reference tensors, on [`device`].
pub fn reference(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("reference.safetensors"), &device()).unwrap()
}

/// The released models whose shape manifests are in `tests/fixtures/manifests/`.
pub const REAL_MODELS: [&str; 13] = [
    "sd3-medium",
    "sd3.5-large",
    "sd3.5-large-turbo",
    "sd3.5-medium",
    "flux.1-schnell",
    "flux.1-dev",
    "flux.1-fill-dev",
    "flux.1-kontext-dev",
    "chroma1-hd",
    "chroma1-base",
    "flux.2-klein-4b",
    "flux.2-klein-9b",
    "flux.2-dev",
];

/// The original single-file layout of a real model.
pub fn real_format(model: &str) -> mmdit::loader::single::Format {
    use mmdit::loader::single::Format;
    if model.starts_with("flux.2") {
        Format::Flux2
    } else if model.starts_with("flux") {
        Format::Flux
    } else if model.starts_with("chroma") {
        Format::Chroma
    } else {
        Format::Sd3
    }
}

/// A JSON file's contents.
pub fn read_json(path: impl AsRef<std::path::Path>) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

pub fn meta(name: &str) -> serde_json::Value {
    read_json(fixture(name).join("fixture.json"))
}

/// max |a - b| and max |b|, both as f32.
pub fn max_diff(a: &Tensor, b: &Tensor) -> (f32, f32) {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    let max_abs = |t: Tensor| -> f32 { t.abs().unwrap().max_all().unwrap().to_scalar().unwrap() };
    (max_abs((a - &b).unwrap()), max_abs(b))
}

/// Asserts max |a - b| <= rel * max |b| and prints the measured error.
pub fn assert_close_rel(what: &str, a: &Tensor, b: &Tensor, rel: f32) {
    let (d, m) = max_diff(a, b);
    println!(
        "{what}: max abs diff {d:.3e}, max |ref| {m:.3e}, ratio {:.3e} (tolerance {rel:.0e})",
        d / m.max(1e-30)
    );
    assert!(d <= rel * m, "{what}: max abs diff {d} exceeds {rel} x {m}");
}

/// A fresh, empty temporary folder for one test.
pub fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mmdit-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Copies a fixture model folder into a temporary folder, to be damaged by a test.
pub fn copy_fixture(name: &str, test: &str) -> PathBuf {
    fn copy(from: &std::path::Path, to: &std::path::Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let t = to.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                copy(&e.path(), &t);
            } else {
                std::fs::copy(e.path(), t).unwrap();
            }
        }
    }
    let dst = tmp(test).join(name);
    copy(&fixture(name), &dst);
    dst
}

/// The `mmdit` binary.
pub fn mmdit() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_mmdit"))
}

/// `mmdit inspect FILE --components C`'s output, the run asserted successful.
pub fn inspect_ok(file: &std::path::Path, components: &std::path::Path) -> String {
    let o = mmdit()
        .arg("inspect")
        .arg(file)
        .arg("--components")
        .arg(components)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// Runs the binary and returns (exit code, stderr).
pub fn run(args: &[&std::ffi::OsStr]) -> (Option<i32>, String) {
    let o = mmdit().args(args).output().unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Asserts a failed run: non-zero exit, a one-line `error:` message containing every `needle`,
/// no panic or backtrace.
pub fn assert_clean_error(code: Option<i32>, stderr: &str, needles: &[&str]) {
    assert!(
        matches!(code, Some(c) if c != 0),
        "expected failure, got {code:?}: {stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("stack backtrace"),
        "{stderr}"
    );
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "expected one error line: {stderr}");
    for n in needles {
        assert!(
            errors[0].contains(n),
            "error line lacks {n:?}: {}",
            errors[0]
        );
    }
}

/// The request of a fixture's recorded run (`fixture.json` "runs"), with its saved noise.
pub fn fixture_request(name: &str, run: &serde_json::Value, max_seq: usize) -> mmdit::Request {
    let noise = candle_core::safetensors::load(
        fixture(name).join(run["noise"].as_str().unwrap()),
        &Device::Cpu,
    )
    .unwrap()
    .remove("noise")
    .unwrap();
    let size = |k: &str| run[k].as_u64().map(|v| v as usize);
    mmdit::Request {
        prompt: run["prompt"].as_str().unwrap().into(),
        negative_prompt: run["negative_prompt"].as_str().map(Into::into),
        true_cfg: run["true_cfg"].as_f64(),
        steps: Some(run["steps"].as_u64().unwrap() as usize),
        guidance: run["guidance"].as_f64(),
        width: size("width"),
        height: size("height"),
        noise: Some(noise),
        max_sequence_length: Some(max_seq),
        seed: None,
        sampler: None,
        ..Default::default()
    }
}

/// Peak signal-to-noise ratio of two 8-bit images, in dB (infinite when equal).
pub fn psnr(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len(), "image sizes differ");
    let mse = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    10.0 * (255.0f64 * 255.0 / mse).log10()
}

/// Runs every recorded run of a fixture model in bf16 on [`device`] and returns the PSNR of each
/// image against diffusers' f32 image.
pub fn bf16_psnr(name: &str) -> Vec<f64> {
    bf16_psnr_of(&fixture(name), name)
}

/// [`bf16_psnr`] of the model in `model` against the runs recorded in fixture `name`.
pub fn bf16_psnr_of(model: &std::path::Path, name: &str) -> Vec<f64> {
    let m = mmdit::ModelRef::parse(model.to_str().unwrap(), None).unwrap();
    let mut pipe = mmdit::Spec::open(&m)
        .unwrap()
        .load(&device(), DType::BF16)
        .unwrap();
    let r = reference(name);
    let meta = meta(name);
    let max_seq = meta["max_sequence_length"].as_u64().unwrap() as usize;
    let mut out = Vec::new();
    for (k, run) in meta["runs"].as_array().unwrap().iter().enumerate() {
        let req = fixture_request(name, run, max_seq);
        let got = pipe.generate(&req, &mut |_| {}).unwrap();
        let p = psnr(&got.image.data, &reference_image(&r, k));
        println!("{name} run {k}: bf16 image PSNR {p:.1} dB against diffusers f32");
        out.push(p);
    }
    out
}

/// The 8-bit image of recorded run `k` in a fixture's reference tensors.
pub fn reference_image(r: &HashMap<String, Tensor>, k: usize) -> Vec<u8> {
    r[&format!("run.{k}.image")]
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap()
}

/// Largest per-byte difference of two 8-bit images of the same size.
pub fn max_u8_diff(a: &[u8], b: &[u8]) -> u8 {
    assert_eq!(a.len(), b.len(), "image sizes differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

/// A shape manifest's tensor list (`[{"name", "shape", "dtype"}]`) as header entries.
pub fn manifest_tensors(
    list: &serde_json::Value,
) -> std::collections::BTreeMap<String, mmdit::loader::audit::TensorMeta> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let shape = t["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            let dtype = t["dtype"].as_str().unwrap().to_string();
            let meta = mmdit::loader::audit::TensorMeta { shape, dtype };
            (t["name"].as_str().unwrap().to_string(), meta)
        })
        .collect()
}

/// `mmdit generate --model demo --overwrite --output OUT ARGS`, asserted successful.
pub fn run_demo(out: &std::path::Path, args: &[&str]) {
    let o = mmdit()
        .args(["generate", "--model", "demo", "--overwrite", "--output"])
        .arg(out)
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// [`run_demo`] for one image: its pixels.
pub fn generate_demo(out: &std::path::Path, args: &[&str]) -> Vec<u8> {
    run_demo(out, args);
    mmdit::output::read_png(out).unwrap().0.data
}
