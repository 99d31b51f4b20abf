//! Parity with diffusers 0.42.1 on tiny random pipelines of every family: SD3 (fixtures from
//! scripts/make_sd3_fixtures.py), FLUX.1 (scripts/make_flux_fixtures.py) and Chroma
//! (scripts/make_chroma_fixtures.py, with the attention mask as booleans: see that script) and
//! FLUX.2 [klein] (scripts/make_flux2_fixtures.py). One harness runs each
//! check over every fixture through the generic pipeline; only the transformer's inputs differ by
//! family. Tolerances (issue 2): embeddings and transformer max abs diff <= 1e-4 x max |reference|;
//! Flux packing exact; sigmas within 1e-6; final 8-bit image within 2/255; bf16 images at least
//! 30 dB PSNR against diffusers' f32 images.

mod common;

use candle_core::{DType, Tensor};
use common::*;
use mmdit::mmdit::flux::{pack, unpack};
use mmdit::mmdit::modulation::RemembersSteps;
use mmdit::mmdit::{ChromaTransformer, Flux2Transformer, FluxTransformer, Sd3Transformer, Text};
use mmdit::{ModelRef, Pipeline, Request, Spec};

const REL: f32 = 1e-4;

/// The fixtures, each with its family.
const FIXTURES: [(&str, Family); 9] = [
    ("sd3-dummy", Family::Sd3),
    ("sd35-tiny", Family::Sd3),
    ("sd3-no-t5", Family::Sd3),
    ("flux-dummy", Family::Flux),
    ("flux-schnell-tiny", Family::Flux),
    ("flux-dev-tiny", Family::Flux),
    ("chroma-tiny", Family::Chroma),
    ("flux2-klein-tiny", Family::Flux2),
    ("flux2-klein-distilled-tiny", Family::Flux2),
];

#[derive(Clone, Copy, PartialEq)]
enum Family {
    Sd3,
    Flux,
    Chroma,
    Flux2,
}

impl Family {
    /// The reference key of an encoder's token ids in the fixture.
    fn ids_key(self, encoder: &str) -> &'static str {
        match (self, encoder) {
            (Family::Sd3, "CLIP-L") => "ids_l",
            (Family::Sd3, "CLIP-G") => "ids_g",
            (Family::Flux, "CLIP-L") => "ids_clip",
            (_, "T5") => "ids_t5",
            (Family::Flux2, "Qwen3") => "ids_qwen",
            (_, e) => panic!("no reference ids for {e}"),
        }
    }
}

