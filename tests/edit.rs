//! Editing against diffusers 0.42.1 (img2img: `StableDiffusion3Img2ImgPipeline`,
//! `FluxImg2ImgPipeline`; inpainting: `StableDiffusion3InpaintPipeline`, `FluxInpaintPipeline`) on
//! the tiny random models, from `tests/fixtures/edit` (scripts/make_edit_fixtures.py): the image
//! processor's resize and normalisation and the mask processor's binarisation exactly, the VAE
//! encoder within 1e-4 x max |reference|, the truncated schedule within 1e-6, the final 8-bit image
//! within 2/255 from the same noise (f32, CPU), bf16 at least 30 dB PSNR against diffusers' f32.

mod common;

use candle_core::{DType, Tensor};
use common::*;
use mmdit::{image_io, vae, ModelRef, Param, Pipeline, Request, Spec};

const REL: f32 = 1e-4;

fn runs() -> Vec<serde_json::Value> {
    meta("edit")["runs"].as_array().unwrap().clone()
}

fn load(run: &serde_json::Value, dtype: DType) -> Pipeline {
    let dir = fixture(run["model"].as_str().unwrap());
    let m = ModelRef::parse(dir.to_str().unwrap(), None).unwrap();
    Spec::open(&m).unwrap().load(&device(), dtype).unwrap()
}

fn input(run: &serde_json::Value) -> mmdit::RgbImage {
    let path = fixture("edit").join(run["input"].as_str().unwrap());
    image_io::read_rgb(&path, Param::Image).unwrap()
}

/// The run's inpainting mask, if it has one.
fn mask(run: &serde_json::Value) -> Option<mmdit::RgbImage> {
    let path = fixture("edit").join(run["mask"].as_str()?);
    Some(image_io::read_rgb(&path, Param::Mask).unwrap())
}

/// The recorded run `k` as a request, with diffusers' two noise draws.
fn request(
    k: usize,
    run: &serde_json::Value,
    r: &std::collections::HashMap<String, Tensor>,
) -> Request {
    let size = |key: &str| run[key].as_u64().map(|v| v as usize);
    Request {
        prompt: run["prompt"].as_str().unwrap().into(),
        negative_prompt: run["negative_prompt"].as_str().map(Into::into),
        steps: size("steps"),
        guidance: run["guidance"].as_f64(),
        width: size("width"),
        height: size("height"),
        max_sequence_length: size("max_sequence_length"),
        noise: Some(r[&format!("run.{k}.noise")].clone()),
        image: Some(input(run)),
        strength: run["strength"].as_f64(),
        encode_noise: ["eps", "eps2"]
            .iter()
            .filter_map(|e| r.get(&format!("run.{k}.{e}")).cloned())
            .collect(),
        mask: mask(run),
        reference_auto_resize: run["kontext"].as_bool().map(|_| false),
        ..Default::default()
    }
}

#[test]
fn resize_and_vae_encoder_match_diffusers() {
    let r = reference("edit");
    for (k, run) in runs().iter().enumerate() {
        let mut pipe = load(run, DType::F32);
        let size = |key: &str| run[key].as_u64().unwrap() as usize;
        // Kontext's reference keeps its own size (rounded down); the others take the output's.
        let (w, h) = match run["reference_size"].as_array() {
            Some(s) => (
                s[0].as_u64().unwrap() as usize,
                s[1].as_u64().unwrap() as usize,
            ),
            None => (size("width"), size("height")),
        };
        let img = image_io::lanczos_resize(&input(run), w, h);
        let x = vae::from_rgb8(&img, &device()).unwrap();
        let (worst, _) = max_diff(&x, &r[&format!("run.{k}.pre")]);
        println!("run {k}: preprocessed image max diff {worst:e}");
        assert!(
            worst <= 1e-6,
            "run {k}: preprocessed image differs by {worst}"
        );
        if let Some(m) = mask(run) {
            let bits = image_io::binarize_mask(&m, size("width"), size("height"));
            let want: Vec<f32> = r[&format!("run.{k}.mask")]
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let got: Vec<f32> = bits.iter().map(|&b| f32::from(b)).collect();
            assert_eq!(got, want, "run {k}: binarised mask");
        }
        let dist = pipe.vae_encoder().unwrap().encode(&x).unwrap();
        let model = run["model"].as_str().unwrap();
        assert_close_rel(
            &format!("{model} encoder mean"),
            &dist.mean,
            &r[&format!("run.{k}.enc.mean")],
            REL,
        );
        assert_close_rel(
            &format!("{model} encoder logvar"),
            &dist.logvar,
            &r[&format!("run.{k}.enc.logvar")],
            REL,
        );
    }
}

