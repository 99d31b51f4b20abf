//! Issue 8: bad input, damaged files and faults give one clear error line, a non-zero exit, no panic
//! and no output file. Each case is a named test.

mod common;

use common::*;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// `generate` on `model` writing into a fresh folder; returns (code, stderr, output path).
fn generate(model: &Path, extra: &[&str], test: &str) -> (Option<i32>, String, PathBuf) {
    let out = tmp(&format!("{test}-out")).join("img.png");
    let mut args: Vec<&OsStr> = vec![
        OsStr::new("generate"),
        OsStr::new("--model"),
        model.as_os_str(),
    ];
    args.extend([OsStr::new("--prompt"), OsStr::new("a red circle")]);
    if !extra.contains(&"--steps") {
        args.extend([OsStr::new("--steps"), OsStr::new("1")]);
    }
    args.extend(extra.iter().map(OsStr::new));
    args.extend([OsStr::new("--output"), out.as_os_str()]);
    let (code, err) = run(&args);
    (code, err, out)
}

fn expect_error(model: &Path, extra: &[&str], test: &str, needles: &[&str]) {
    let (code, err, out) = generate(model, extra, test);
    assert_clean_error(code, &err, needles);
    assert!(!out.exists(), "{test}: an output file was written");
}

fn dummy() -> PathBuf {
    fixture("sd3-dummy")
}

// ---- 1. damaged safetensors --------------------------------------------------------------------

fn safetensors_bytes(header: &str, data: usize) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend(std::iter::repeat_n(0u8, data));
    v
}

fn with_bad_transformer(test: &str, bytes: Vec<u8>) {
    let m = copy_fixture("sd3-dummy", test);
    let f = m.join("transformer/diffusion_pytorch_model.safetensors");
    std::fs::write(&f, bytes).unwrap();
    expect_error(
        &m,
        &[],
        test,
        &["diffusion_pytorch_model.safetensors", "download it again"],
    );
}

#[test]
fn safetensors_truncated() {
    let m = copy_fixture("sd3-dummy", "trunc");
    let f = m.join("transformer/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    expect_error(
        &m,
        &[],
        "trunc",
        &["diffusion_pytorch_model.safetensors", "download it again"],
    );
}

#[test]
fn safetensors_header_length_absurd() {
    let mut v = u64::MAX.to_le_bytes().to_vec();
    v.extend_from_slice(b"{}");
    with_bad_transformer("hdr-max", v);
}

#[test]
fn safetensors_header_length_past_end() {
    let mut v = 1000u64.to_le_bytes().to_vec();
    v.extend_from_slice(b"{}");
    with_bad_transformer("hdr-past", v);
}

#[test]
fn safetensors_invalid_json() {
    with_bad_transformer("json", safetensors_bytes("{\"a\": [1, 2", 0));
}

#[test]
fn safetensors_overlapping_offsets() {
    let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
    with_bad_transformer("overlap", safetensors_bytes(h, 12));
}

#[test]
fn safetensors_shape_does_not_match_byte_span() {
    let h = r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
    with_bad_transformer("span", safetensors_bytes(h, 8));
}

#[test]
fn safetensors_unknown_dtype() {
    let h = r#"{"a":{"dtype":"Q7","shape":[2],"data_offsets":[0,8]}}"#;
    with_bad_transformer("dtype", safetensors_bytes(h, 8));
}

// ---- 2. configs --------------------------------------------------------------------------------

fn with_config(test: &str, rel: &str, edit: impl FnOnce(&mut serde_json::Value), needles: &[&str]) {
    let m = copy_fixture("sd3-dummy", test);
    let f = m.join(rel);
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&f, v.to_string()).unwrap();
    expect_error(&m, &[], test, needles);
}

#[test]
fn config_missing_field() {
    with_config(
        "cfg-missing",
        "text_encoder/config.json",
        |v| {
            v.as_object_mut().unwrap().remove("hidden_size");
        },
        &["text_encoder/config.json", "hidden_size"],
    );
}