/// Every step's modulation computed ahead, one product per layer for all the steps
/// (`remember_steps`, as the pipeline runs them), gives each step the values of the step's own
/// products (bit for bit on the CPU), in f32 and bf16, for SD3 (MMDiT-X's three triples
/// included), Flux (with guidance) and FLUX.2 (its shared modulations); the layers keep the
/// products until `forget_steps`.
#[test]
fn remembered_step_modulations_equal_each_steps_own() {
    let values = |t: Tensor| -> Vec<f32> {
        let v = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        v.to_vec1::<f32>().unwrap()
    };
    let ts = [1000.0f32, 750.5, 3.25];
    let token = 1 << 40;
    for (name, family) in FIXTURES {
        for dtype in [DType::F32, DType::BF16] {
            let m = ModelRef::parse(fixture(name).to_str().unwrap(), None).unwrap();
            let pipe = Spec::open(&m).unwrap().load(&device(), dtype).unwrap();
            let r = reference(name);
            let at = |k: &str| r[k].to_dtype(dtype).unwrap();
            let steps: Steps = match family {
                Family::Sd3 => {
                    let t = pipe.transformer_as::<Sd3Transformer>().unwrap();
                    let (x, ctx) = (at("transformer.x"), at("transformer.context"));
                    let pooled = at("transformer.pooled");
                    Steps {
                        embs: t.remember_steps(token, &ts, &pooled).unwrap().unwrap(),
                        run: Box::new(move |s, temb| {
                            let tt = Tensor::full(s, x.dim(0).unwrap(), &device()).unwrap();
                            let text = Text::Encoded(&ctx);
                            let out = t.forward_cached(&x, &tt, text, &pooled, temb, None);
                            values(out.unwrap())
                        }),
                        kept: Box::new(|e| t.steps_remembered(e)),
                        forget: Box::new(|| t.forget_steps(token)),
                    }
                }
                Family::Flux => {
                    let t = pipe.transformer_as::<FluxTransformer>().unwrap();
                    let (_, _, h, w) = r["pack.latents"].dims4().unwrap();
                    let (x, ctx) = (at("pack.packed"), at("transformer.context"));
                    let pooled = at("transformer.pooled");
                    let rope = t.rope(ctx.dim(1).unwrap(), h / 2, w / 2, None, &device());
                    let (rope, b, g) = (rope.unwrap(), x.dim(0).unwrap(), 3.5f32);
                    let embs = t.remember_steps(token, &ts, Some(g), &pooled, dtype);
                    Steps {
                        embs: embs.unwrap().unwrap(),
                        run: Box::new(move |s, temb| {
                            let sigma = Tensor::full(s / 1000.0, b, &device()).unwrap();
                            let g = Tensor::full(g, b, &device()).unwrap();
                            let text = Text::Encoded(&ctx);
                            let out = t.forward_cached(
                                &x,
                                &sigma,
                                Some(&g),
                                text,
                                &pooled,
                                temb,
                                &rope,
                                None,
                            );
                            values(out.unwrap())
                        }),
                        kept: Box::new(|e| t.steps_remembered(e)),
                        forget: Box::new(|| t.forget_steps(token)),
                    }
                }
                Family::Flux2 => {
                    let t = pipe.transformer_as::<Flux2Transformer>().unwrap();
                    let lat = &r["pack.latents"];
                    let (b, c, h, w) = lat.dims4().unwrap();
                    let ctx = at("transformer.context");
                    let rope = t.rope(ctx.dim(1).unwrap(), h, w, &[], &device()).unwrap();
                    let x = lat.reshape((b, c, h * w)).unwrap().transpose(1, 2).unwrap();
                    let x = x.contiguous().unwrap().to_dtype(dtype).unwrap();
                    let g = t.config().guidance_embeds.then_some(4.0f32);
                    let embs = t.remember_steps(token, &ts, g, (b, dtype), &device());
                    Steps {
                        embs: embs.unwrap().unwrap(),
                        run: Box::new(move |s, temb| {
                            let sigma = Tensor::full(s / 1000.0, b, &device()).unwrap();
                            let g = g.map(|g| Tensor::full(g, b, &device()).unwrap());
                            let text = Text::Encoded(&ctx);
                            let out =
                                t.forward_cached(&x, &sigma, g.as_ref(), text, temb, &rope, None);
                            values(out.unwrap())
                        }),
                        kept: Box::new(|e| t.steps_remembered(e)),
                        forget: Box::new(|| t.forget_steps(token)),
                    }
                }
                _ => continue,
            };
            let kept: Vec<bool> = steps.embs.iter().map(|e| (steps.kept)(e)).collect();
            assert_eq!(
                kept,
                vec![true; ts.len()],
                "{name} {dtype:?}: not every step kept"
            );
            for (i, (&t, e)) in ts.iter().zip(&steps.embs).enumerate() {
                let (a, b) = ((steps.run)(t, None), (steps.run)(t, Some(e)));
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                if device().is_cpu() {
                    // The CPU kernels' rows do not depend on the rows beside them.
                    assert!(bits(&a) == bits(&b), "{name} {dtype:?} step {i}: differs");
                } else {
                    // A GPU's library may choose another algorithm for more rows.
                    let tol = if dtype == DType::F32 { REL } else { 3e-2 };
                    let top = a.iter().fold(0f32, |m, x| m.max(x.abs()));
                    let diff = a
                        .iter()
                        .zip(&b)
                        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                    assert!(
                        diff <= tol * top,
                        "{name} {dtype:?} step {i}: {diff} of {top}"
                    );
                }
            }
            (steps.forget)();
            assert!(
                !(steps.kept)(&steps.embs[0]),
                "{name}: kept after forget_steps"
            );
        }
    }
}