#[test]
fn edits_match_diffusers_within_2_of_255() {
    let r = reference("edit");
    let mut worsts = Vec::new();
    for (k, run) in runs().iter().enumerate() {
        let mut pipe = load(run, DType::F32);
        let req = request(k, run, &r);
        let resolved = pipe.resolve(&req).unwrap();
        let sched = pipe.spec.schedule(&resolved);
        let want: Vec<f32> = r[&format!("run.{k}.sigmas")].to_vec1().unwrap();
        assert_eq!(sched.sigmas.len(), want.len(), "run {k}: steps that run");
        for (a, b) in sched.sigmas.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-6, "run {k}: sigma {a} vs {b}");
        }
        let out = pipe.generate(&req, &mut |_| {}).unwrap();
        assert_eq!(out.timings.steps.len(), want.len() - 1);
        let worst = max_u8_diff(&out.image.data, &reference_image(&r, k));
        println!("run {k} ({}): image max diff {worst}/255", run["model"]);
        if let Some(shipped) = r.get(&format!("run.{k}.image_as_shipped")) {
            let v: Vec<u8> = shipped.flatten_all().unwrap().to_vec1().unwrap();
            let d = max_u8_diff(&out.image.data, &v);
            println!("run {k}: {d}/255 from diffusers' own image, which drops the VAE shift (diffusers#13611)");
        }
        worsts.push(worst);
    }
    for (k, worst) in worsts.into_iter().enumerate() {
        assert!(worst <= 2, "run {k}: image differs by {worst}/255");
    }
}

/// The BFL single file of flux-dev-tiny with its `ae.safetensors` (LDM names, encoder included)
/// edits as the folder does: the encoder's single-file mapping, downsamplers included.
#[test]
fn edits_from_a_bfl_single_file_and_ae_match_diffusers() {
    let r = reference("edit");
    let comps = copy_fixture("flux-dev-tiny", "edit-bfl");
    for c in ["transformer", "vae"] {
        for e in std::fs::read_dir(comps.join(c)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "safetensors") {
                std::fs::remove_file(p).unwrap();
            }
        }
    }
    let m = ModelRef::SingleFile {
        file: fixture("single").join("flux-dev-tiny/flux1-dev-tiny.safetensors"),
        components: Some(Box::new(ModelRef::Folder(comps))),
    };
    let mut pipe = Spec::open(&m).unwrap().load(&device(), DType::F32).unwrap();
    let mut n = 0;
    for (k, run) in runs().iter().enumerate() {
        if run["model"] != "flux-dev-tiny" {
            continue;
        }
        let out = pipe.generate(&request(k, run, &r), &mut |_| {}).unwrap();
        let worst = max_u8_diff(&out.image.data, &reference_image(&r, k));
        println!("run {k} from the single file: image max diff {worst}/255");
        assert!(worst <= 2, "run {k} from the single file: {worst}/255");
        n += 1;
    }
    assert_eq!(n, 2, "the img2img and the inpainting run of flux-dev-tiny");
}

#[test]
fn bf16_edits_within_30_db_of_diffusers_f32() {
    let r = reference("edit");
    for (k, run) in runs().iter().enumerate() {
        let mut pipe = load(run, DType::BF16);
        let out = pipe.generate(&request(k, run, &r), &mut |_| {}).unwrap();
        let p = psnr(&out.image.data, &reference_image(&r, k));
        println!(
            "run {k} ({}): bf16 PSNR {p:.1} dB against diffusers f32",
            run["model"]
        );
        assert!(p >= 30.0, "run {k}: bf16 PSNR {p:.1} dB < 30 dB");
    }
}

/// Kontext encodes its reference to the distribution's mean: encode noise is refused, not ignored.
#[test]
fn kontext_refuses_encode_noise() {
    let m = ModelRef::parse(fixture("flux-kontext-tiny").to_str().unwrap(), None).unwrap();
    let spec = Spec::open(&m).unwrap();
    let run = &runs()[10];
    let req = Request {
        prompt: "x".into(),
        image: Some(input(run)),
        encode_noise: vec![Tensor::zeros((1, 4, 12, 10), DType::F32, &device()).unwrap()],
        ..Default::default()
    };
    let e = spec.resolve(&req).unwrap_err().to_string();
    assert!(e.starts_with("encode_noise does not apply to"), "{e}");
}
