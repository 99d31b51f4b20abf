//! Issue 18: GGUF models as stable-diffusion.cpp and ComfyUI-GGUF run them.
//! - Two 256-wide GGUF models (scripts/make_gguf_fixtures.py: FLUX.1-dev in BFL names, SD3.5 in SAI
//!   names under `model.diffusion_model.`) hold every type (Q8_0, Q6_K, Q5_K, Q5_1, Q5_0, Q4_K,
//!   Q4_1, Q4_0, Q3_K, Q2_K, F16, BF16, F32). Every tensor dequantizes bit for bit as the `gguf`
//!   package does (SHA-256 of the f32 values).
//! - Dequantized at load (`--dequantize`), both draw diffusers' images from the same file
//!   (`GGUFQuantizationConfig`, f32) within 2/255; computed on the blocks, within the PSNR floor
//!   below, with the blocks actually used.
//! - Damaged and foreign files are refused by name before anything is loaded.

mod common;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use common::*;
use mmdit::loader::gguf::GgufFile;
use mmdit::{ModelRef, Spec};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

const MODELS: [&str; 2] = ["flux-dev-256", "sd35-256"];

fn gguf_path(name: &str) -> PathBuf {
    fixture("gguf").join(name).join(format!("{name}.gguf"))
}

fn model(name: &str) -> ModelRef {
    ModelRef::SingleFile {
        file: gguf_path(name),
        components: Some(Box::new(ModelRef::Folder(fixture("gguf").join(name)))),
    }
}

#[test]
fn every_tensor_dequantizes_as_the_gguf_package_does() {
    for name in MODELS {
        let want = read_json(fixture("gguf").join(name).join("dequant.json"));
        let want = want.as_object().unwrap();
        let g = GgufFile::open(&gguf_path(name)).unwrap();
        assert_eq!(g.tensors.len(), want.len());
        let mut types = std::collections::BTreeSet::new();
        for (key, t) in &g.tensors {
            let w = &want[key];
            let v: Vec<f32> = g
                .dequantized(key)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            let hex: String = Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(hex, w["sha256"].as_str().unwrap(), "{name}: {key}");
            let shape: Vec<usize> = w["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(t.shape, shape, "{name}: {key}");
            let tn = mmdit::loader::gguf::type_name(t.dtype);
            assert_eq!(tn, w["type"].as_str().unwrap(), "{name}: {key}");
            types.insert(tn);
        }
        println!("{name}: {} tensors, types {types:?}", g.tensors.len());
        assert_eq!(types.len(), 13, "{name}: every type");
    }
}

/// Every recorded run of a fixture, on a pipeline loaded from its GGUF file.
fn images(name: &str, dequantize: bool) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut spec = Spec::open(&model(name)).unwrap();
    spec.set_dequantize(dequantize);
    let mut pipe = spec.load(&device(), DType::F32).unwrap();
    let r = reference(&format!("gguf/{name}"));
    let meta = meta(&format!("gguf/{name}"));
    let max_seq = meta["max_sequence_length"].as_u64().unwrap() as usize;
    let mut out = Vec::new();
    for (k, run) in meta["runs"].as_array().unwrap().iter().enumerate() {
        let req = fixture_request(&format!("gguf/{name}"), run, max_seq);
        let got = pipe.generate(&req, &mut |_| {}).unwrap().image.data;
        out.push((got, reference_image(&r, k)));
    }
    out
}

#[test]
fn dequantized_gguf_models_draw_diffusers_images() {
    for name in MODELS {
        for (k, (got, want)) in images(name, true).iter().enumerate() {
            let worst = max_u8_diff(got, want);
            println!("{name} run {k}: dequantized image max diff {worst}/255");
            assert!(worst <= 2, "{name} run {k}: {worst}/255");
        }
    }
}

