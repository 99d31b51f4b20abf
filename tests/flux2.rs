//! The FLUX.2 transformer (`Flux2Transformer2DModel`) against diffusers 0.42.1 on tiny random
//! [klein]-like and [dev]-like models (scripts/make_flux2_fixtures.py): output within
//! 1e-4 x max |reference| in f32, on a non-square latent grid and a batch of two timesteps; and
//! reference-image editing (`Flux2KleinPipeline(image=[...])`, scripts/make_flux2_edit_fixtures.py).

mod common;

use candle_core::DType;
use common::*;
use mmdit::config::Flux2TransformerConfig;
use mmdit::mmdit::Flux2Transformer;

#[test]
fn flux2_transformer_matches_diffusers() {
    for name in ["klein-tiny", "dev-tiny"] {
        let dir = fixture("flux2-transformer").join(name);
        let cfg: Flux2TransformerConfig =
            mmdit::config::read_json(&dir.join("config.json")).unwrap();
        cfg.validate(&dir.join("config.json")).unwrap();
        let weights = dir.join("diffusion_pytorch_model.safetensors");
        // SAFETY: the fixture file is not modified while the test maps it.
        let vb = unsafe {
            candle_nn::VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &device())
        }
        .unwrap();
        let model = Flux2Transformer::new(&cfg, vb).unwrap();
        let r =
            candle_core::safetensors::load(dir.join("reference.safetensors"), &device()).unwrap();
        let meta = read_json(dir.join("fixture.json"));
        let (h, w) = (
            meta["grid"][0].as_u64().unwrap() as usize,
            meta["grid"][1].as_u64().unwrap() as usize,
        );
        let ctx = &r["context"];
        let rope = model
            .rope(ctx.dim(1).unwrap(), h, w, &[], &device())
            .unwrap();
        let out = model
            .forward(&r["x"], &r["sigma"], r.get("guidance"), ctx, &rope)
            .unwrap();
        assert_close_rel(&format!("FLUX.2 {name} transformer"), &out, &r["out"], 1e-4);
    }
}

/// Configs that cannot be a FLUX.2 model are refused by name before anything is built.
#[test]
fn flux2_configs_are_checked() {
    let path = std::path::Path::new("transformer/config.json");
    let parse =
        |j: serde_json::Value| -> Flux2TransformerConfig { serde_json::from_value(j).unwrap() };
    for (bad, needle) in [
        (
            serde_json::json!({"axes_dims_rope": [32, 32, 32, 30]}),
            "axes_dims_rope",
        ),
        (serde_json::json!({"mlp_ratio": -1.0}), "mlp_ratio"),
        (serde_json::json!({"patch_size": 2}), "patch_size"),
        (serde_json::json!({"eps": 1e-5}), "eps"),
        (
            serde_json::json!({"num_layers": 0, "num_single_layers": 0}),
            "at least one block",
        ),
    ] {
        let e = parse(bad).validate(path).unwrap_err().to_string();
        assert!(e.contains(needle), "{e}");
    }
    parse(serde_json::json!({})).validate(path).unwrap();
}

/// One and two reference images of their own sizes (cropped at the centre to the model's
/// multiple), with guidance and step-distilled: the references' latents within 1e-4 x max and the
/// image within 2/255 of diffusers' in f32, >= 30 dB in bf16.
#[test]
fn flux2_reference_editing_matches_diffusers() {
    let meta = common::meta("flux2-edit");
    let r = reference("flux2-edit");
    let dir = fixture("flux2-edit");
    let inputs: Vec<mmdit::RgbImage> = meta["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            mmdit::output::read_png(&dir.join(p.as_str().unwrap()))
                .unwrap()
                .0
        })
        .collect();
    for (k, run) in meta["runs"].as_array().unwrap().iter().enumerate() {
        let model = run["model"].as_str().unwrap();
        let images: Vec<mmdit::RgbImage> = run["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| inputs[i.as_u64().unwrap() as usize].clone())
            .collect();
        let m = mmdit::ModelRef::parse(fixture(model).to_str().unwrap(), None).unwrap();
        // Without a size, the output takes the first reference's.
        let size_given = run["size_given"].as_bool().unwrap();
        let req = mmdit::Request {
            prompt: run["prompt"].as_str().unwrap().into(),
            steps: Some(run["steps"].as_u64().unwrap() as usize),
            guidance: run["guidance"].as_f64(),
            max_sequence_length: Some(run["max_sequence_length"].as_u64().unwrap() as usize),
            noise: Some(r[&format!("run.{k}.noise")].clone()),
            width: size_given.then(|| run["width"].as_u64().unwrap() as usize),
            height: size_given.then(|| run["height"].as_u64().unwrap() as usize),
            image: Some(images[0].clone()),
            reference_images: images[1..].to_vec(),
            ..Default::default()
        };
        let want: Vec<u8> = r[&format!("run.{k}.image")]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let mut pipe = mmdit::Spec::open(&m)
                .unwrap()
                .load(&device(), dtype)
                .unwrap();
            if dtype == DType::F32 {
                // The references as the pipeline prepares them, packed one after the other.
                let res = pipe.resolve(&req).unwrap();
                let init = res.init.as_ref().unwrap();
                let packed: Vec<candle_core::Tensor> = std::iter::once(&init.image)
                    .chain(&init.references)
                    .map(|img| {
                        let z = pipe.encode_mean(img).unwrap();
                        let (_, c, h, w) = z.dims4().unwrap();
                        z.reshape((1, c, h * w)).unwrap().transpose(1, 2).unwrap()
                    })
                    .collect();
                let ours = candle_core::Tensor::cat(&packed, 1).unwrap();
                assert_close_rel(
                    &format!("run {k} references"),
                    &ours,
                    &r[&format!("run.{k}.references")],
                    1e-4,
                );
            }
            let out = pipe.generate(&req, &mut |_| {}).unwrap();
            assert_eq!(
                (out.image.width, out.image.height),
                (
                    run["width"].as_u64().unwrap() as usize,
                    run["height"].as_u64().unwrap() as usize
                ),
                "run {k}: the output size"
            );
            if dtype == DType::F32 {
                let d = max_u8_diff(&out.image.data, &want);
                eprintln!(
                    "run {k} ({model}, {} references): within {d}/255",
                    images.len()
                );
                assert!(d <= 2, "run {k}: {d}/255");
            } else {
                let p = psnr(&out.image.data, &want);
                eprintln!("run {k} bf16: {p:.1} dB");
                assert!(p >= 30.0, "run {k} bf16: {p:.1} dB");
            }
        }
    }
}

