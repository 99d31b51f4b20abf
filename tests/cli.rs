//! The `mmdit` binary end to end on a fixture model.

mod common;

use common::{mmdit, tmp};
use std::path::Path;

/// `mmdit generate --model <fixture> --prompt "a red circle" --steps 2 <extra> --output <out>`.
fn generate(model: &str, extra: &[&str], out: &Path) -> std::process::Output {
    mmdit()
        .args(["generate", "--model"])
        .arg(common::fixture(model))
        .args(["--prompt", "a red circle", "--steps", "2"])
        .args(extra)
        .arg("--output")
        .arg(out)
        .output()
        .unwrap()
}

#[test]
fn generate_writes_a_png_of_the_requested_size_with_metadata() {
    let out = tmp("gen").join("img.png");
    let size = ["--width", "48", "--height", "32", "--seed", "7"];
    let st = generate("sd35-tiny", &size, &out);
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let (img, text) = mmdit::output::read_png(&out).unwrap();
    assert_eq!((img.width, img.height), (48, 32));
    let get = |k: &str| text.iter().find(|(a, _)| a == k).map(|(_, v)| v.clone());
    assert_eq!(get("prompt").as_deref(), Some("a red circle"));
    assert_eq!(get("seed").as_deref(), Some("7"));
    assert_eq!(get("steps").as_deref(), Some("2"));

    // Same seed, same image; and the existing file is not overwritten without --overwrite.
    let again = generate("sd35-tiny", &size, &out);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--overwrite"));
    let st = generate("sd35-tiny", &[&size[..], &["--overwrite"]].concat(), &out);
    assert!(st.status.success());
    assert_eq!(mmdit::output::read_png(&out).unwrap().0, img);
}

#[test]
fn bad_size_is_refused_before_loading_with_the_nearest_valid_sizes() {
    let out = tmp("size").join("img.png");
    let st = generate("sd35-tiny", &["--width", "50"], &out);
    let err = String::from_utf8_lossy(&st.stderr);
    assert_eq!(st.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--width 50") && err.contains("48 or 52"),
        "{err}"
    );
    assert!(!err.contains("panicked"));
    assert!(!out.exists());
}

#[test]
fn generate_runs_both_tiny_flux_variants() {
    let dir = tmp("flux");
    for (name, extra) in [
        ("flux-schnell-tiny", vec!["--guidance", "2"]),
        (
            "flux-dev-tiny",
            vec!["--negative-prompt", "blurry", "--true-cfg", "2"],
        ),
    ] {
        let out = dir.join(format!("{name}.png"));
        let size = ["--width", "40", "--height", "24", "--seed", "1"];
        let st = generate(name, &[&size[..], &extra].concat(), &out);
        let err = String::from_utf8_lossy(&st.stderr);
        assert!(st.status.success(), "{name}: {err}");
        let (img, _) = mmdit::output::read_png(&out).unwrap();
        assert_eq!((img.width, img.height), (40, 24), "{name}");
        if name == "flux-schnell-tiny" {
            assert!(err.contains("--guidance 2 is ignored"), "{err}");
        }
    }
}

/// The README's quickstart: the default model, its prompt, no warning.
#[test]
fn generate_defaults_to_the_embedded_demo_model() {
    let out = tmp("demo").join("demo.png");
    let st = mmdit()
        .args(["generate", "--prompt", "a red circle on a white background"])
        .args("--steps 4 --seed 1 --output".split(' '))
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&st.stderr);
    assert!(st.status.success(), "{err}");
    assert!(!err.contains("warning"), "{err}");
    let (img, text) = mmdit::output::read_png(&out).unwrap();
    assert_eq!((img.width, img.height), (64, 64));
    assert!(text.iter().any(|(k, v)| k == "model" && v == "demo"));
}

#[test]
fn models_lists_presets_and_inspect_checks_a_folder() {
    let o = mmdit().arg("models").output().unwrap();
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    for name in ["demo"].into_iter().chain(common::REAL_MODELS) {
        assert!(s.contains(&format!("| {name} |")), "{s}");
    }
    let o = mmdit()
        .arg("inspect")
        .arg(common::fixture("flux-dev-tiny"))
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{s}");
    assert!(
        s.contains("dev-like") && s.contains("all tensors match"),
        "{s}"
    );
}