#[test]
fn config_wrong_type() {
    with_config(
        "cfg-type",
        "transformer/config.json",
        |v| v["num_layers"] = "many".into(),
        &["transformer/config.json", "invalid type"],
    );
}

#[test]
fn config_absurd_layer_count() {
    with_config(
        "cfg-layers",
        "transformer/config.json",
        |v| v["num_layers"] = 1_000_000_000.into(),
        &["num_layers", "1000000000"],
    );
}

#[test]
fn config_heads_not_dividing_width() {
    with_config(
        "cfg-heads",
        "text_encoder_2/config.json",
        |v| v["num_attention_heads"] = 5.into(),
        &["num_attention_heads", "does not divide"],
    );
}

#[test]
fn config_zero_channels() {
    with_config(
        "cfg-zero",
        "vae/config.json",
        |v| v["latent_channels"] = 0.into(),
        &["latent_channels"],
    );
}

#[test]
fn scheduler_config_absurd_shift() {
    with_config(
        "cfg-shift",
        "scheduler/scheduler_config.json",
        |v| v["shift"] = (-2.0).into(),
        &["scheduler_config.json", "shift"],
    );
}

#[test]
fn model_index_unknown_pipeline() {
    with_config(
        "cfg-index",
        "model_index.json",
        |v| v["_class_name"] = "StableDiffusionXLPipeline".into(),
        &["StableDiffusionXLPipeline", "not supported"],
    );
}

// ---- 3. tensors --------------------------------------------------------------------------------

fn rewrite_tensors(
    m: &Path,
    rel: &str,
    edit: impl FnOnce(&mut std::collections::HashMap<String, candle_core::Tensor>),
) {
    let f = m.join(rel);
    let mut t = candle_core::safetensors::load(&f, &candle_core::Device::Cpu).unwrap();
    edit(&mut t);
    candle_core::safetensors::save(&t, &f).unwrap();
}

#[test]
fn tensor_of_wrong_shape_names_both_shapes() {
    let m = copy_fixture("sd3-dummy", "shape");
    rewrite_tensors(&m, "transformer/diffusion_pytorch_model.safetensors", |t| {
        t.insert(
            "proj_out.bias".into(),
            candle_core::Tensor::zeros(5, candle_core::DType::F32, &candle_core::Device::Cpu)
                .unwrap(),
        );
    });
    expect_error(&m, &[], "shape", &["proj_out.bias", "[4]", "[5]"]);
}

#[test]
fn tensor_missing_is_named() {
    let m = copy_fixture("sd3-dummy", "missing");
    rewrite_tensors(&m, "vae/diffusion_pytorch_model.safetensors", |t| {
        t.remove("decoder.conv_out.weight");
    });
    expect_error(&m, &[], "missing", &["decoder.conv_out.weight", "missing"]);
}

// ---- 4. pickle ---------------------------------------------------------------------------------