/// FLUX.2 [dev] (`Flux2Pipeline`) on a tiny Mistral 3 (scripts/make_flux2_fixtures.py): the chat
/// template (system message, text blocks, `strftime_now`) tokenized without added specials and
/// padded on the left, the hidden states after layers 10, 20 and 30 (padding included, the first
/// rows of a left-padded prompt attending to nothing), and images with embedded guidance, one of
/// them edited from two reference images.
#[test]
fn flux2_dev_matches_diffusers() {
    let name = "flux2-dev-tiny";
    let meta = common::meta(name);
    let r = reference(name);
    let max_seq = meta["max_sequence_length"].as_u64().unwrap() as usize;
    let m = mmdit::ModelRef::parse(fixture(name).to_str().unwrap(), None).unwrap();
    let spec = mmdit::Spec::open(&m).unwrap();
    assert!(
        spec.variant().starts_with("FLUX.2 [dev]"),
        "{}",
        spec.variant()
    );
    let mut pipe = spec.load(&device(), DType::F32).unwrap();
    let tok = mmdit::text::TextTokenizer::from_dir(&fixture(name).join("tokenizer")).unwrap();
    for (i, p) in meta["prompts"].as_array().unwrap().iter().enumerate() {
        let p = p.as_str().unwrap();
        let msg = |role, text| mmdit::text::tokenize::ChatMessage {
            role,
            text,
            blocks: true,
        };
        let text = tok
            .render_chat(
                &[
                    msg("system", mmdit::text::FLUX2_SYSTEM_MESSAGE),
                    msg("user", p),
                ],
                false,
            )
            .unwrap();
        let (t, _) = tok.encode_chat(&text, max_seq).unwrap();
        let want: Vec<u32> = r[&format!("text.{i}.ids_mistral")]
            .flatten_all()
            .unwrap()
            .to_dtype(DType::U32)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(t.ids, want, "prompt {i}: token ids");
        let (c, _) = pipe.text_encoders().unwrap().encode(p, max_seq).unwrap();
        assert_close_rel(
            &format!("prompt {i} context"),
            &c.context,
            &r[&format!("text.{i}.context")],
            1e-4,
        );
    }
    // A run's reference images (from tests/fixtures/flux2-edit), as `image` and the rest.
    let request = |run: &serde_json::Value| {
        let mut req = fixture_request(name, run, max_seq);
        let mut images = run["images"].as_array().into_iter().flatten().map(|p| {
            mmdit::output::read_png(&fixture("flux2-edit").join(p.as_str().unwrap()))
                .unwrap()
                .0
        });
        req.image = images.next();
        req.reference_images = images.collect();
        req
    };
    for (k, run) in meta["runs"].as_array().unwrap().iter().enumerate() {
        let req = request(run);
        let want = reference_image(&r, k);
        let out = pipe.generate(&req, &mut |_| {}).unwrap();
        let d = max_u8_diff(&out.image.data, &want);
        eprintln!("run {k}: within {d}/255");
        assert!(d <= 2, "run {k}: {d}/255");
    }
    let mut bf = mmdit::Spec::open(&m)
        .unwrap()
        .load(&device(), DType::BF16)
        .unwrap();
    for (k, run) in meta["runs"].as_array().unwrap().iter().enumerate() {
        let out = bf.generate(&request(run), &mut |_| {}).unwrap();
        let p = psnr(&out.image.data, &reference_image(&r, k));
        eprintln!("run {k} bf16: {p:.1} dB");
        assert!(p >= 30.0, "run {k} bf16: {p:.1} dB");
    }
}
