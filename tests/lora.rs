//! LoRA against diffusers 0.42.1 (`load_lora_weights` + `set_adapters`) on the tiny random SD3.5,
//! FLUX.1-dev, Chroma and FLUX.2 [klein] models, from `tests/fixtures/lora` (scripts/make_lora_fixtures.py): one file per format
//! (diffusers/PEFT with LoraConfig metadata, kohya, ComfyUI/BFL names, XLabs, AI-toolkit; SD3 in the
//! PEFT and kohya forms; text-encoder parts; PEFT's DoRA), two at once with weights 0.7 and -0.3. The
//! final 8-bit image is within 2/255 of diffusers' from the same noise (f32, CPU), merged at load and
//! applied at run time alike, and the two paths within 1/255 of each other.

mod common;

use candle_core::{DType, Tensor};
use common::*;
use mmdit::lora::{Apply, LoraFile, LoraSpec};
use mmdit::{ModelRef, Pipeline, Request, Spec};
use std::collections::HashMap;

fn runs() -> Vec<serde_json::Value> {
    meta("lora")["runs"].as_array().unwrap().clone()
}

fn specs(run: &serde_json::Value) -> Vec<LoraSpec> {
    run["loras"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| LoraSpec {
            source: fixture("lora")
                .join(l["file"].as_str().unwrap())
                .display()
                .to_string(),
            scale: l["weight"].as_f64().unwrap(),
        })
        .collect()
}

/// The first run with a DoRA LoRA (magnitude vectors).
fn dora_run() -> usize {
    runs()
        .iter()
        .position(|run| {
            specs(run).iter().any(|s| {
                let f = LoraFile::read(std::path::Path::new(&s.source)).unwrap();
                f.modules.values().any(|m| m.magnitude.is_some())
            })
        })
        .expect("a DoRA run")
}

fn spec_of(model: &str) -> Spec {
    let dir = fixture(model);
    Spec::open(&ModelRef::parse(dir.to_str().unwrap(), None).unwrap()).unwrap()
}

/// A pipeline of the run's model with `loras` applied `apply`.
fn load(run: &serde_json::Value, loras: &[LoraSpec], apply: Apply) -> Pipeline {
    let spec = spec_of(run["model"].as_str().unwrap());
    let set = spec.fit_loras(loras).unwrap();
    spec.load_with(&device(), DType::F32, set, apply).unwrap()
}

fn request(k: usize, run: &serde_json::Value, r: &HashMap<String, Tensor>) -> Request {
    let size = |key: &str| run[key].as_u64().map(|v| v as usize);
    Request {
        prompt: run["prompt"].as_str().unwrap().into(),
        steps: size("steps"),
        guidance: run["guidance"].as_f64(),
        width: size("width"),
        height: size("height"),
        max_sequence_length: size("max_sequence_length"),
        noise: Some(r[&format!("run.{k}.noise")].clone()),
        loras: specs(run),
        ..Default::default()
    }
}

fn base_image(r: &HashMap<String, Tensor>, k: usize) -> Vec<u8> {
    r[&format!("run.{k}.base")]
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap()
}

#[test]
fn merged_loras_match_diffusers() {
    let r = reference("lora");
    for (k, run) in runs().iter().enumerate() {
        let mut pipe = load(run, &specs(run), Apply::Merge);
        let out = pipe.generate(&request(k, run, &r), &mut |_| {}).unwrap();
        let worst = max_u8_diff(&out.image.data, &reference_image(&r, k));
        let effect = max_u8_diff(&out.image.data, &base_image(&r, k));
        eprintln!(
            "run {k} {:?}: {worst}/255 from diffusers (the LoRA moves pixels by {effect}/255)",
            run["loras"]
        );
        assert!(worst <= 2, "run {k}: {worst}/255 from diffusers");
        // The LoRA must matter, or the comparison proves nothing.
        assert!(
            effect as u64 >= run["effect"].as_u64().unwrap() / 2,
            "run {k}: the LoRA changed little ({effect}/255)"
        );
    }
}

