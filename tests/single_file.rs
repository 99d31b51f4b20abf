//! Issue 4: original single-file checkpoints (SAI SD3/SD3.5, BFL FLUX.1 + ae.safetensors).
//! - Tiny single-file twins of diffusers-layout fixtures (scripts/make_single_file_fixtures.py, whose
//!   inverse mapping is checked there against diffusers' `from_single_file`) draw the twins' reference
//!   images (within 2/255), with every weight the file holds read from the file.
//! - The single-file shape manifests of the six real models map, tensor for tensor, onto their
//!   diffusers manifests (which tests/manifests.rs proves match the engine's parameters): nothing
//!   missing, nothing unexpected, every shape equal; the variant is detected from shapes.

mod common;

use common::*;
use mmdit::loader::audit::TensorMeta;
use mmdit::loader::single::{Format, SingleFile};
use mmdit::{ModelRef, Spec};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn single(rel: &str) -> PathBuf {
    fixture("single").join(rel)
}

/// A copy of a fixture folder with the weights of `drop` components removed, so that the
/// single-file checkpoint is the only place they can come from.
fn components_without(twin: &str, drop: &[&str], test: &str) -> PathBuf {
    let dir = copy_fixture(twin, test);
    for c in drop {
        for e in std::fs::read_dir(dir.join(c)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "safetensors") {
                std::fs::remove_file(p).unwrap();
            }
        }
    }
    dir
}

fn images_match(file: PathBuf, twin: &str, components: PathBuf) {
    let m = ModelRef::SingleFile {
        file,
        components: Some(Box::new(ModelRef::Folder(components))),
    };
    let mut pipe = Spec::open(&m)
        .unwrap()
        .load(&device(), candle_core::DType::F32)
        .unwrap();
    let r = reference(twin);
    let meta = meta(twin);
    let max_seq = meta["max_sequence_length"].as_u64().unwrap() as usize;
    for (k, run) in meta["runs"].as_array().unwrap().iter().enumerate() {
        let req = fixture_request(twin, run, max_seq);
        let out = pipe.generate(&req, &mut |_| {}).unwrap();
        let want = reference_image(&r, k);
        let worst = max_u8_diff(&out.image.data, &want);
        println!("single-file {twin} run {k}: image max diff {worst}/255");
        assert!(worst <= 2, "single-file {twin} run {k}: {worst}/255");
    }
}

#[test]
fn sai_sd3_file_with_vae_and_text_encoders_draws_its_twins_images() {
    let comps = components_without(
        "sd3-dummy",
        &[
            "transformer",
            "vae",
            "text_encoder",
            "text_encoder_2",
            "text_encoder_3",
        ],
        "sai-sd3",
    );
    images_match(
        single("sd3-dummy/sd3_dummy.safetensors"),
        "sd3-dummy",
        comps,
    );
}

#[test]
fn sai_sd35_transformer_only_file_draws_its_twins_images() {
    let comps = components_without("sd35-tiny", &["transformer"], "sai-sd35");
    images_match(
        single("sd35-tiny/sd35_tiny.safetensors"),
        "sd35-tiny",
        comps,
    );
}

#[test]
fn bfl_flux_file_with_ae_beside_it_draws_its_twins_images() {
    let comps = components_without("flux-dev-tiny", &["transformer", "vae"], "bfl-flux");
    images_match(
        single("flux-dev-tiny/flux1-dev-tiny.safetensors"),
        "flux-dev-tiny",
        comps,
    );
}

/// Chroma's original layout: FLUX.1's names without the modulation layers, plus the
/// approximator's (`distilled_guidance_layer.layers.<i>.in_layer`, `norms.<i>.scale`).
#[test]
fn chroma_file_with_ae_beside_it_draws_its_twins_images() {
    let comps = components_without("chroma-tiny", &["transformer", "vae"], "chroma-single");
    images_match(
        single("chroma-tiny/chroma-tiny.safetensors"),
        "chroma-tiny",
        comps,
    );
}

fn shapes(m: &BTreeMap<String, TensorMeta>) -> BTreeMap<String, Vec<usize>> {
    m.iter()
        .map(|(k, v)| (k.clone(), v.shape.clone()))
        .collect()
}

