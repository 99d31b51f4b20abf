//! Step caching against diffusers (tests/fixtures/cache, scripts/make_cache_fixtures.py): the tiny
//! SD3.5 (batched CFG) and FLUX.1 [dev] (embedded guidance, and true CFG's two branches) pipelines
//! with first-block cache, TaylorSeer and TeaCache: the same calls computed and the same image.

mod common;

use candle_core::{DType, Tensor};
use common::{device, fixture, max_u8_diff, reference};
use mmdit::cache::{CacheSpec, CallKind};
use mmdit::{ModelRef, Pipeline, Request, Spec};
use std::collections::HashMap;

fn load(name: &str, dtype: DType) -> Pipeline {
    let m = ModelRef::parse(fixture(name).to_str().unwrap(), None).unwrap();
    Spec::open(&m).unwrap().load(&device(), dtype).unwrap()
}

fn request(run: &serde_json::Value, r: &HashMap<String, Tensor>) -> Request {
    let size = |k: &str| run[k].as_u64().map(|v| v as usize);
    Request {
        prompt: run["prompt"].as_str().unwrap().into(),
        negative_prompt: run["negative_prompt"].as_str().map(Into::into),
        true_cfg: run["true_cfg"].as_f64(),
        steps: size("steps"),
        guidance: run["guidance"].as_f64(),
        width: size("width"),
        height: size("height"),
        noise: Some(r[run["noise"].as_str().unwrap()].clone()),
        max_sequence_length: size("max_sequence_length"),
        cache: CacheSpec::parse(run["cache"].as_str().unwrap()).unwrap(),
        ..Default::default()
    }
}

#[test]
fn caches_compute_the_calls_diffusers_computes_and_draw_its_images() {
    let meta = common::meta("cache");
    let r = reference("cache");
    let mut pipes: HashMap<String, Pipeline> = HashMap::new();
    let runs = meta["runs"].as_array().unwrap();
    assert!(runs.len() >= 12, "every cache on both families");
    let mut skipped = 0;
    for (k, run) in runs.iter().enumerate() {
        let model = run["model"].as_str().unwrap();
        let pipe = pipes
            .entry(model.into())
            .or_insert_with(|| load(model, DType::F32));
        let what = format!("{model} {}", run["cache"]);
        let out = pipe.generate(&request(run, &r), &mut |_| {}).unwrap();
        let ours: Vec<Vec<bool>> = out
            .cache_calls
            .iter()
            .map(|b| b.iter().map(|&c| c == CallKind::Full).collect())
            .collect();
        let theirs: Vec<Vec<bool>> = serde_json::from_value(run["computed"].clone()).unwrap();
        assert_eq!(ours, theirs, "{what}: calls computed (per branch)");
        skipped += theirs.iter().flatten().filter(|c| !**c).count();
        let want: Vec<u8> = r[&format!("run.{k}.image")]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let d = max_u8_diff(&out.image.data, &want);
        eprintln!("{what}: {theirs:?} computed, image within {d}/255");
        assert!(d <= 2, "{what}: image differs by {d}/255");
    }
    assert!(skipped >= 30, "the fixtures cache some calls ({skipped})");
}

/// bf16 under a cache stays close to diffusers' f32 run of the same cache.
#[test]
fn caches_in_bf16_stay_within_30_db() {
    let meta = common::meta("cache");
    let r = reference("cache");
    let mut pipes: HashMap<String, Pipeline> = HashMap::new();
    for (k, run) in meta["runs"].as_array().unwrap().iter().enumerate() {
        let model = run["model"].as_str().unwrap();
        // TeaCache and first-block cache decide on thresholds: bf16 may decide otherwise, so only
        // TaylorSeer's fixed schedule is compared image to image.
        if !run["cache"].as_str().unwrap().starts_with("taylorseer") {
            continue;
        }
        let pipe = pipes
            .entry(model.into())
            .or_insert_with(|| load(model, DType::BF16));
        let out = pipe.generate(&request(run, &r), &mut |_| {}).unwrap();
        let want: Vec<u8> = r[&format!("run.{k}.image")]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let p = common::psnr(&out.image.data, &want);
        assert!(p >= 30.0, "{model} {}: {p:.1} dB", run["cache"]);
    }
}