#[test]
fn pickle_checkpoint_refused() {
    let m = copy_fixture("sd3-dummy", "pickle");
    let dir = m.join("transformer");
    std::fs::remove_file(dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::write(dir.join("diffusion_pytorch_model.bin"), b"\x80\x04pickle").unwrap();
    expect_error(&m, &[], "pickle", &["pickle", "safetensors"]);
}

// ---- 5. index paths and symlinks ---------------------------------------------------------------

fn with_index(test: &str, shard: &str) {
    let m = copy_fixture("sd3-dummy", test);
    let dir = m.join("transformer");
    std::fs::remove_file(dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    let idx = serde_json::json!({"metadata": {}, "weight_map": {"proj_out.bias": shard}});
    std::fs::write(
        dir.join("diffusion_pytorch_model.safetensors.index.json"),
        idx.to_string(),
    )
    .unwrap();
    expect_error(&m, &[], test, &["outside the model folder"]);
}

#[test]
fn index_with_parent_path_refused() {
    with_index("idx-parent", "../vae/diffusion_pytorch_model.safetensors");
}

#[test]
fn index_with_absolute_path_refused() {
    with_index("idx-abs", "/etc/passwd");
}

#[cfg(unix)]
#[test]
fn symlink_outside_model_folder_refused() {
    let m = copy_fixture("sd3-dummy", "symlink");
    let f = m.join("transformer/diffusion_pytorch_model.safetensors");
    let outside = tmp("symlink-target").join("w.safetensors");
    std::fs::rename(&f, &outside).unwrap();
    std::os::unix::fs::symlink(&outside, &f).unwrap();
    expect_error(
        &m,
        &[],
        "symlink",
        &["symbolic link", "outside the model folder"],
    );
}

// ---- 6. user input -----------------------------------------------------------------------------

#[test]
fn width_zero() {
    expect_error(&dummy(), &["--width", "0"], "w0", &["--width 0"]);
}

#[test]
fn height_not_a_multiple() {
    let m = fixture("sd35-tiny");
    expect_error(&m, &["--height", "30"], "h30", &["--height 30", "28 or 32"]);
}

#[test]
fn size_beyond_position_table() {
    // sd35-tiny: 16 x 16 patches of 2 latents of 2 pixels -> at most 64 pixels
    expect_error(
        &fixture("sd35-tiny"),
        &["--width", "68"],
        "wbig",
        &["--width 68", "at most 64"],
    );
}

#[test]
fn size_beyond_pixel_cap() {
    expect_error(
        &fixture("flux-dummy"),
        &["--width", "8192", "--height", "8192"],
        "cap",
        &["8192"],
    );
}

#[test]
fn steps_zero_and_too_many() {
    expect_error(&dummy(), &["--steps", "0"], "s0", &["--steps 0"]);
    expect_error(&dummy(), &["--steps", "1001"], "s1001", &["--steps 1001"]);
}

#[test]
fn guidance_not_finite_or_negative() {
    expect_error(
        &dummy(),
        &["--guidance", "NaN"],
        "gnan",
        &["--guidance NaN"],
    );
    expect_error(&dummy(), &["--guidance=-1"], "gneg", &["--guidance -1"]);
}

/// `--noise` files: each problem named with the flag and the file, before any model work; a NaN
/// is refused at load instead of surfacing steps later as the model's overflow.
#[test]
fn noise_file_problems_are_named() {
    use candle_core::{DType, Device, Tensor};
    let dir = tmp("noise-files");
    let save = |name: &str, key: &str, t: Tensor| {
        let f = dir.join(name);
        candle_core::safetensors::save(&std::collections::HashMap::from([(key, t)]), &f).unwrap();
        f
    };
    let text = dir.join("notes.txt");
    std::fs::write(&text, "not a tensor file").unwrap();
    let other = save(
        "other.safetensors",
        "latents",
        Tensor::zeros((1, 4, 32, 32), DType::F32, &Device::Cpu).unwrap(),
    );
    let mut values = vec![0.5f32; 4 * 32 * 32];
    values[7] = f32::NAN;
    let nan = save(
        "nan.safetensors",
        "noise",
        Tensor::from_vec(values, (1, 4, 32, 32), &Device::Cpu).unwrap(),
    );
    let cases: [(&Path, &str, &[&str]); 4] = [
        (
            &text,
            "ntext",
            &["--noise", "notes.txt", "invalid safetensors"],
        ),
        (&dir, "ndir", &["--noise", "is not a file"]),
        (&other, "nkey", &["--noise", "no tensor named `noise`"]),
        (&nan, "nnan", &["--noise", "NaN at index 7", "not finite"]),
    ];
    for (file, test, needles) in cases {
        let f = file.to_str().unwrap();
        expect_error(&dummy(), &["--noise", f], test, needles);
    }
}

#[test]
fn unknown_sampler_device_dtype() {
    expect_error(
        &dummy(),
        &["--sampler", "ddim"],
        "sampler",
        &["--sampler ddim", "euler"],
    );
    expect_error(
        &dummy(),
        &["--device", "tpu"],
        "device",
        &["--device tpu", "cpu"],
    );
    expect_error(
        &dummy(),
        &["--dtype", "f8"],
        "dtype",
        &["--dtype f8", "bf16"],
    );
}

#[test]
fn bad_cache_specs_are_named() {
    for (spec, says) in [
        ("deepcache:0.1", "unknown cache"),
        ("fbcache:nan", "must be a number of at least 0"),
        ("fbcache:-0.2", "must be a number of at least 0"),
        ("teacache:NaN", "must be a number of at least 0"),
        ("taylorseer:0:4", "order 0 must be between 1 and 4"),
        ("taylorseer:5:4", "order 5 must be between 1 and 4"),
        ("taylorseer:1:0", "interval 0"),
        ("fbcache:0.1:1:2", "too many numbers"),
    ] {
        expect_error(
            &dummy(),
            &["--cache", spec],
            "cache",
            &[&format!("--cache {spec}"), says],
        );
    }
    // bench checks every listed cache before loading the model.
    let (code, err) = run(&[
        OsStr::new("bench"),
        OsStr::new("--model"),
        dummy().as_os_str(),
        OsStr::new("--cache"),
        OsStr::new("none,taylorseer:9:2"),
    ]);
    assert_clean_error(code, &err, &["--cache taylorseer:9:2", "between 1 and 4"]);
}

/// A cache that cannot skip a call in so few steps runs, and says so.
#[test]
fn a_cache_on_a_two_step_run_says_it_has_no_effect() {
    for steps in ["1", "2"] {
        let (code, err, out) = generate(
            &dummy(),
            &["--steps", steps, "--cache", "fbcache:0.1"],
            &format!("cache-short-{steps}"),
        );
        assert_eq!(code, Some(0), "{err}");
        assert!(out.exists());
        assert!(
            err.contains(&format!(
                "notice: --cache fbcache:0.1:1 has no effect on a {steps}-step run"
            )),
            "{err}"
        );
    }
}

#[test]
fn missing_model_folder_or_bad_repo_id() {
    expect_error(
        Path::new("/nonexistent/model"),
        &[],
        "nomodel",
        &["no such folder"],
    );
}

// ---- 7. prompts --------------------------------------------------------------------------------

#[test]
fn empty_and_unicode_prompts_work_and_long_prompts_warn() {
    let m = fixture("sd3-dummy");
    for (i, p) in ["", "café 🐱 ✨ 東京"].iter().enumerate() {
        let out = tmp(&format!("prompt{i}")).join("p.png");
        let o = mmdit()
            .args(["generate", "--steps", "1", "--prompt", p, "--model"])
            .arg(&m)
            .arg("--output")
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let long = "a photo of a cat sitting on a red sofa, ".repeat(12);
    let out = tmp("long").join("p.png");
    let o = mmdit()
        .args([
            "generate",
            "--steps",
            "1",
            "--max-sequence-length",
            "16",
            "--prompt",
            &long,
            "--model",
        ])
        .arg(&m)
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("prompt too long for CLIP-L (77 tokens)")
            && err.contains("tokens were dropped"),
        "{err}"
    );
    assert!(err.contains("prompt too long for T5 (16 tokens)"), "{err}");
}

// ---- 8. output ---------------------------------------------------------------------------------

fn generate_to(out: &Path, extra: &[&str]) -> (Option<i32>, String) {
    let mut args: Vec<&OsStr> = vec![
        OsStr::new("generate"),
        OsStr::new("--model"),
        fixture("sd3-dummy").into_os_string().leak(),
    ];
    args.extend(["--prompt", "x", "--steps", "1", "--output"].map(OsStr::new));
    args.push(out.as_os_str());
    args.extend(extra.iter().map(OsStr::new));
    run(&args)
}

#[test]
fn existing_output_not_overwritten() {
    let out = tmp("exists").join("a.png");
    std::fs::write(&out, b"keep").unwrap();
    let (code, err) = generate_to(&out, &[]);
    assert_clean_error(code, &err, &["already exists", "--overwrite"]);
    assert_eq!(std::fs::read(&out).unwrap(), b"keep");
}

#[test]
fn missing_output_folder() {
    let out = tmp("nodir").join("no/such/dir/a.png");
    let (code, err) = generate_to(&out, &[]);
    assert_clean_error(code, &err, &["does not exist"]);
}

#[cfg(unix)]
#[test]
fn read_only_output_folder() {
    use std::os::unix::fs::PermissionsExt;
    let d = tmp("ro");
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o555)).unwrap();
    let (code, err) = generate_to(&d.join("a.png"), &[]);
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_clean_error(code, &err, &["read-only"]);
    assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0);
}