#[test]
fn inspect_lists_bad_tensors_and_exits_non_zero() {
    let m = common::copy_fixture("sd3-dummy", "inspect-bad");
    let f = m.join("transformer/diffusion_pytorch_model.safetensors");
    let mut t = candle_core::safetensors::load(&f, &candle_core::Device::Cpu).unwrap();
    t.remove("proj_out.bias");
    t.insert(
        "stray.weight".into(),
        candle_core::Tensor::zeros(2, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
    );
    t.insert(
        "context_embedder.bias".into(),
        candle_core::Tensor::zeros(7, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, &f).unwrap();
    let o = mmdit().arg("inspect").arg(&m).output().unwrap();
    let s = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(2), "{s}");
    assert!(s.contains("missing     proj_out.bias"), "{s}");
    assert!(s.contains("unexpected  stray.weight"), "{s}");
    assert!(s.contains("wrong shape context_embedder.bias"), "{s}");
}

#[test]
fn the_output_format_follows_the_extension() {
    let dir = tmp("formats");
    for (name, format) in [
        ("a.jpg", image::ImageFormat::Jpeg),
        ("b.WEBP", image::ImageFormat::WebP),
        ("c.png", image::ImageFormat::Png),
    ] {
        let out = dir.join(name);
        let st = generate("sd35-tiny", &["--width", "48", "--height", "32"], &out);
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
        let reader = image::ImageReader::open(&out)
            .unwrap()
            .with_guessed_format()
            .unwrap();
        assert_eq!(reader.format(), Some(format), "{name}");
        let img = reader.decode().unwrap();
        assert_eq!((img.width(), img.height()), (48, 32), "{name}");
    }
    let out = dir.join("d.gif");
    let st = generate("sd35-tiny", &[], &out);
    assert_eq!(st.status.code(), Some(2));
    let err = String::from_utf8_lossy(&st.stderr);
    assert!(
        err.contains("--output") && err.contains("unknown image extension"),
        "{err}"
    );
    assert!(!out.exists());
}

/// `--preview-every 2` writes a preview of every second step's prediction beside the output, at
/// latent resolution; the last one looks like the image (the map is fitted to the demo's VAE).
#[test]
fn previews_are_written_every_n_steps() {
    let dir = common::tmp("cli-previews");
    let out = dir.join("out.png");
    let o = common::mmdit()
        .args([
            "generate",
            "--prompt",
            "a red circle on a white background",
            "--steps",
            "6",
            "--seed",
            "1",
            "--preview-every",
            "2",
            "--output",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let img = mmdit::output::read_png(&out).unwrap().0;
    for step in [2, 4, 6] {
        let p = dir.join(format!("out-preview-{step:03}.png"));
        let (pv, _) = mmdit::output::read_png(&p).unwrap();
        assert_eq!((pv.width, pv.height), (img.width / 4, img.height / 4));
    }
    assert!(!dir.join("out-preview-001.png").exists());
    // The last preview against the image's 4x4 block means.
    let pv = mmdit::output::read_png(&dir.join("out-preview-006.png"))
        .unwrap()
        .0;
    let mut se = 0f64;
    for i in 0..pv.height {
        for j in 0..pv.width {
            for k in 0..3 {
                let mut m = 0f64;
                for py in i * 4..i * 4 + 4 {
                    for px in j * 4..j * 4 + 4 {
                        m += img.data[(py * img.width + px) * 3 + k] as f64 / 16.0;
                    }
                }
                se += (m - pv.data[(i * pv.width + j) * 3 + k] as f64).powi(2);
            }
        }
    }
    let psnr = 10.0 * (255f64.powi(2) / (se / (pv.data.len() as f64))).log10();
    println!("preview PSNR {psnr:.1} dB");
    assert!(psnr >= 12.0, "{psnr}");
    let (code, err) = common::run(&[
        "generate".as_ref(),
        "--prompt".as_ref(),
        "x".as_ref(),
        "--preview-every".as_ref(),
        "0".as_ref(),
        "--output".as_ref(),
        dir.join("z.png").as_os_str(),
    ]);
    common::assert_clean_error(code, &err, &["--preview-every 0"]);
}