/// A model's remembered steps for the test above: the step embeddings, a step's output (at a
/// timestep, with its remembered embedding or none), whether an embedding's products are kept,
/// and dropping them.
struct Steps<'a> {
    embs: Vec<Tensor>,
    #[allow(clippy::type_complexity)]
    run: Box<dyn Fn(f32, Option<&Tensor>) -> Vec<f32> + 'a>,
    kept: Box<dyn Fn(&Tensor) -> bool + 'a>,
    forget: Box<dyn Fn() + 'a>,
}

fn load(name: &str) -> Pipeline {
    let m = ModelRef::parse(fixture(name).to_str().unwrap(), None).unwrap();
    Spec::open(&m).unwrap().load(&device(), DType::F32).unwrap()
}

fn ids(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect()
}

/// The fixture's prompts and T5 length.
fn prompts(name: &str) -> (Vec<String>, usize) {
    let meta = meta(name);
    let max_seq = meta["max_sequence_length"].as_u64().unwrap() as usize;
    let p = meta["prompts"].as_array().unwrap();
    (
        p.iter().map(|p| p.as_str().unwrap().to_string()).collect(),
        max_seq,
    )
}

#[test]
fn token_ids_match_transformers() {
    for (name, family) in FIXTURES {
        let mut pipe = load(name);
        let r = reference(name);
        let (prompts, max_seq) = prompts(name);
        let text = pipe.text_encoders().unwrap();
        for (i, p) in prompts.iter().enumerate() {
            for (encoder, tok) in text.tokenizers() {
                let len = if encoder == "T5" || encoder == "Qwen3" {
                    max_seq
                } else {
                    77
                };
                let key = format!("text.{i}.{}", family.ids_key(encoder));
                // Qwen3 reads the prompt as a chat message.
                let text = match encoder {
                    "Qwen3" => tok.apply_chat_template(p).unwrap(),
                    _ => p.clone(),
                };
                assert_eq!(
                    tok.encode_padded(&text, len).unwrap().ids,
                    ids(&r[&key]),
                    "{name} {encoder} ids of {p:?}"
                );
            }
        }
    }
}

#[test]
fn text_embeddings_match_diffusers() {
    for (name, _) in FIXTURES {
        let mut pipe = load(name);
        let r = reference(name);
        let (prompts, max_seq) = prompts(name);
        for (i, p) in prompts.iter().enumerate() {
            let (c, _) = pipe.text_encoders().unwrap().encode(p, max_seq).unwrap();
            for (what, got) in [("context", &c.context), ("pooled", &c.pooled)] {
                let Some(want) = r.get(&format!("text.{i}.{what}")) else {
                    // Chroma has no pooled vector.
                    assert_eq!(got.elem_count(), 0, "{name} {what}[{i}]");
                    continue;
                };
                assert_close_rel(&format!("{name} {what}[{i}]"), got, want, REL);
            }
        }
    }
}

