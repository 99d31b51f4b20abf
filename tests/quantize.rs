//! Weights quantized at load (`--quantize`, `Spec::set_quantize`): every recorded run of the tiny
//! FLUX.1 and SD3.5 fixtures with the transformer's layers in Q8_0 blocks (their widths are whole
//! blocks of 32; the K types' 256-value blocks do not fit them and fall back to a 32-value type, see
//! the unit tests in `nn::linear` and `nn::quant`), against diffusers' f32 image: at least 30 dB PSNR (the bf16 floor), and not equal
//! to our f32 image (the layers are quantized). A LoRA applies at run time on top.

mod common;

use candle_core::quantized::GgmlDType;
use candle_core::DType;
use common::*;
use mmdit::{ModelRef, Spec};

fn q8_images(name: &str, loras: &[mmdit::lora::LoraSpec]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let m = ModelRef::parse(fixture(name).to_str().unwrap(), None).unwrap();
    let mut spec = Spec::open(&m).unwrap();
    let plain = Spec::open(&m).unwrap().load(&device(), DType::F32).unwrap();
    spec.set_quantize(Some(GgmlDType::Q8_0));
    let mut q = spec.load(&device(), DType::F32).unwrap();
    let mut plain = plain;
    let meta = meta(name);
    let max_seq = meta["max_sequence_length"].as_u64().unwrap() as usize;
    let mut out = Vec::new();
    for run in meta["runs"].as_array().unwrap() {
        let req = mmdit::Request {
            loras: loras.to_vec(),
            ..fixture_request(name, run, max_seq)
        };
        let a = q.generate(&req, &mut |_| {}).unwrap().image.data;
        let b = plain.generate(&req, &mut |_| {}).unwrap().image.data;
        out.push((a, b));
    }
    out
}

#[test]
fn q8_0_transformer_stays_within_the_bf16_floor_of_diffusers() {
    for name in ["flux-dev-tiny", "sd35-tiny"] {
        let r = reference(name);
        for (k, (q, ours)) in q8_images(name, &[]).iter().enumerate() {
            let p = psnr(q, &reference_image(&r, k));
            println!("{name} run {k}: q8_0 image PSNR {p:.1} dB against diffusers f32");
            assert!(p >= 30.0, "{name} run {k}: {p:.1} dB");
            assert_ne!(q, ours, "{name} run {k}: nothing was quantized");
        }
    }
}

/// A LoRA on a quantized transformer (the run-time path) against the same LoRA on the f32
/// transformer: at least 30 dB.
#[test]
fn lora_applies_to_a_quantized_transformer() {
    let lora = mmdit::lora::LoraSpec {
        source: fixture("lora")
            .join("flux_kohya.safetensors")
            .display()
            .to_string(),
        scale: 1.0,
    };
    for (k, (q, ours)) in q8_images("flux-dev-tiny", &[lora]).iter().enumerate() {
        let p = psnr(q, ours);
        println!("run {k}: q8_0 + LoRA PSNR {p:.1} dB against f32 + LoRA");
        assert!(p >= 30.0, "run {k}: {p:.1} dB");
    }
}

fn generate(extra: &[&str], out: &std::path::Path) -> (Option<i32>, String) {
    let o = mmdit()
        .args([
            "generate",
            "--prompt",
            "a red circle",
            "--steps",
            "2",
            "--width",
            "32",
            "--height",
            "32",
        ])
        .args(["--seed", "4", "--model"])
        .arg(fixture("flux-dev-tiny"))
        .args(extra)
        .arg("--output")
        .arg(out)
        .output()
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn quantize_is_recorded_and_replayed() {
    let dir = tmp("quantize-replay");
    let (a, b) = (dir.join("q.png"), dir.join("again.png"));
    let (code, err) = generate(&["--quantize", "q8_0"], &a);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("(q8_0)"), "{err}");
    let (img, text) = mmdit::output::read_png(&a).unwrap();
    assert!(text.iter().any(|(k, v)| k == "quantize" && v == "q8_0"));
    let o = mmdit()
        .args(["generate", "--from"])
        .arg(&a)
        .arg("--output")
        .arg(&b)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(mmdit::output::read_png(&b).unwrap().0, img);
}

#[test]
fn quantize_type_unknown() {
    let out = tmp("quantize-unknown").join("out.png");
    let (code, err) = generate(&["--quantize", "iq2_xs"], &out);
    assert_clean_error(
        code,
        &err,
        &[
            "--quantize iq2_xs",
            "unknown",
            "q8_0",
            "IQ types are not supported",
        ],
    );
    assert_eq!(code, Some(2));
    assert!(!out.exists());
}