#[test]
fn every_tensor_of_the_real_single_files_maps_onto_the_diffusers_layout() {
    let dir = fixture("manifests");
    for model in REAL_MODELS {
        let read = |f: &str| -> Value { read_json(dir.join(f)) };
        let diffusers = read(&format!("{model}.json"));
        let single = read(&format!("{model}.single.json"));
        let main = manifest_tensors(&single["file"]);
        let ae = single
            .get("ae")
            .map(|a| (PathBuf::from("ae.safetensors"), manifest_tensors(a)));
        let path = Path::new("checkpoint.safetensors");
        let s = SingleFile::from_metas(path, &main, ae).unwrap();
        // Same shapes as another model: that preset is detected; the variant is chosen with
        // --components.
        let want_variant = match model {
            "sd3.5-large-turbo" => "sd3.5-large",
            "flux.1-kontext-dev" => "flux.1-dev",
            "chroma1-base" => "chroma1-hd",
            m => m,
        };
        let preset = mmdit::presets::Preset::for_single_file(&s.detected).map(|p| p.name);
        assert_eq!(preset.as_deref(), Some(want_variant), "{model}: variant");
        assert_eq!(s.detected.format, real_format(model));
        assert!(
            s.unmapped(&main).is_empty(),
            "{model}: unmapped {:?}",
            s.unmapped(&main)
        );
        let comps = diffusers["components"].as_object().unwrap();
        assert_eq!(
            s.components.keys().copied().collect::<Vec<_>>(),
            {
                let mut k: Vec<&str> = comps.keys().map(String::as_str).collect();
                if real_format(model) == Format::Flux2 {
                    k.retain(|c| *c == "transformer");
                } else if real_format(model) != Format::Sd3 {
                    k.retain(|c| *c == "transformer" || *c == "vae");
                }
                k.sort();
                k
            },
            "{model}: components in the file"
        );
        for (name, m) in &s.components {
            let want = shapes(&manifest_tensors(&comps[*name]));
            let got = shapes(&m.metas());
            let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
            let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
            let wrong: Vec<_> = want
                .iter()
                .filter(|(k, s)| got.get(*k).is_some_and(|g| g != *s))
                .map(|(k, _)| k)
                .collect();
            assert!(
                missing.is_empty() && extra.is_empty() && wrong.is_empty(),
                "{model}/{name}: missing {:?}, unexpected {:?}, wrong shape {:?}",
                &missing[..missing.len().min(5)],
                &extra[..extra.len().min(5)],
                &wrong[..wrong.len().min(5)]
            );
            println!("{model}/{name}: {} tensors mapped", got.len());
        }
    }
}

/// The other direction (`mmdit convert`): every real transformer, from its diffusers manifest,
/// laid out in its original names gives exactly the transformer tensors of its single-file
/// manifest, names and shapes.
#[test]
fn every_real_transformer_lays_out_as_its_original_checkpoint() {
    let dir = fixture("manifests");
    for model in REAL_MODELS {
        let diffusers = read_json(dir.join(format!("{model}.json")));
        let single = read_json(dir.join(format!("{model}.single.json")));
        let format = real_format(model);
        let prefix = match format {
            Format::Sd3 => "model.diffusion_model.",
            _ => "",
        };
        let transformer = manifest_tensors(&diffusers["components"]["transformer"]);
        let layout = mmdit::loader::single::original_layout(format, &transformer).unwrap();
        let got: BTreeMap<String, Vec<usize>> = layout
            .iter()
            .map(|(k, (m, _))| (k.clone(), m.shape.clone()))
            .collect();
        let want: BTreeMap<String, Vec<usize>> = manifest_tensors(&single["file"])
            .into_iter()
            .filter_map(|(k, m)| {
                let k = match format {
                    Format::Sd3 => k.strip_prefix(prefix)?.to_string(),
                    _ => k,
                };
                Some((k, m.shape))
            })
            .collect();
        assert_eq!(got, want, "{model}");
        println!("{model}: {} original tensors", got.len());
    }
}

#[test]
fn inspect_reports_a_single_file_and_its_component_audit() {
    let comps = components_without("sd3-dummy", &[], "inspect-single");
    let o = mmdit()
        .args(["inspect"])
        .arg(single("sd3-dummy/sd3_dummy.safetensors"))
        .arg("--components")
        .arg(&comps)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains("SAI SD3/SD3.5 single-file checkpoint"),
        "{out}"
    );
    assert!(out.contains("prefix `model.diffusion_model.`"), "{out}");
    for c in ["transformer", "vae", "text_encoder_3"] {
        assert!(out.contains(&format!("in file {c}")), "{out}");
    }
    assert!(out.contains("all tensors match their configs"), "{out}");
}

#[test]
fn inspect_flags_a_foreign_tensor_in_a_single_file() {
    let dir = tmp("single-foreign");
    let src = single("sd35-tiny/sd35_tiny.safetensors");
    let mut t = candle_core::safetensors::load(&src, &candle_core::Device::Cpu).unwrap();
    t.insert(
        "joint_blocks.0.x_block.extra.weight".into(),
        candle_core::Tensor::zeros(3, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
    );
    let f = dir.join("sd35.safetensors");
    candle_core::safetensors::save(&t, &f).unwrap();
    let o = mmdit()
        .args(["inspect"])
        .arg(&f)
        .arg("--components")
        .arg(fixture("sd35-tiny"))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!o.status.success(), "{out}");
    assert!(
        out.contains("unexpected  joint_blocks.0.x_block.extra.weight"),
        "{out}"
    );
}