/// A generation's prompt and negative prompt go through the text encoders together (one batch
/// where the family's prompts share a length: SD3, FLUX.1); each conditioning equals encoding its
/// prompt alone, bit for bit on the CPU (every row of a product, norm and attention is computed
/// the same for any row count), in f32 and bf16, for every family.
#[test]
fn prompts_encoded_together_equal_each_alone() {
    let cpu = device().is_cpu();
    for (name, _) in FIXTURES {
        for dtype in [DType::F32, DType::BF16] {
            let m = ModelRef::parse(fixture(name).to_str().unwrap(), None).unwrap();
            let mut pipe = Spec::open(&m).unwrap().load(&device(), dtype).unwrap();
            let (mut prompts, max_seq) = prompts(name);
            prompts.push(String::new());
            let all: Vec<&str> = prompts.iter().map(String::as_str).collect();
            let text = pipe.text_encoders().unwrap();
            let (together, _) = text.encode_all(&all, max_seq).unwrap();
            assert_eq!(together.len(), all.len(), "{name}");
            for (p, t) in all.iter().zip(&together) {
                let (alone, _) = text.encode(p, max_seq).unwrap();
                for (what, got, want) in [
                    ("context", &t.context, &alone.context),
                    ("pooled", &t.pooled, &alone.pooled),
                ] {
                    let what = format!("{name} {dtype:?} {what} of {p:?}");
                    assert_eq!(got.dims(), want.dims(), "{what}");
                    match cpu {
                        true => assert_eq!(values(got), values(want), "{what}"),
                        false => assert_close_rel(&what, got, want, REL),
                    }
                }
            }
        }
    }
}