#[cfg(unix)]
#[test]
fn symlinked_output_path() {
    let d = tmp("outlink");
    let target = d.join("target.png");
    std::fs::write(&target, b"t").unwrap();
    std::os::unix::fs::symlink(&target, d.join("link.png")).unwrap();
    let (code, err) = generate_to(&d.join("link.png"), &["--overwrite"]);
    assert_clean_error(code, &err, &["symbolic link"]);
    assert_eq!(std::fs::read(&target).unwrap(), b"t");
}

// ---- 9. non-finite values ----------------------------------------------------------------------

#[test]
fn f16_overflow_is_caught_at_the_step_with_a_dtype_hint() {
    // Scale the output projection so the velocity is ~1e6: finite in f32, infinite in f16.
    let m = copy_fixture("sd3-dummy", "overflow");
    rewrite_tensors(&m, "transformer/diffusion_pytorch_model.safetensors", |t| {
        let w = t["proj_out.weight"].clone();
        t.insert("proj_out.weight".into(), (w * 1e6).unwrap());
    });
    let (code, err, out) = generate(&m, &["--dtype", "f16"], "overflow");
    assert_clean_error(code, &err, &["non-finite", "step 1", "--dtype bf16", "f32"]);
    assert!(!out.exists());
}

// ---- 10. devices not compiled in ---------------------------------------------------------------

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_device_in_a_cpu_build_names_the_feature() {
    expect_error(
        &dummy(),
        &["--device", "cuda"],
        "cuda",
        &["--features cuda"],
    );
}