/// The run-time path: loaded without LoRAs, each request sets its own (switching between runs),
/// against diffusers and against the merged path.
#[test]
fn runtime_loras_match_diffusers_and_the_merged_path() {
    let r = reference("lora");
    let mut pipes: HashMap<String, Pipeline> = HashMap::new();
    for (k, run) in runs().iter().enumerate() {
        let model = run["model"].as_str().unwrap().to_string();
        let pipe = pipes
            .entry(model)
            .or_insert_with(|| load(run, &[], Apply::Runtime));
        let out = pipe.generate(&request(k, run, &r), &mut |_| {}).unwrap();
        let worst = max_u8_diff(&out.image.data, &reference_image(&r, k));
        eprintln!("run {k} at run time: {worst}/255 from diffusers");
        assert!(
            worst <= 2,
            "run {k} at run time: {worst}/255 from diffusers"
        );
        let mut merged = load(run, &specs(run), Apply::Merge);
        let m = merged.generate(&request(k, run, &r), &mut |_| {}).unwrap();
        let d = max_u8_diff(&out.image.data, &m.image.data);
        eprintln!("run {k}: run time {d}/255 from merged");
        assert!(d <= 1, "run {k}: run time {d}/255 from merged");
    }
    // Back to no LoRA at all: the base image.
    let run = &runs()[0];
    let pipe = pipes.get_mut(run["model"].as_str().unwrap()).unwrap();
    let req = Request {
        loras: Vec::new(),
        ..request(0, run, &r)
    };
    let out = pipe.generate(&req, &mut |_| {}).unwrap();
    assert!(max_u8_diff(&out.image.data, &base_image(&r, 0)) <= 2);
}

/// A pipeline loaded with one LoRA merged switches to another at run time (the difference as
/// run-time terms) and back.
#[test]
fn merged_pipeline_switches_loras_per_request() {
    let r = reference("lora");
    let all = runs();
    let (k0, k5) = (0, 6);
    let mut pipe = load(&all[k0], &specs(&all[k0]), Apply::Merge);
    for k in [k5, k0] {
        let out = pipe
            .generate(&request(k, &all[k], &r), &mut |_| {})
            .unwrap();
        let worst = max_u8_diff(&out.image.data, &reference_image(&r, k));
        assert!(worst <= 2, "run {k} after switching: {worst}/255");
    }
}