/// A tensor's values as f32, in order.
fn values(t: &Tensor) -> Vec<f32> {
    let t = t.to_dtype(DType::F32).unwrap();
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn transformer_matches_diffusers() {
    for (name, family) in FIXTURES {
        let pipe = load(name);
        let r = reference(name);
        let out = match family {
            Family::Sd3 => pipe
                .transformer_as::<Sd3Transformer>()
                .unwrap()
                .forward(
                    &r["transformer.x"],
                    &r["transformer.t"],
                    &r["transformer.context"],
                    &r["transformer.pooled"],
                )
                .unwrap(),
            Family::Flux => {
                let t = pipe.transformer_as::<FluxTransformer>().unwrap();
                let (_, _, h, w) = r["pack.latents"].dims4().unwrap();
                let ctx = &r["transformer.context"];
                let rope = t
                    .rope(ctx.dim(1).unwrap(), h / 2, w / 2, None, &device())
                    .unwrap();
                t.forward(
                    &r["pack.packed"],
                    &r["transformer.sigma"],
                    r.get("transformer.guidance"),
                    ctx,
                    &r["transformer.pooled"],
                    &rope,
                )
                .unwrap()
            }
            Family::Chroma => {
                let t = pipe.transformer_as::<ChromaTransformer>().unwrap();
                let (_, _, h, w) = r["pack.latents"].dims4().unwrap();
                let ctx = &r["transformer.context"];
                let rope = t
                    .rope(ctx.dim(1).unwrap(), h / 2, w / 2, &device())
                    .unwrap();
                t.forward(&r["pack.packed"], &r["transformer.sigma"], ctx, &rope)
                    .unwrap()
            }
            Family::Flux2 => {
                let t = pipe.transformer_as::<Flux2Transformer>().unwrap();
                let lat = &r["pack.latents"];
                let (b, c, h, w) = lat.dims4().unwrap();
                let ctx = &r["transformer.context"];
                let rope = t.rope(ctx.dim(1).unwrap(), h, w, &[], &device()).unwrap();
                let x = lat.reshape((b, c, h * w)).unwrap().transpose(1, 2).unwrap();
                t.forward(
                    &x.contiguous().unwrap(),
                    &r["transformer.sigma"],
                    None,
                    ctx,
                    &rope,
                )
                .unwrap()
            }
        };
        assert_close_rel(
            &format!("{name} transformer"),
            &out,
            &r["transformer.out"],
            REL,
        );
    }
}

#[test]
fn vae_decode_matches_diffusers() {
    for (name, _) in FIXTURES {
        let pipe = load(name);
        let r = reference(name);
        let out = pipe.vae.decode(&r["vae.z"]).unwrap();
        assert_close_rel(&format!("{name} vae"), &out, &r["vae.out"], REL);
    }
}

#[test]
fn images_match_diffusers_within_2_of_255() {
    for (name, _) in FIXTURES {
        let mut pipe = load(name);
        let r = reference(name);
        let (_, max_seq) = prompts(name);
        for (k, run) in meta(name)["runs"].as_array().unwrap().iter().enumerate() {
            let req = fixture_request(name, run, max_seq);
            let sched = pipe.spec.schedule(&pipe.spec.resolve(&req).unwrap());
            let ref_sigmas: Vec<f32> = r[&format!("run.{k}.sigmas")].to_vec1().unwrap();
            assert_eq!(sched.sigmas.len(), ref_sigmas.len());
            for (a, b) in sched.sigmas.iter().zip(&ref_sigmas) {
                assert!((a - b).abs() <= 1e-6, "{name} run {k}: sigma {a} vs {b}");
            }
            let out = pipe.generate(&req, &mut |_| {}).unwrap();
            let worst = max_u8_diff(&out.image.data, &reference_image(&r, k));
            println!("{name} run {k}: image max diff {worst}/255");
            assert!(worst <= 2, "{name} run {k}: image differs by {worst}/255");
        }
    }
}

/// bf16 (the GPU default) against diffusers' f32 images: PSNR at least 30 dB (issue 9).
#[test]
fn bf16_images_within_30_db_of_diffusers_f32() {
    for (name, _) in FIXTURES {
        for p in bf16_psnr(name) {
            assert!(p >= 30.0, "{name}: bf16 image PSNR {p:.1} dB < 30 dB");
        }
    }
}

#[test]
fn long_prompts_report_dropped_tokens() {
    for (name, _) in FIXTURES {
        let mut pipe = load(name);
        let long = "a photo of a cat sitting on a red sofa, ".repeat(12);
        let text = pipe.text_encoders().unwrap();
        let (_, cut) = text.encode(&long, 16).unwrap();
        let names: Vec<&str> = cut.iter().map(|t| t.encoder).collect();
        let want: Vec<&str> = text.tokenizers().iter().map(|t| t.0).collect();
        assert_eq!(names, want, "{name}: every encoder cut the prompt");
        assert!(cut.iter().all(|t| t.dropped > 0));
        assert!(text.encode("a cat", 16).unwrap().1.is_empty());
    }
}

#[test]
fn flux_packing_matches_and_round_trips() {
    for (name, family) in FIXTURES {
        if matches!(family, Family::Sd3 | Family::Flux2) {
            continue;
        }
        let r = reference(name);
        let lat = &r["pack.latents"];
        let (_, _, h, w) = lat.dims4().unwrap();
        let packed = pack(lat).unwrap();
        assert_eq!(max_diff(&packed, &r["pack.packed"]).0, 0.0, "{name} pack");
        assert_eq!(
            max_diff(&unpack(&packed, h, w).unwrap(), lat).0,
            0.0,
            "{name} unpack"
        );
    }
}

#[test]
fn schnell_ignores_guidance_with_a_notice_and_refuses_odd_sizes() {
    let pipe = load("flux-schnell-tiny");
    let r = pipe
        .resolve(&Request {
            prompt: "x".into(),
            guidance: Some(5.0),
            ..Default::default()
        })
        .unwrap();
    assert!(
        r.notices.iter().any(|n| n.to_string().contains("ignored")),
        "{:?}",
        r.notices
    );
    assert_eq!(r.steps, 4);
    let e = pipe
        .resolve(&Request {
            prompt: "x".into(),
            width: Some(30),
            ..Default::default()
        })
        .unwrap_err();
    assert!(e.to_string().starts_with("width 30:"), "{e}");
    assert!(e.to_string().contains("28 or 32"), "{e}");
}

/// Issue 4: a CLIP tokenizer folder with only the slow tokenizer's vocab.json + merges.txt (as in the
/// SD3 and Flux Hub repos) gives transformers' ids, like tokenizer.json does.
#[test]
fn clip_tokenizer_from_vocab_and_merges_matches_transformers() {
    let name = "sd3-dummy";
    let dir = copy_fixture(name, "vocab-merges");
    let r = reference(name);
    let (prompts, _) = prompts(name);
    for (sub, key) in [("tokenizer", "ids_l"), ("tokenizer_2", "ids_g")] {
        let d = dir.join(sub);
        let tj: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("tokenizer.json")).unwrap())
                .unwrap();
        std::fs::write(
            d.join("vocab.json"),
            serde_json::to_string(&tj["model"]["vocab"]).unwrap(),
        )
        .unwrap();
        let merges: Vec<String> = tj["model"]["merges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| match m {
                serde_json::Value::String(s) => s.clone(),
                m => format!("{} {}", m[0].as_str().unwrap(), m[1].as_str().unwrap()),
            })
            .collect();
        std::fs::write(
            d.join("merges.txt"),
            format!("#version: 0.2\n{}\n", merges.join("\n")),
        )
        .unwrap();
        std::fs::remove_file(d.join("tokenizer.json")).unwrap();
        let tok = mmdit::text::TextTokenizer::from_dir(&d).unwrap();
        for (i, p) in prompts.iter().enumerate() {
            let got = tok.encode_padded(p, 77).unwrap();
            assert_eq!(got.ids, ids(&r[&format!("text.{i}.{key}")]), "{sub}: {p}");
        }
    }
    // The whole pipeline opens and encodes from those folders.
    let m = ModelRef::Folder(dir);
    let mut pipe = Spec::open(&m).unwrap().load(&device(), DType::F32).unwrap();
    pipe.text_encoders()
        .unwrap()
        .encode("a red circle", 16)
        .unwrap();
}