#[cfg(not(feature = "metal"))]
#[test]
fn metal_device_in_a_cpu_build_names_the_feature() {
    expect_error(
        &dummy(),
        &["--device", "metal"],
        "metal",
        &["--features metal"],
    );
}

// ---- 11. Ctrl-C --------------------------------------------------------------------------------

#[cfg(unix)]
#[test]
fn ctrl_c_stops_cleanly_with_exit_130_and_no_file() {
    let out = tmp("sigint").join("a.png");
    let child = mmdit()
        .args(["generate", "--prompt", "x", "--steps", "1000", "--model"])
        .arg(dummy())
        .arg("--output")
        .arg(&out)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Let it load and start sampling, then interrupt.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let st = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    assert!(!out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(out.parent().unwrap()).unwrap().collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

// ---- 13. metadata and replay -------------------------------------------------------------------

#[test]
fn from_png_replays_bit_for_bit() {
    let d = tmp("replay");
    let first = d.join("first.png");
    let o = mmdit()
        .args(["generate", "--prompt", "a blue square"])
        .args("--steps 3 --guidance 4.5 --sampler heun --width 40 --height 32".split(' '))
        .arg("--model")
        .arg(fixture("sd35-tiny"))
        .arg("--output")
        .arg(&first)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let second = d.join("second.png");
    let o = mmdit()
        .args(["generate", "--from"])
        .arg(&first)
        .arg("--output")
        .arg(&second)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (a, ta) = mmdit::output::read_png(&first).unwrap();
    let (b, tb) = mmdit::output::read_png(&second).unwrap();
    assert_eq!(a, b, "replayed image differs");
    assert_eq!(ta, tb);
    for k in [
        "prompt",
        "negative_prompt",
        "seed",
        "steps",
        "sampler",
        "guidance",
        "width",
        "height",
        "model",
        "dtype",
        "mmdit_version",
    ] {
        assert!(ta.iter().any(|(key, _)| key == k), "missing {k}");
    }
}

#[test]
fn from_a_png_without_parameters_is_refused() {
    let d = tmp("from-bad");
    let p = d.join("plain.png");
    mmdit::output::write_png(
        &p,
        &mmdit::RgbImage {
            width: 1,
            height: 1,
            data: vec![0, 0, 0],
        },
        &[],
    )
    .unwrap();
    let (code, err) = run(&[
        OsStr::new("generate"),
        OsStr::new("--from"),
        p.as_os_str(),
        OsStr::new("--output"),
        d.join("o.png").as_os_str(),
    ]);
    assert_clean_error(code, &err, &["no mmdit generation parameters"]);
}

#[test]
fn a_prompt_longer_than_64_kib_is_refused() {
    let long = "a".repeat(70_000);
    let (code, err) = run(&["generate".as_ref(), "--prompt".as_ref(), long.as_ref()]);
    assert_clean_error(
        code,
        &err,
        &["--prompt of 70000 bytes is longer than accepted (at most 65536)"],
    );
}

// ---- 14. Chroma ----------------------------------------------------------------------------------

/// A copy of fixture `name` whose `text_encoder` folder holds the files of `src` instead.
fn with_text_encoder_of(name: &str, test: &str, src: &Path) -> PathBuf {
    let m = copy_fixture(name, test);
    std::fs::remove_dir_all(m.join("text_encoder")).unwrap();
    std::fs::create_dir_all(m.join("text_encoder")).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, m.join("text_encoder").join(p.file_name().unwrap())).unwrap();
    }
    m
}