/// Computed on the blocks, the activations are quantized to 8-bit blocks (Q8_0 / Q8_K) for the
/// integer dot products: the images stay within 30 dB of diffusers' (which dequantizes the
/// weights and computes in f32), the bf16 floor.
#[test]
fn gguf_models_computed_on_their_blocks_stay_within_the_bf16_floor() {
    for name in MODELS {
        let spec = Spec::open(&model(name)).unwrap();
        let (count, bytes) = spec.stored_blocks().unwrap().expect("quantized tensors");
        println!("{name}: {count} tensors in blocks, {bytes} bytes");
        let listing = read_json(fixture("gguf").join(name).join("dequant.json"));
        let quantized = listing
            .as_object()
            .unwrap()
            .values()
            .filter(|t| t["type"].as_str().unwrap().starts_with('Q'))
            .count();
        assert_eq!(count, quantized, "{name}");
        let exact = images(name, true);
        for (k, (got, want)) in images(name, false).iter().enumerate() {
            let p = psnr(got, want);
            println!("{name} run {k}: image on the blocks, PSNR {p:.1} dB against diffusers");
            assert!(p >= 30.0, "{name} run {k}: {p:.1} dB");
            assert_ne!(got, &exact[k].0, "{name} run {k}: the blocks were not used");
        }
    }
}

/// A LoRA on a GGUF model goes to the run-time path (blocks cannot be merged into) and matches
/// the same LoRA on the dequantized model (merged there): a kohya LoRA, and a PEFT DoRA (whose
/// factors the run-time path reads from the file's weights).
#[test]
fn a_lora_applies_to_a_gguf_model_at_run_time() {
    let dir = tmp("gguf_lora");
    let dev = Device::Cpu;
    let randn = |shape: (usize, usize)| Tensor::randn(0f32, 0.5, shape, &dev).unwrap();
    // kohya names on two quantized layers (Q types) and one F32 layer (img_in).
    let mut kohya = std::collections::HashMap::new();
    for (module, (inp, out)) in [
        ("lora_unet_double_blocks_0_img_attn_proj", (256, 256)),
        ("lora_unet_single_blocks_0_linear2", (1280, 256)),
        ("lora_unet_img_in", (16, 256)),
    ] {
        kohya.insert(format!("{module}.lora_down.weight"), randn((4, inp)));
        kohya.insert(format!("{module}.lora_up.weight"), randn((out, 4)));
        kohya.insert(format!("{module}.alpha"), Tensor::new(4f32, &dev).unwrap());
    }
    // The same layers in diffusers' names, with DoRA magnitudes (0.5 to 1.5 per row).
    let mut dora = std::collections::HashMap::new();
    for (module, (inp, out)) in [
        ("transformer.transformer_blocks.0.attn.to_out.0", (256, 256)),
        (
            "transformer.single_transformer_blocks.0.proj_out",
            (1280, 256),
        ),
        ("transformer.x_embedder", (16, 256)),
    ] {
        dora.insert(format!("{module}.lora_A.weight"), randn((4, inp)));
        dora.insert(format!("{module}.lora_B.weight"), randn((out, 4)));
        let m = Tensor::rand(0.5f32, 1.5, out, &dev).unwrap();
        dora.insert(format!("{module}.lora_magnitude_vector"), m);
    }
    let name = "flux-dev-256";
    let meta = meta(&format!("gguf/{name}"));
    let run = &meta["runs"][0];
    let plain = images(name, false).remove(0).0;
    for (file, tensors) in [("kohya", kohya), ("dora", dora)] {
        let lora = dir.join(format!("{file}.safetensors"));
        candle_core::safetensors::save(&tensors, &lora).unwrap();
        let spec = mmdit::lora::LoraSpec {
            source: lora.display().to_string(),
            scale: 1.0,
        };
        let req = mmdit::Request {
            loras: vec![spec.clone()],
            ..fixture_request(&format!("gguf/{name}"), run, 24)
        };
        let mut imgs = Vec::new();
        for dequantize in [false, true] {
            let mut s = Spec::open(&model(name)).unwrap();
            s.set_dequantize(dequantize);
            let set = s.fit_loras(std::slice::from_ref(&spec)).unwrap();
            let mut pipe = s
                .load_with(&device(), DType::F32, set, mmdit::lora::Apply::Merge)
                .unwrap();
            imgs.push(pipe.generate(&req, &mut |_| {}).unwrap().image.data);
        }
        let p = psnr(&imgs[0], &imgs[1]);
        println!("{file} LoRA on the blocks against it on the dequantized model: {p:.1} dB");
        assert!(p >= 30.0, "{file}: {p:.1} dB");
        assert_ne!(imgs[0], plain, "{file}: the LoRA changed nothing");
    }
}

// ---- damaged and foreign files ----