/// A cache on a run too short to skip anything says so; a threshold of 0 computes every call and
/// draws the uncached image exactly.
#[test]
fn no_effect_is_said_and_threshold_zero_is_uncached() {
    let mut pipe = load("flux-dev-tiny", DType::F32);
    let base = Request {
        prompt: "a red circle".into(),
        steps: Some(2),
        width: Some(32),
        height: Some(32),
        seed: Some(3),
        ..Default::default()
    };
    for spec in ["fbcache:0.1", "teacache:0.5", "taylorseer:1:2"] {
        let r = pipe
            .resolve(&Request {
                cache: CacheSpec::parse(spec).unwrap(),
                ..base.clone()
            })
            .unwrap();
        let said: Vec<String> = r.notices.iter().map(|n| n.to_string()).collect();
        assert!(
            said.iter()
                .any(|n| n.contains("has no effect on a 2-step run")),
            "{spec}: {said:?}"
        );
    }
    let long = Request {
        steps: Some(8),
        ..base
    };
    let plain = pipe.generate(&long, &mut |_| {}).unwrap();
    for spec in ["fbcache:0", "teacache:0"] {
        let out = pipe
            .generate(
                &Request {
                    cache: CacheSpec::parse(spec).unwrap(),
                    ..long.clone()
                },
                &mut |_| {},
            )
            .unwrap();
        assert!(out.cache_calls[0].iter().all(|&c| c == CallKind::Full));
        assert_eq!(out.image.data, plain.image.data, "{spec}");
    }
}

/// Every family runs its blocks through the cache hooks: threshold 0 computes every call and draws
/// the uncached image exactly; a huge threshold skips every call but the warm-up and the last;
/// TaylorSeer predicts its calls in between. Chroma and FLUX.2 have no diffusers fixture (diffusers'
/// Chroma pipeline sets no cache context, and its first-block cache cannot run FLUX.2's single
/// blocks, which return the joint sequence).
#[test]
fn every_family_runs_under_each_cache() {
    for model in [
        "sd35-tiny",
        "flux-dev-tiny",
        "chroma-tiny",
        "flux2-klein-tiny",
    ] {
        let mut pipe = load(model, DType::F32);
        let base = Request {
            prompt: "a red circle".into(),
            steps: Some(6),
            width: Some(32),
            height: Some(48),
            seed: Some(5),
            ..Default::default()
        };
        let plain = pipe.generate(&base, &mut |_| {}).unwrap();
        let run = |pipe: &mut Pipeline, spec: &str| {
            pipe.generate(
                &Request {
                    cache: CacheSpec::parse(spec).unwrap(),
                    ..base.clone()
                },
                &mut |_| {},
            )
            .unwrap()
        };
        let kinds = |out: &mmdit::pipeline::Generated| -> String {
            out.cache_calls
                .iter()
                .map(|b| {
                    b.iter()
                        .map(|k| match k {
                            CallKind::Full => 'F',
                            CallKind::Partial => 'P',
                            CallKind::Predicted => '-',
                        })
                        .collect::<String>()
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        for spec in ["fbcache:0", "teacache:0"] {
            let out = run(&mut pipe, spec);
            assert!(
                !kinds(&out).contains('P'),
                "{model} {spec}: {}",
                kinds(&out)
            );
            assert_eq!(out.image.data, plain.image.data, "{model} {spec}");
        }
        let branches = plain_branches(&mut pipe, &base);
        for (spec, want) in [
            ("fbcache:1e9", "FPPPPF"),
            ("teacache:1e9:2", "FFPPPF"),
            ("taylorseer:1:2:2", "FF-F-F"),
        ] {
            let out = run(&mut pipe, spec);
            let want = vec![want; branches].join(" ");
            assert_eq!(kinds(&out), want, "{model} {spec}");
            assert_ne!(out.image.data, plain.image.data, "{model} {spec}");
            let p = common::psnr(&out.image.data, &plain.image.data);
            assert!(p.is_finite() && p > 5.0, "{model} {spec}: {p:.1} dB");
        }
    }
}

/// Guidance branches a request runs: two for two-call guidance, one otherwise.
fn plain_branches(pipe: &mut Pipeline, base: &Request) -> usize {
    let out = pipe
        .generate(
            &Request {
                cache: CacheSpec::parse("fbcache:0").unwrap(),
                steps: Some(3),
                ..base.clone()
            },
            &mut |_| {},
        )
        .unwrap();
    out.cache_calls.len()
}