/// Chroma's `--guidance` is already true CFG: FLUX.1's `--true-cfg` is refused and says so.
#[test]
fn chroma_refuses_flux_true_cfg_naming_guidance() {
    expect_error(
        &fixture("chroma-tiny"),
        &["--true-cfg", "3", "--negative-prompt", "blurry"],
        "chroma-true-cfg",
        &[
            "Chroma",
            "--true-cfg is FLUX.1's",
            "--guidance",
            "drop --true-cfg",
        ],
    );
}

/// Another model's text encoder in Chroma's T5 folder is named as such, not by a missing field.
#[test]
fn chroma_with_a_clip_in_its_t5_folder() {
    let m = with_text_encoder_of(
        "chroma-tiny",
        "chroma-clip-t5",
        &fixture("flux-dev-tiny").join("text_encoder"),
    );
    expect_error(
        &m,
        &[],
        "chroma-clip-t5",
        &[
            "text_encoder/config.json",
            "`clip_text_model`",
            "T5 encoder",
        ],
    );
}

/// A T5 of another width than the transformer's `joint_attention_dim`.
#[test]
fn chroma_with_a_t5_of_another_width() {
    let m = with_text_encoder_of(
        "chroma-tiny",
        "chroma-t5-width",
        &fixture("sd35-tiny").join("text_encoder_3"),
    );
    expect_error(
        &m,
        &[],
        "chroma-t5-width",
        &["T5 width 64", "joint_attention_dim 32"],
    );
}

/// The size and step checks every family has.
#[test]
fn chroma_checks_sizes_and_steps() {
    let m = fixture("chroma-tiny");
    expect_error(&m, &["--width", "30"], "chroma-width", &["--width 30"]);
    expect_error(&m, &["--steps", "0"], "chroma-steps", &["--steps"]);
    expect_error(
        &m,
        &["--max-sequence-length", "600"],
        "chroma-t5-len",
        &["--max-sequence-length 600"],
    );
}

// ---- 15. FLUX.2 ----------------------------------------------------------------------------------