/// A DoRA merged at load cannot be taken off per request (its rescaling is not a term): another
/// LoRA is refused with the reason and the pipeline keeps serving the merged one.
#[test]
fn merged_dora_stays_merged() {
    let r = reference("lora");
    let all = runs();
    let k = dora_run();
    let mut pipe = load(&all[k], &specs(&all[k]), Apply::Merge);
    let e = pipe
        .generate(&request(0, &all[0], &r), &mut |_| panic!("a step ran"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("DoRA") && e.contains("merged"), "{e}");
    let out = pipe
        .generate(&request(k, &all[k], &r), &mut |_| {})
        .unwrap();
    assert!(max_u8_diff(&out.image.data, &reference_image(&r, k)) <= 2);
}

/// Each format is told from its keys; BFL names with lora_A/lora_B read as lora_down/lora_up.
#[test]
fn formats_are_detected_and_both_bfl_spellings_agree() {
    use mmdit::lora::Format;
    let f = |n: &str| LoraFile::read(&fixture("lora").join(n)).unwrap();
    for (name, want) in [
        ("flux_peft.safetensors", Format::Peft),
        ("flux_kohya.safetensors", Format::Kohya),
        ("flux_comfy.safetensors", Format::Original),
        ("flux_comfy_ab.safetensors", Format::Original),
        ("flux_xlabs.safetensors", Format::Xlabs),
        ("flux_aitoolkit.safetensors", Format::Peft),
        ("flux_kohya_diffusers.safetensors", Format::Kohya),
        ("sd3_peft.safetensors", Format::Peft),
        ("sd3_kohya.safetensors", Format::Kohya),
    ] {
        assert_eq!(f(name).format, want, "{name}");
    }
    let spec = spec_of("flux-dev-tiny");
    let layers = spec.model_layers().unwrap();
    let a = mmdit::lora::fit(&f("flux_comfy.safetensors"), &layers).unwrap();
    let b = mmdit::lora::fit(&f("flux_comfy_ab.safetensors"), &layers).unwrap();
    assert_eq!(
        a.layers.keys().collect::<Vec<_>>(),
        b.layers.keys().collect::<Vec<_>>()
    );
    assert!(a.unmatched.is_empty() && b.unmatched.is_empty());
    // Every key of every fixture file lands on a layer.
    for (model, files) in [
        (
            "flux-dev-tiny",
            &[
                "flux_peft",
                "flux_kohya",
                "flux_xlabs",
                "flux_aitoolkit",
                "flux_kohya_diffusers",
            ][..],
        ),
        ("sd35-tiny", &["sd3_peft", "sd3_kohya"][..]),
        ("chroma-tiny", &["chroma_peft", "chroma_comfy"][..]),
        ("flux2-klein-tiny", &["flux2_peft", "flux2_comfy"][..]),
    ] {
        let layers = spec_of(model).model_layers().unwrap();
        for n in files {
            let fitted = mmdit::lora::fit(&f(&format!("{n}.safetensors")), &layers).unwrap();
            assert!(fitted.unmatched.is_empty(), "{n}: {:?}", fitted.unmatched);
        }
    }
}

/// A kohya FLUX.1 file's T5 part (`lora_te2_`) is merged into T5 (diffusers drops it; ComfyUI
/// applies it): it lands on T5's layer, and the image changes with it.
#[test]
fn kohya_t5_modules_are_merged_into_t5() {
    use candle_core::Device;
    let dir = tmp("lora-t5");
    let f = dir.join("t5.safetensors");
    let down = Tensor::randn(0f32, 1.0, (4, 37), &Device::Cpu).unwrap();
    let up = Tensor::randn(0f32, 1.0, (32, 4), &Device::Cpu).unwrap();
    let key = "lora_te2_encoder_block_1_layer_1_DenseReluDense_wo";
    let map: HashMap<String, Tensor> = [
        (format!("{key}.lora_down.weight"), down),
        (format!("{key}.lora_up.weight"), up),
    ]
    .into_iter()
    .collect();
    candle_core::safetensors::save(&map, &f).unwrap();
    let spec = spec_of("flux-dev-tiny");
    let fitted =
        mmdit::lora::fit(&LoraFile::read(&f).unwrap(), &spec.model_layers().unwrap()).unwrap();
    let keys: Vec<_> = fitted.layers.keys().cloned().collect();
    assert_eq!(
        keys,
        [(
            "text_encoder_2".to_string(),
            "encoder.block.1.layer.1.DenseReluDense.wo.weight".to_string()
        )]
    );
    let r = reference("lora");
    let run = &runs()[0];
    let lora = LoraSpec {
        source: f.display().to_string(),
        scale: 1.0,
    };
    let req = Request {
        loras: vec![lora.clone()],
        ..request(0, run, &r)
    };
    // T5's output (the context) moves; this tiny model's image barely depends on it.
    let context = |p: &mut Pipeline| {
        let (c, _) = p
            .text_encoders()
            .unwrap()
            .encode("a red circle", 16)
            .unwrap();
        c.context
    };
    let mut plain = load(run, &[], Apply::Merge);
    let mut pipe = load(run, &[lora], Apply::Merge);
    let (a, b) = (context(&mut plain), context(&mut pipe));
    let moved = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(moved > 0.1, "the T5 LoRA moved the context by {moved} only");
    pipe.generate(&req, &mut |_| {}).unwrap();
}

/// LyCORIS' LoRA files name kohya's layers under `lycoris_`: the same file renamed fits the same
/// layers with the same factors.
#[test]
fn lycoris_prefix_reads_as_kohya() {
    use candle_core::Device;
    let path = fixture("lora").join("flux_kohya.safetensors");
    let t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let renamed: HashMap<String, Tensor> = t
        .into_iter()
        .map(|(k, v)| (k.replace("lora_unet_", "lycoris_"), v))
        .collect();
    let f = tmp("lora-lycoris").join("lycoris.safetensors");
    candle_core::safetensors::save(&renamed, &f).unwrap();
    let layers = spec_of("flux-dev-tiny").model_layers().unwrap();
    let a = mmdit::lora::fit(&LoraFile::read(&path).unwrap(), &layers).unwrap();
    let b = mmdit::lora::fit(&LoraFile::read(&f).unwrap(), &layers).unwrap();
    assert_eq!(b.format, mmdit::lora::Format::Kohya);
    assert!(b.unmatched.is_empty(), "{:?}", b.unmatched);
    assert_eq!(
        a.layers.keys().collect::<Vec<_>>(),
        b.layers.keys().collect::<Vec<_>>()
    );
}

/// kohya's underscored spelling of Chroma's and FLUX.2's original names (Chroma's three-word
/// `distilled_guidance_layer`, FLUX.2's four-word `double_stream_modulation_img` included) lands on
/// the same layers, with the same factors, as the ComfyUI spelling.
#[test]
fn kohya_names_fit_as_the_comfyui_names_for_chroma_and_flux2() {
    let dev = candle_core::Device::Cpu;
    for (file, model, marker) in [
        (
            "chroma_comfy",
            "chroma-tiny",
            "distilled_guidance_layer.layers.",
        ),
        (
            "flux2_comfy",
            "flux2-klein-tiny",
            "double_stream_modulation_img.",
        ),
    ] {
        let comfy = fixture("lora").join(format!("{file}.safetensors"));
        let kohya: HashMap<String, Tensor> = candle_core::safetensors::load(&comfy, &dev)
            .unwrap()
            .into_iter()
            .map(|(k, v)| {
                let k = k.strip_prefix("diffusion_model.").unwrap();
                let (module, param) = match k.split_once(".lora_") {
                    Some((m, p)) => (m, format!("lora_{p}")),
                    None => (k.strip_suffix(".alpha").unwrap(), "alpha".to_string()),
                };
                (format!("lora_unet_{}.{param}", module.replace('.', "_")), v)
            })
            .collect();
        let path = tmp(&format!("lora-kohya-{model}")).join("kohya.safetensors");
        candle_core::safetensors::save(&kohya, &path).unwrap();
        let layers = spec_of(model).model_layers().unwrap();
        let a = mmdit::lora::fit(&LoraFile::read(&comfy).unwrap(), &layers).unwrap();
        let b = mmdit::lora::fit(&LoraFile::read(&path).unwrap(), &layers).unwrap();
        assert!(b.unmatched.is_empty(), "{model}: {:?}", b.unmatched);
        assert_eq!(
            a.layers.keys().collect::<Vec<_>>(),
            b.layers.keys().collect::<Vec<_>>(),
            "{model}"
        );
        assert!(
            a.layers.keys().any(|(_, w)| w.starts_with(marker)),
            "{model}"
        );
        for (k, pa) in &a.layers {
            let pb = &b.layers[k];
            assert_eq!(pa.len(), pb.len(), "{k:?}");
            for (x, y) in pa.iter().zip(pb) {
                assert_eq!(x.scale, y.scale, "{k:?}");
                assert_eq!(max_diff(&x.up, &y.up).0, 0.0, "{k:?}");
            }
        }
    }
}

/// A DoRA magnitude that does not fit its up factor's rows, or one without factors, is refused by
/// name; kohya's `dora_scale` keys are ignored as diffusers ignores them, and said so.
#[test]
fn dora_magnitudes_are_checked_and_kohya_dora_scales_named() {
    let dir = std::env::temp_dir().join(format!("mmdit-dora-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dev = candle_core::Device::Cpu;
    let ones = |shape: &[usize]| Tensor::ones(shape, DType::F32, &dev).unwrap();
    let write = |name: &str, t: &HashMap<String, Tensor>| {
        let p = dir.join(name);
        candle_core::safetensors::save(t, &p).unwrap();
        p
    };
    let mut t = HashMap::new();
    t.insert("transformer.x.lora_A.weight".to_string(), ones(&[2, 8]));
    t.insert("transformer.x.lora_B.weight".to_string(), ones(&[4, 2]));
    t.insert(
        "transformer.x.lora_magnitude_vector".to_string(),
        ones(&[3]),
    );
    let e = LoraFile::read(&write("rows.safetensors", &t))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("DoRA magnitude has shape [3]") && e.contains("4 rows"),
        "{e}"
    );
    let mut t = HashMap::new();
    t.insert(
        "transformer.y.lora_magnitude_vector".to_string(),
        ones(&[4]),
    );
    t.insert("transformer.x.lora_A.weight".to_string(), ones(&[2, 8]));
    t.insert("transformer.x.lora_B.weight".to_string(), ones(&[4, 2]));
    let e = LoraFile::read(&write("alone.safetensors", &t))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`transformer.y` has a DoRA magnitude but no down or up factor"),
        "{e}"
    );

    // kohya's DoRA: the fixture's kohya file with a `dora_scale` per module.
    let src = fixture("lora").join("flux_kohya.safetensors");
    let mut t = candle_core::safetensors::load(&src, &dev).unwrap();
    let ups: Vec<(String, usize)> = t
        .iter()
        .filter_map(|(k, v)| Some((k.strip_suffix(".lora_up.weight")?.to_string(), v.dims()[0])))
        .collect();
    for (m, rows) in &ups {
        t.insert(format!("{m}.dora_scale"), ones(&[1, *rows]));
    }
    let p = write("kohya_dora.safetensors", &t);
    let spec = spec_of("flux-dev-tiny");
    let set = spec
        .fit_loras(&[LoraSpec {
            source: p.display().to_string(),
            scale: 1.0,
        }])
        .unwrap();
    let notes: Vec<String> = set
        .notices()
        .iter()
        .map(|m| m.render(&|p| p.name().to_string()))
        .collect();
    assert!(
        notes.iter().any(|n| n.contains(&format!(
            "{} `dora_scale` keys (kohya's DoRA) ignored",
            ups.len()
        ))),
        "{notes:?}"
    );
    assert!(
        !notes.iter().any(|n| n.contains("fit no layer")),
        "{notes:?}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