/// A GGUF file written with candle's writer: `arch` (if any) and the tensors.
fn write(path: &Path, arch: Option<&str>, tensors: &[(&str, &QTensor)]) {
    let mut f = std::fs::File::create(path).unwrap();
    let a = arch.map(|a| Value::String(a.into()));
    let meta: Vec<(&str, &Value)> = a.iter().map(|v| ("general.architecture", v)).collect();
    gguf_file::write(&mut f, &meta, tensors).unwrap();
}

fn refs(all: &[(String, QTensor)]) -> Vec<(&str, &QTensor)> {
    all.iter().map(|(n, q)| (n.as_str(), q)).collect()
}

/// The flux fixture's tensors, as blocks.
fn flux_tensors() -> Vec<(String, QTensor)> {
    let g = GgufFile::open(&gguf_path("flux-dev-256")).unwrap();
    g.tensors
        .iter()
        .map(|(k, t)| (k.clone(), g.blocks(k, &[(0, t.shape[0])]).unwrap()))
        .collect()
}

fn generate(file: &Path) -> (Option<i32>, String) {
    let c = fixture("gguf/flux-dev-256");
    run(&[
        "generate".as_ref(),
        "--prompt".as_ref(),
        "x".as_ref(),
        "--steps".as_ref(),
        "1".as_ref(),
        "--model".as_ref(),
        file.as_os_str(),
        "--components".as_ref(),
        c.as_os_str(),
        "--output".as_ref(),
        file.with_extension("png").as_os_str(),
    ])
}