/// Another model's text encoder in FLUX.2 [klein]'s Qwen3 folder is named as such.
#[test]
fn flux2_with_a_t5_in_its_qwen3_folder() {
    let m = with_text_encoder_of(
        "flux2-klein-tiny",
        "flux2-t5-qwen",
        &fixture("chroma-tiny").join("text_encoder"),
    );
    expect_error(
        &m,
        &[],
        "flux2-t5-qwen",
        &["text_encoder/config.json", "`t5`", "Qwen3"],
    );
}

/// FLUX.2 [dev]'s Mistral 3 folder holding [klein]'s Qwen3 (and the reverse) is named as such.
#[test]
fn flux2_dev_and_klein_text_encoders_are_not_swapped() {
    let m = with_text_encoder_of(
        "flux2-dev-tiny",
        "flux2-dev-qwen",
        &fixture("flux2-klein-tiny").join("text_encoder"),
    );
    expect_error(
        &m,
        &[],
        "flux2-dev-qwen",
        &["text_encoder/config.json", "`qwen3`", "Mistral 3"],
    );
    let m = with_text_encoder_of(
        "flux2-klein-tiny",
        "flux2-klein-mistral",
        &fixture("flux2-dev-tiny").join("text_encoder"),
    );
    expect_error(
        &m,
        &[],
        "flux2-klein-mistral",
        &["text_encoder/config.json", "`mistral3`", "Qwen3"],
    );
}

/// FLUX.2 [dev] refuses FLUX.1's `--true-cfg` and says a negative prompt is not used.
#[test]
fn flux2_dev_refuses_true_cfg_and_ignores_a_negative_prompt() {
    let m = fixture("flux2-dev-tiny");
    expect_error(
        &m,
        &["--true-cfg", "2", "--negative-prompt", "x"],
        "flux2-dev-true-cfg",
        &["FLUX.2 [dev]", "--true-cfg is FLUX.1's", "--guidance"],
    );
    let (code, err, out) = generate(&m, &["--negative-prompt", "blurry"], "flux2-dev-neg");
    assert_eq!(code, Some(0), "{err}");
    assert!(out.exists());
    assert!(
        err.contains("notice: --negative-prompt is ignored") && err.contains("guidance embedding"),
        "{err}"
    );
}

/// FLUX.1's `--true-cfg`, references FLUX.2 cannot take, and an edit's strength and mask are
/// refused by name; several images on a one-image model too.
#[test]
fn flux2_refuses_true_cfg_and_bad_reference_images() {
    let m = fixture("flux2-klein-tiny");
    expect_error(
        &m,
        &["--true-cfg", "2", "--negative-prompt", "x"],
        "flux2-true-cfg",
        &["FLUX.2 [klein]", "--true-cfg is FLUX.1's", "--guidance"],
    );
    let dir = tmp("flux2-image");
    let png = |name: &str, w: usize, h: usize| {
        let p = dir.join(name);
        mmdit::output::write_png(
            &p,
            &mmdit::output::RgbImage {
                width: w,
                height: h,
                data: vec![128; w * h * 3],
            },
            &[],
        )
        .unwrap();
        p.to_str().unwrap().to_string()
    };
    let (ok, small, narrow) = (
        png("ok.png", 64, 72),
        png("small.png", 32, 80),
        png("narrow.png", 600, 64),
    );
    expect_error(
        &m,
        &["--image", &ok, "--image", &small],
        "flux2-small",
        &[
            "--image #2: 32x80 pixels is too small",
            "at least 64 pixels",
        ],
    );
    expect_error(
        &m,
        &["--image", &narrow],
        "flux2-narrow",
        &["--image #1: 600x64", "aspect ratio at most 8:1"],
    );
    expect_error(
        &m,
        &["--image", &ok, "--strength", "0.5"],
        "flux2-strength",
        &["--strength does not apply", "reference"],
    );
    expect_error(
        &fixture("flux-dev-tiny"),
        &["--image", &ok, "--image", &ok],
        "flux-two-images",
        &["--image was given 2 times", "only FLUX.2 takes several"],
    );
    expect_error(&m, &["--width", "30"], "flux2-width", &["--width 30"]);
}
