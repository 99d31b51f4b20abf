//! Issue 18: float8 safetensors (`float8_e4m3fn`, `float8_e5m2`, and ComfyUI's scaled fp8 with a
//! per-tensor `scale_weight`), from the fp8 twins of the single-file fixtures
//! (scripts/make_fp8_fixtures.py):
//! - every float8 weight widens to exactly the f32 values PyTorch's casts give (`w8.float() * s`);
//! - each twin draws diffusers' images from those widened weights within 2/255;
//! - the scales and the `scaled_fp8` marker are not reported as foreign tensors.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use mmdit::loader::weights::Safetensors;
use mmdit::{ModelRef, Spec};
use std::collections::HashMap;

const VARIANTS: [&str; 4] = [
    "flux-dev-tiny-e4m3fn",
    "flux-dev-tiny-e5m2",
    "flux-dev-tiny-e4m3fn-scaled",
    "sd35-tiny-e4m3fn-scaled",
];

fn dir(v: &str) -> std::path::PathBuf {
    fixture("fp8").join(v)
}

fn bits(t: &Tensor) -> Vec<u32> {
    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn float8_weights_widen_as_pytorch_casts_them() {
    for v in VARIANTS {
        let file = Safetensors::open(&[dir(v).join("model.safetensors")]).unwrap();
        let expected: HashMap<String, Tensor> =
            candle_core::safetensors::load(dir(v).join("expected.safetensors"), &Device::Cpu)
                .unwrap();
        for (k, want) in &expected {
            let got = file.load(k).unwrap();
            assert_eq!(got.dtype(), DType::F32, "{v}: {k}");
            assert_eq!(got.dims(), want.dims(), "{v}: {k}");
            assert_eq!(bits(&got), bits(want), "{v}: {k}");
        }
        println!(
            "{v}: {} float8 weights equal PyTorch's casts",
            expected.len()
        );
    }
}

#[test]
fn float8_twins_draw_diffusers_images() {
    for v in VARIANTS {
        let meta = read_json(dir(v).join("fixture.json"));
        let twin = meta["twin"].as_str().unwrap();
        let m = ModelRef::SingleFile {
            file: dir(v).join("model.safetensors"),
            components: Some(Box::new(ModelRef::Folder(fixture(twin)))),
        };
        let mut pipe = Spec::open(&m).unwrap().load(&device(), DType::F32).unwrap();
        let r = reference(&format!("fp8/{v}"));
        let max_seq = meta["max_sequence_length"].as_u64().unwrap() as usize;
        for (k, run) in meta["runs"].as_array().unwrap().iter().enumerate() {
            let req = fixture_request(twin, run, max_seq);
            let got = pipe.generate(&req, &mut |_| {}).unwrap().image.data;
            let worst = max_u8_diff(&got, &reference_image(&r, k));
            println!("{v} run {k}: image max diff {worst}/255");
            assert!(worst <= 2, "{v} run {k}: {worst}/255");
        }
    }
}

#[test]
fn inspect_accepts_the_scales_of_a_scaled_fp8_file() {
    let v = "flux-dev-tiny-e4m3fn-scaled";
    let out = inspect_ok(&dir(v).join("model.safetensors"), &fixture("flux-dev-tiny"));
    assert!(out.contains("F8_E4M3"), "{out}");
    assert!(!out.contains("unexpected"), "{out}");
}

/// A scale that is not one value is named, not applied.
#[test]
fn a_scale_of_more_than_one_value_is_refused() {
    let src = dir("flux-dev-tiny-e4m3fn-scaled").join("model.safetensors");
    let mut all = candle_core::safetensors::load(&src, &Device::Cpu).unwrap();
    all.insert(
        "img_in.scale_weight".into(),
        Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap(),
    );
    all.insert(
        "img_in.weight".into(),
        all["double_blocks.0.img_attn.proj.weight"].clone(),
    );
    let p = tmp("fp8_scale").join("bad.safetensors");
    candle_core::safetensors::save(&all, &p).unwrap();
    let file = Safetensors::open(&[p]).unwrap();
    let e = file.load("img_in.weight").unwrap_err().to_string();
    assert!(
        e.contains("img_in.scale_weight: a per-tensor scale has one value"),
        "{e}"
    );
}