/// A one-tensor file (`t`, F32, 4 values, no metadata) for byte-level damage: the tensor count is
/// at 8, the metadata count at 16, the tensor's dimension count at 33, its dimension at 37, its
/// type at 45. Written in `test`'s own folder: tests run in parallel, and `tmp` clears a folder
/// another test may be writing in.
fn small(test: &str) -> Vec<u8> {
    let p = tmp(&format!("{test}_small")).join("small.gguf");
    let q = QTensor::quantize(
        &Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    write(&p, None, &[("t", &q)]);
    std::fs::read(p).unwrap()
}

fn damaged(test: &str, edit: impl FnOnce(&mut Vec<u8>)) -> (Option<i32>, String) {
    let mut b = small(test);
    edit(&mut b);
    let p = tmp(test).join("model.gguf");
    std::fs::write(&p, &b).unwrap();
    let out = generate(&p);
    assert!(
        !p.with_extension("png").exists(),
        "{test}: an image was written"
    );
    out
}

#[test]
fn a_file_that_is_not_gguf_is_named() {
    let (c, e) = damaged("gguf_magic", |b| b[..4].copy_from_slice(b"GGML"));
    assert_clean_error(c, &e, &["model.gguf", "not a GGUF file", "GGML"]);
}

#[test]
fn an_unsupported_gguf_version_is_named() {
    let (c, e) = damaged("gguf_version", |b| {
        b[4..8].copy_from_slice(&1u32.to_le_bytes())
    });
    assert_clean_error(c, &e, &["GGUF version 1 is not supported"]);
    let (c, e) = damaged("gguf_version9", |b| {
        b[4..8].copy_from_slice(&9u32.to_le_bytes())
    });
    assert_clean_error(c, &e, &["GGUF version 9 is not supported"]);
}

#[test]
fn a_truncated_header_is_named() {
    let (c, e) = damaged("gguf_truncated", |b| b.truncate(30));
    assert_clean_error(c, &e, &["declares 1 tensors", "truncated or damaged"]);
    // Cut inside the tensor listing of a real file.
    let p = tmp("gguf_truncated_listing").join("model.gguf");
    let b = std::fs::read(gguf_path("flux-dev-256")).unwrap();
    std::fs::write(&p, &b[..2000]).unwrap();
    let (c, e) = generate(&p);
    assert_clean_error(c, &e, &["truncated: ", "the file has 2000"]);
}

#[test]
fn tensor_data_past_the_end_is_named() {
    let (c, e) = damaged("gguf_past_end", |b| {
        let n = b.len();
        b.truncate(n - 24);
    });
    assert_clean_error(
        c,
        &e,
        &["tensor `t` lies past the end of the file", "incomplete"],
    );
}

#[test]
fn absurd_counts_and_sizes_are_refused_before_allocating() {
    let (c, e) = damaged("gguf_tensor_count", |b| {
        b[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes())
    });
    assert_clean_error(c, &e, &["declares 1099511627776 tensors"]);
    let (c, e) = damaged("gguf_meta_count", |b| {
        b[16..24].copy_from_slice(&u64::MAX.to_le_bytes())
    });
    assert_clean_error(c, &e, &["metadata entries"]);
    let (c, e) = damaged("gguf_dims", |b| {
        b[33..37].copy_from_slice(&9u32.to_le_bytes())
    });
    assert_clean_error(c, &e, &["tensor `t` has 9 dimensions"]);
    let (c, e) = damaged("gguf_dim", |b| {
        b[37..45].copy_from_slice(&u64::MAX.to_le_bytes())
    });
    assert_clean_error(
        c,
        &e,
        &["tensor `t` has dimensions", "more than any model has"],
    );
    let (c, e) = damaged("gguf_name_len", |b| {
        b[24..32].copy_from_slice(&(1u64 << 50).to_le_bytes())
    });
    assert_clean_error(c, &e, &["a tensor name is", "bytes long"]);
}

#[test]
fn iq_and_unknown_types_are_refused_by_name() {
    let (c, e) = damaged("gguf_iq", |b| {
        b[45..49].copy_from_slice(&16u32.to_le_bytes())
    });
    assert_clean_error(c, &e, &["tensor `t` is IQ2_XXS", "Q4_K"]);
    let (c, e) = damaged("gguf_unknown_type", |b| {
        b[45..49].copy_from_slice(&77u32.to_le_bytes())
    });
    assert_clean_error(c, &e, &["tensor `t` has GGML type id 77"]);
}

#[test]
fn a_text_model_or_another_architecture_is_refused() {
    let dir = tmp("gguf_arch");
    let q = QTensor::quantize(
        &Tensor::zeros(32, DType::F32, &Device::Cpu).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    for (arch, needle) in [
        ("llama", "GGUF text model (architecture llama)"),
        ("t5encoder", "GGUF text model (architecture t5encoder)"),
        ("sdxl", "is a GGUF sdxl model"),
    ] {
        let p = dir.join(format!("{arch}.gguf"));
        write(&p, Some(arch), &[("token_embd.weight", &q)]);
        let (c, e) = generate(&p);
        assert_clean_error(c, &e, &[needle]);
    }
    // The flux fixture's tensors labelled sd3.
    let p = dir.join("mislabelled.gguf");
    write(&p, Some("sd3"), &refs(&flux_tensors()));
    let (c, e) = generate(&p);
    assert_clean_error(c, &e, &["general.architecture = sd3", "flux model"]);
}

#[test]
fn a_missing_or_misshapen_tensor_is_named() {
    let dir = tmp("gguf_tensors");
    let all = flux_tensors();
    let p = dir.join("missing.gguf");
    let fewer: Vec<_> = refs(&all)
        .into_iter()
        .filter(|(k, _)| *k != "double_blocks.0.img_mlp.2.weight")
        .collect();
    write(&p, Some("flux"), &fewer);
    let (c, e) = generate(&p);
    assert_clean_error(c, &e, &["transformer_blocks.0.ff.net.2.weight", "missing"]);
    let p = dir.join("misshapen.gguf");
    let wrong = QTensor::quantize(
        &Tensor::zeros((256, 512), DType::F32, &Device::Cpu).unwrap(),
        GgmlDType::Q8_0,
    )
    .unwrap();
    let swapped: Vec<_> = refs(&all)
        .into_iter()
        .map(|(k, q)| match k {
            "double_blocks.0.img_mlp.2.weight" => (k, &wrong),
            _ => (k, q),
        })
        .collect();
    write(&p, Some("flux"), &swapped);
    let (c, e) = generate(&p);
    assert_clean_error(
        c,
        &e,
        &["transformer_blocks.0.ff.net.2.weight", "wrong shape"],
    );
}

/// A file candle's writer produced from the fixture's blocks reads back identically (the header
/// reader agrees with another writer, the data offsets with its alignment).
#[test]
fn a_rewritten_file_reads_back_the_same_blocks() {
    let p = tmp("gguf_rewrite").join("flux.gguf");
    let all = flux_tensors();
    write(&p, Some("flux"), &refs(&all));
    let g = GgufFile::open(&p).unwrap();
    for (k, q) in &all {
        let back = g.blocks(k, &[(0, q.shape().dims()[0])]).unwrap();
        assert_eq!(back.data().unwrap(), q.data().unwrap(), "{k}");
        assert_eq!(back.dtype(), q.dtype(), "{k}");
    }
}

// ---- mmdit convert ----

/// Converts a fixture's transformer to `t` and opens the file with the fixture as components.
fn converted(
    name: &str,
    t: GgmlDType,
    test: &str,
) -> (PathBuf, mmdit::pipeline::convert::Converted) {
    let out = tmp(test).join(format!("{name}.gguf"));
    let m = ModelRef::parse(fixture(name).to_str().unwrap(), None).unwrap();
    let mut calls = 0;
    let done = Spec::open(&m)
        .unwrap()
        .write_gguf(&out, t, &mut |_, _| calls += 1)
        .unwrap();
    assert!(calls > 0);
    (out, done)
}

fn single_of(file: &Path, components: &str) -> ModelRef {
    ModelRef::SingleFile {
        file: file.to_path_buf(),
        components: Some(Box::new(ModelRef::Folder(fixture(components)))),
    }
}

/// Every recorded run of `name` on `model`.
fn run_images(model: &ModelRef, name: &str) -> Vec<Vec<u8>> {
    let mut pipe = Spec::open(model)
        .unwrap()
        .load(&device(), DType::F32)
        .unwrap();
    let meta = meta(name);
    let max_seq = meta["max_sequence_length"].as_u64().unwrap() as usize;
    meta["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|run| {
            let req = fixture_request(name, run, max_seq);
            pipe.generate(&req, &mut |_| {}).unwrap().image.data
        })
        .collect()
}

/// Written at F32 in the original layout (fused q/k/v, FLUX.1's linear1, the swapped
/// modulations, Chroma's approximator) and read back, a transformer draws exactly the folder's
/// images. Chroma's files say `flux`, as ComfyUI-GGUF's do.
#[test]
fn convert_at_f32_reads_back_exactly() {
    for name in [
        "flux-dev-tiny",
        "sd35-tiny",
        "sd3-dummy",
        "chroma-tiny",
        "flux2-klein-tiny",
    ] {
        let (out, done) = converted(name, GgmlDType::F32, &format!("convert_f32_{name}"));
        assert_eq!(done.types.len(), 1, "{name}: {:?}", done.types);
        let g = GgufFile::open(&out).unwrap();
        let want = if name.starts_with("flux2") {
            "flux2"
        } else if name.starts_with("flux") || name.starts_with("chroma") {
            "flux"
        } else {
            "sd3"
        };
        assert_eq!(g.architecture(), Some(want));
        assert!(
            g.tensors.keys().all(|k| !k.starts_with("model.")),
            "no prefix"
        );
        let folder = ModelRef::parse(fixture(name).to_str().unwrap(), None).unwrap();
        assert_eq!(
            run_images(&single_of(&out, name), name),
            run_images(&folder, name),
            "{name}"
        );
    }
}

/// Q8_0 and Q4_K files: the 2-D weights in blocks (Q4_K falling back to Q5_0 where rows are not
/// whole 256-blocks), 1-D tensors and FLUX.1's embedders and final layer F32; the images within
/// 30 dB of diffusers' f32 images.
#[test]
fn converted_files_keep_the_layers_comfyui_keeps_and_draw_close_images() {
    for (t, name) in [
        (GgmlDType::Q8_0, "flux-dev-tiny"),
        (GgmlDType::Q4K, "flux-dev-tiny"),
        (GgmlDType::Q8_0, "sd35-tiny"),
        (GgmlDType::Q8_0, "chroma-tiny"),
        (GgmlDType::Q8_0, "flux2-klein-tiny"),
    ] {
        let test = format!("convert_{t:?}_{name}");
        let (out, done) = converted(name, t, &test);
        println!("{name} {t:?}: {:?}, {} bytes", done.types, done.bytes);
        let g = GgufFile::open(&out).unwrap();
        for (k, info) in &g.tensors {
            let ty = mmdit::loader::gguf::type_name(info.dtype);
            let kept = [
                "time_in.",
                "txt_in.",
                "vector_in.",
                "img_in.",
                "guidance_in.",
                "final_layer.",
            ]
            .iter()
            .any(|p| k.starts_with(p));
            // A row narrower than a block (Chroma's tiny approximator input) cannot be quantized.
            let narrow = info.shape.last().is_some_and(|c| c % 32 != 0);
            if info.shape.len() != 2 || kept || narrow {
                assert_eq!(ty, "F32", "{k}");
            } else {
                assert!(ty.starts_with('Q'), "{k}: {ty}");
            }
        }
        let r = reference(name);
        for (k, img) in run_images(&single_of(&out, name), name).iter().enumerate() {
            let p = psnr(img, &reference_image(&r, k));
            println!("{name} {t:?} run {k}: {p:.1} dB against diffusers f32");
            assert!(p >= 30.0, "{name} {t:?} run {k}: {p:.1} dB");
        }
    }
}

/// A GGUF converted again to another type: the blocks of the first are dequantized and
/// quantized anew.
#[test]
fn a_gguf_model_converts_to_another_type() {
    let out = tmp("convert_gguf").join("q4_0.gguf");
    let done = Spec::open(&model("flux-dev-256"))
        .unwrap()
        .write_gguf(&out, GgmlDType::Q4_0, &mut |_, _| {})
        .unwrap();
    assert!(done.types.contains_key("Q4_0"), "{:?}", done.types);
    let g = GgufFile::open(&out).unwrap();
    assert_eq!(
        g.tensors.len(),
        GgufFile::open(&gguf_path("flux-dev-256"))
            .unwrap()
            .tensors
            .len()
    );
}

fn convert_cli(args: &[&std::ffi::OsStr]) -> (Option<i32>, String) {
    let mut all: Vec<&std::ffi::OsStr> = vec!["convert".as_ref()];
    all.extend_from_slice(args);
    run(&all)
}

#[test]
fn convert_refuses_bad_arguments_before_reading_weights() {
    let dir = tmp("convert_bad");
    let m = fixture("flux-dev-tiny");
    let out = dir.join("x.gguf");
    let (c, e) = convert_cli(&[
        m.as_os_str(),
        "--quantize".as_ref(),
        "iq4_xs".as_ref(),
        "-o".as_ref(),
        out.as_os_str(),
    ]);
    assert_clean_error(c, &e, &["--quantize iq4_xs: unknown", "q8_0"]);
    let bad = dir.join("x.safetensors");
    let (c, e) = convert_cli(&[
        m.as_os_str(),
        "--quantize".as_ref(),
        "q8_0".as_ref(),
        "-o".as_ref(),
        bad.as_os_str(),
    ]);
    assert_clean_error(c, &e, &["name the file .gguf"]);
    let nodir = dir.join("no/such/x.gguf");
    let (c, e) = convert_cli(&[
        m.as_os_str(),
        "--quantize".as_ref(),
        "q8_0".as_ref(),
        "-o".as_ref(),
        nodir.as_os_str(),
    ]);
    assert_clean_error(c, &e, &["does not exist"]);
    let src = gguf_path("flux-dev-256");
    let (c, e) = convert_cli(&[
        src.as_os_str(),
        "--quantize".as_ref(),
        "q8_0".as_ref(),
        "-o".as_ref(),
        src.as_os_str(),
        "--components".as_ref(),
        fixture("gguf/flux-dev-256").as_os_str(),
    ]);
    assert_clean_error(c, &e, &["is the model being converted"]);
    assert!(!out.exists() && !bad.exists());
}

/// A model whose weights fail part-way leaves no file and no partial file.
#[test]
fn a_failed_convert_leaves_nothing_behind() {
    let dir = copy_fixture("flux-dev-tiny", "convert_fail");
    // The transformer's weights cut short: the header is read, the data is not there.
    let w = dir.join("transformer/diffusion_pytorch_model.safetensors");
    let b = std::fs::read(&w).unwrap();
    std::fs::write(&w, &b[..b.len() / 2]).unwrap();
    let out = dir.join("out.gguf");
    let (c, e) = convert_cli(&[
        dir.as_os_str(),
        "--quantize".as_ref(),
        "q8_0".as_ref(),
        "-o".as_ref(),
        out.as_os_str(),
    ]);
    assert_clean_error(c, &e, &[]);
    assert!(!out.exists(), "{e}");
    assert!(!out.with_extension("gguf.partial").exists(), "{e}");
}

#[test]
fn inspect_shows_the_architecture_and_the_type_of_every_tensor_group() {
    let out = inspect_ok(&gguf_path("flux-dev-256"), &fixture("gguf/flux-dev-256"));
    for needle in [
        "gguf    version 3, architecture flux",
        "Q4_K x2",
        "double_blocks.*.img_attn.qkv.weight",
        "Q6_K x1",
        "format  BFL FLUX.1 single-file checkpoint",
        "all tensors match their configs",
    ] {
        assert!(out.contains(needle), "lacks {needle:?}:\n{out}");
    }
}

/// The README's table of GGUF sizes per real preset is what `mmdit convert` would write for each
/// shape manifest (tensor bytes), and its "fits" columns follow from them: the highest-precision
/// type whose transformer weights plus 1 GiB (activations at 1024x1024) fit in the memory.
#[test]
fn the_readme_gguf_size_table_is_computed_from_the_manifests() {
    use mmdit::pipeline::convert::{plan, planned_bytes};
    let types = [
        ("F16", GgmlDType::F16),
        ("Q8_0", GgmlDType::Q8_0),
        ("Q5_K", GgmlDType::Q5K),
        ("Q4_K", GgmlDType::Q4K),
    ];
    let mut table = String::from(
        "| preset | F16 GB | Q8_0 GB | Q5_K GB | Q4_K GB | 8 GB | 12 GB | 16 GB | 24 GB |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for model in REAL_MODELS {
        let m = read_json(fixture("manifests").join(format!("{model}.json")));
        let metas = manifest_tensors(&m["components"]["transformer"]);
        let format = real_format(model);
        let sizes: Vec<u64> = types
            .iter()
            .map(|(_, t)| planned_bytes(&plan(format, &metas, *t).unwrap().0))
            .collect();
        let mut row = format!("| `{model}` |");
        for s in &sizes {
            row += &format!(" {:.1} |", *s as f64 / 1e9);
        }
        for gib in [8u64, 12, 16, 24] {
            let fits = types
                .iter()
                .zip(&sizes)
                .find(|(_, s)| **s + (1 << 30) <= gib << 30)
                .map_or("–", |((n, _), _)| *n);
            row += &format!(" {fits} |");
        }
        table += &row;
        table += "\n";
    }
    println!("{table}");
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    assert!(
        readme.contains(&table),
        "README.md lacks this table (copy it in):\n{table}"
    );
}

/// `generate` from a GGUF file records the file, its components and `--dequantize` in the PNG, and
/// `--from` replays each image bit for bit.
#[test]
fn a_gguf_image_replays_from_its_png() {
    let dir = tmp("gguf_replay");
    let c = fixture("gguf/flux-dev-256");
    let mut images = Vec::new();
    for (name, extra) in [("blocks", None), ("dequantized", Some("--dequantize"))] {
        let out = dir.join(format!("{name}.png"));
        let mut cmd = mmdit();
        cmd.args([
            "generate", "--prompt", "a cat", "--steps", "2", "--width", "32", "--height", "32",
            "--seed", "5",
        ])
        .arg("--model")
        .arg(gguf_path("flux-dev-256"))
        .arg("--components")
        .arg(&c)
        .arg("--output")
        .arg(&out);
        cmd.args(extra);
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let again = dir.join(format!("{name}-again.png"));
        let o = mmdit()
            .arg("generate")
            .arg("--from")
            .arg(&out)
            .arg("--output")
            .arg(&again)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let a = std::fs::read(&out).unwrap();
        assert_eq!(a, std::fs::read(&again).unwrap(), "{name}: replay differs");
        images.push(a);
    }
    assert_ne!(images[0], images[1], "--dequantize changed nothing");
}

// ---- a GGUF T5 encoder (--t5) ----

/// sd35-tiny with its T5 from a GGUF file in llama.cpp's names (scripts/make_gguf_fixtures.py):
/// the prompt embeddings against diffusers' with that T5 (transformers on the `gguf` package's
/// dequantization): within 1e-4 x max dequantized, and within 2% of the largest value on the
/// blocks (activations quantized to 8 bits), which are used.
#[test]
fn a_gguf_t5_encoder_gives_diffusers_prompt_embeddings() {
    let dir = fixture("gguf/t5-tiny");
    let meta = read_json(dir.join("fixture.json"));
    let r = reference("gguf/t5-tiny");
    let max_seq = meta["max_sequence_length"].as_u64().unwrap() as usize;
    let folder = ModelRef::parse(fixture("sd35-tiny").to_str().unwrap(), None).unwrap();
    for (dequantize, rel) in [(true, 1e-4f32), (false, 2e-2)] {
        let mut spec = Spec::open(&folder).unwrap();
        spec.set_t5_file(&dir.join("t5-tiny.gguf")).unwrap();
        spec.set_dequantize(dequantize);
        let mut pipe = spec.load(&device(), DType::F32).unwrap();
        let mut plain = Spec::open(&folder)
            .unwrap()
            .load(&device(), DType::F32)
            .unwrap();
        for (i, p) in meta["prompts"].as_array().unwrap().iter().enumerate() {
            let p = p.as_str().unwrap();
            let (c, _) = pipe.text_encoders().unwrap().encode(p, max_seq).unwrap();
            let want = &r[&format!("text.{i}.context")];
            let (diff, max) = max_diff(&c.context, want);
            println!("dequantize {dequantize} prompt {i}: max diff {diff:.2e} of max {max:.2}");
            assert!(
                diff <= rel * max,
                "dequantize {dequantize} prompt {i}: {diff} > {rel} x {max}"
            );
            let (own, _) = plain.text_encoders().unwrap().encode(p, max_seq).unwrap();
            assert!(
                max_diff(&own.context, &c.context).0 > 0.0,
                "the file's T5 was not used"
            );
        }
    }
}

/// The model's own T5 weights given as a safetensors file draw the same images as the folder.
#[test]
fn a_safetensors_t5_file_replaces_the_models_t5() {
    let folder = ModelRef::parse(fixture("sd35-tiny").to_str().unwrap(), None).unwrap();
    let mut spec = Spec::open(&folder).unwrap();
    spec.set_t5_file(&fixture("sd35-tiny").join("text_encoder_3/model.safetensors"))
        .unwrap();
    let mut pipe = spec.load(&device(), DType::F32).unwrap();
    let meta = meta("sd35-tiny");
    let run = &meta["runs"][0];
    let req = fixture_request("sd35-tiny", run, 32);
    let got = pipe.generate(&req, &mut |_| {}).unwrap().image.data;
    assert_eq!(got, run_images(&folder, "sd35-tiny")[0]);
}

#[test]
fn a_t5_file_that_is_not_one_is_refused() {
    let dir = tmp("t5_bad");
    let m = fixture("sd35-tiny");
    let t5 = |f: &Path| {
        run(&[
            "generate".as_ref(),
            "--prompt".as_ref(),
            "x".as_ref(),
            "--model".as_ref(),
            m.as_os_str(),
            "--t5".as_ref(),
            f.as_os_str(),
            "--output".as_ref(),
            dir.join("o.png").as_os_str(),
        ])
    };
    let (c, e) = t5(&dir.join("none.gguf"));
    assert_clean_error(c, &e, &["--t5", "no such file"]);
    let txt = dir.join("t5.bin");
    std::fs::write(&txt, b"x").unwrap();
    let (c, e) = t5(&txt);
    assert_clean_error(c, &e, &["--t5", "as .gguf or .safetensors"]);
    let (c, e) = t5(&gguf_path("flux-dev-256"));
    assert_clean_error(c, &e, &["is a GGUF flux model, not a T5 encoder"]);
    // A CLIP's weights: no T5 layers.
    let (c, e) = t5(&m.join("text_encoder/model.safetensors"));
    assert_clean_error(c, &e, &["holds no T5 encoder layers"]);
    // Another T5's (flux-dev-tiny's, 32 wide): named by the audit.
    let (c, e) = t5(&fixture("flux-dev-tiny").join("text_encoder_2/model.safetensors"));
    assert_clean_error(c, &e, &["wrong shape"]);
    // A model without T5.
    let o = mmdit()
        .args(["generate", "--prompt", "x", "--model"])
        .arg(fixture("sd3-no-t5"))
        .arg("--t5")
        .arg(m.join("text_encoder_3/model.safetensors"))
        .arg("--output")
        .arg(dir.join("o.png"))
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_clean_error(
        o.status.code(),
        &e,
        &["--t5", "this model has no T5 encoder"],
    );
    assert!(!dir.join("o.png").exists());
}