/// `mmdit generate --prompt x --model <file> [--components <dir>]` into a fresh folder.
fn generate_single(file: &str, components: Option<PathBuf>, test: &str) -> (Option<i32>, String) {
    let mut cmd = mmdit();
    cmd.args(["generate", "--prompt", "x", "--model"])
        .arg(single(file))
        .arg("--output")
        .arg(tmp(test).join("o.png"));
    if let Some(c) = components {
        cmd.arg("--components").arg(c);
    }
    let o = cmd.output().unwrap();
    (o.status.code(), String::from_utf8_lossy(&o.stderr).into())
}

#[test]
fn a_single_file_of_unknown_shapes_needs_components() {
    let (code, err) = generate_single("sd35-tiny/sd35_tiny.safetensors", None, "single-nocomp");
    assert_clean_error(code, &err, &["--components"]);
}

/// The library names the parameter as its caller passes it; the CLI renders the same error with
/// its flags (tested above).
#[test]
fn a_single_file_needs_components_that_are_not_another_single_file() {
    let file = single("sd35-tiny/sd35_tiny.safetensors");
    let bare = ModelRef::SingleFile {
        file: file.clone(),
        components: None,
    };
    let e = Spec::open(&bare).err().unwrap();
    assert!(e.to_string().contains("needs components ("), "{e}");
    let nested = ModelRef::SingleFile {
        file,
        components: Some(Box::new(bare)),
    };
    let e = Spec::open(&nested).err().unwrap();
    assert!(
        e.to_string().starts_with("components: pass a preset"),
        "{e}"
    );
    let flags = e.render(&|p| format!("--{}", p.name()));
    assert!(flags.starts_with("--components: pass a preset"), "{flags}");
}

#[test]
fn a_single_file_with_components_of_the_other_family_is_refused() {
    let file = "flux-dev-tiny/flux1-dev-tiny.safetensors";
    let (code, err) = generate_single(file, Some(fixture("sd3-dummy")), "single-family");
    assert_clean_error(code, &err, &["flux", "sd3", "--components"]);
}

/// Chroma and FLUX.1 files share their block names: each is told by the approximator, and
/// refused with the other's components.
#[test]
fn chroma_and_flux_files_are_refused_with_each_others_components() {
    let file = "chroma-tiny/chroma-tiny.safetensors";
    let (code, err) = generate_single(file, Some(fixture("flux-dev-tiny")), "single-chroma-flux");
    assert_clean_error(code, &err, &["chroma", "flux", "--components"]);
    let file = "flux-dev-tiny/flux1-dev-tiny.safetensors";
    let (code, err) = generate_single(file, Some(fixture("chroma-tiny")), "single-flux-chroma");
    assert_clean_error(code, &err, &["chroma", "flux", "--components"]);
}

#[test]
fn generate_runs_a_single_file_from_the_command_line() {
    let comps = components_without("flux-dev-tiny", &["transformer", "vae"], "single-cli");
    let out = tmp("single-cli-out").join("o.png");
    let o = mmdit()
        .arg("generate")
        .args(["--prompt", "a red circle", "--steps", "2", "--width", "32"])
        .args(["--height", "32", "--device", "cpu", "--model"])
        .arg(single("flux-dev-tiny/flux1-dev-tiny.safetensors"))
        .arg("--components")
        .arg(&comps)
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.is_file());
}

#[test]
fn pickle_and_foreign_files_are_refused_as_models() {
    let dir = tmp("single-pickle");
    let ckpt = dir.join("model.ckpt");
    std::fs::write(&ckpt, b"not loaded").unwrap();
    let (code, err) = run(&[
        "generate".as_ref(),
        "--prompt".as_ref(),
        "x".as_ref(),
        "--model".as_ref(),
        ckpt.as_os_str(),
    ]);
    assert_clean_error(code, &err, &["pickle", ".safetensors"]);
    // A diffusers component file is not a single-file checkpoint.
    let (code, err) = run(&[
        "generate".as_ref(),
        "--prompt".as_ref(),
        "x".as_ref(),
        "--model".as_ref(),
        fixture("sd3-dummy")
            .join("vae/diffusion_pytorch_model.safetensors")
            .as_os_str(),
    ]);
    assert_clean_error(code, &err, &["not a single-file"]);
}