/// Issue 20: bf16 attention on the test device (on CUDA cuDNN's fused attention, where cuDNN runs
/// the shape) against the f32 attention of the same bf16 values, composed on the CPU: the models'
/// head dims (64: SD3; 128: FLUX.1), token counts that are no multiple of a tile, keys longer than
/// the queries, and q as `split_heads` leaves a head-split view (strided, not copied). Tolerance:
/// max abs diff <= 2e-2 x max |reference| (bf16 probabilities and output; a wrong layout is off by
/// the whole value).
#[test]
fn bf16_attention_on_the_device_matches_f32_attention() {
    use candle_core::Device;
    let dev = device();
    let cpu = Device::Cpu;
    for (i, &(b, h, n, m, d)) in [(2, 3, 333, 333, 64), (1, 4, 77, 300, 128)]
        .iter()
        .enumerate()
    {
        let rand = |shape: &[usize], seed: u64| {
            let count = shape.iter().product::<usize>();
            let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let values: Vec<f32> = (0..count)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
                })
                .collect();
            Tensor::from_vec(values, shape, &cpu)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap()
        };
        // q as (b, n, h·d) split into a (b, h, n, d) view; k and v head-major and contiguous.
        let q = rand(&[b, n, h * d], 3 * i as u64 + 1)
            .reshape((b, n, h, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        let k = rand(&[b, h, m, d], 3 * i as u64 + 2);
        let v = rand(&[b, h, m, d], 3 * i as u64 + 3);
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let scores = (f(&q)
            .contiguous()
            .unwrap()
            .matmul(&f(&k).t().unwrap())
            .unwrap()
            / (d as f64).sqrt())
        .unwrap();
        let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        let want = probs.matmul(&f(&v)).unwrap();
        let on = |t: &Tensor| t.to_device(&dev).unwrap();
        let got = mmdit::nn::sdpa(&on(&q), &on(&k), &on(&v))
            .unwrap()
            .to_device(&cpu)
            .unwrap();
        assert_eq!(got.dims(), [b, h, n, d]);
        let (err, max) = max_diff(&f(&got), &want);
        println!(
            "attention ({b}, {h}, {n}, {m}, {d}) bf16 on {dev:?}: max abs diff {err:.3e}, max |ref| {max:.3e}, ratio {:.3e} (tolerance 2e-2)",
            err / max
        );
        assert!(
            err <= 2e-2 * max,
            "({b}, {h}, {n}, {m}, {d}): {err} vs {max}"
        );
    }
}
