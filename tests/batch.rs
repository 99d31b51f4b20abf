//! Many images from one process: `generate --num-images N` and `mmdit batch` over a JSONL file
//! (sharded, resumed), each image equal to the single `generate` run with the same parameters.

mod common;

use common::{assert_clean_error, mmdit, tmp};
use std::path::Path;

fn pixels(p: &Path) -> Vec<u8> {
    mmdit::output::read_png(p).unwrap().0.data
}

fn generate(out: &Path, args: &[&str]) {
    common::run_demo(out, args);
}

#[test]
fn num_images_writes_numbered_files_with_consecutive_seeds() {
    let dir = tmp("num-images");
    let base = [
        "--prompt",
        "a red circle on a white background",
        "--steps",
        "3",
        "--width",
        "32",
        "--height",
        "32",
    ];
    let mut args = base.to_vec();
    args.extend(["--seed", "4", "--num-images", "3"]);
    generate(&dir.join("out.png"), &args);
    assert!(!dir.join("out.png").exists());
    for (k, seed) in [(1, "4"), (2, "5"), (3, "6")] {
        let one = dir.join(format!("one-{seed}.png"));
        let mut args = base.to_vec();
        args.extend(["--seed", seed]);
        generate(&one, &args);
        assert!(
            pixels(&dir.join(format!("out-{k}.png"))) == pixels(&one),
            "image {k}"
        );
    }
    // Every output is checked before the model loads.
    std::fs::write(dir.join("again-2.png"), b"x").unwrap();
    let (code, err) = common::run(&[
        "generate".as_ref(),
        "--prompt".as_ref(),
        "x".as_ref(),
        "--num-images".as_ref(),
        "2".as_ref(),
        "--output".as_ref(),
        dir.join("again.png").as_os_str(),
    ]);
    assert_clean_error(code, &err, &["again-2.png", "already exists"]);
    let (code, err) = common::run(&[
        "generate".as_ref(),
        "--prompt".as_ref(),
        "x".as_ref(),
        "--num-images".as_ref(),
        "0".as_ref(),
    ]);
    assert_clean_error(code, &err, &["--num-images 0"]);
}

fn batch(args: &[&str]) -> (Option<i32>, String) {
    let o = mmdit()
        .args(["batch", "--model", "demo"])
        .args(args)
        .output()
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Two shards of a JSONL file write every line once, by line number, each the `generate` image
/// of the line (seed: the line's, else its number); a rerun with --resume runs nothing, one
/// without refuses to overwrite.
#[test]
fn batch_shards_and_resumes_a_prompt_list() {
    let dir = tmp("batch");
    let out = dir.join("out");
    std::fs::create_dir(&out).unwrap();
    let list = dir.join("prompts.jsonl");
    std::fs::write(
        &list,
        concat!(
            "{\"prompt\": \"a red circle on a white background\", \"size\": \"32x32\", \"steps\": 2}\n",
            "{\"prompt\": \"a blue square on a black background\", \"size\": \"32x32\", \"steps\": 2, \"seed\": 9}\n",
            "\n",
            "{\"prompt\": \"a green triangle on a gray background\", \"size\": \"32x32\", \"steps\": 2, \"n\": 2}\n",
        ),
    )
    .unwrap();
    let (l, o) = (list.to_str().unwrap(), out.to_str().unwrap());
    for shard in ["0/2", "1/2"] {
        let (code, err) = batch(&[l, "--output-dir", o, "--shard", shard]);
        assert_eq!(code, Some(0), "{err}");
    }
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["1.png", "2.png", "4-1.png", "4-2.png"]);
    for (file, prompt, seed) in [
        ("1.png", "a red circle on a white background", "1"),
        ("2.png", "a blue square on a black background", "9"),
        ("4-1.png", "a green triangle on a gray background", "4"),
        ("4-2.png", "a green triangle on a gray background", "5"),
    ] {
        let one = dir.join(format!("one-{file}"));
        generate(
            &one,
            &[
                "--prompt", prompt, "--seed", seed, "--steps", "2", "--width", "32", "--height",
                "32",
            ],
        );
        assert!(pixels(&out.join(file)) == pixels(&one), "{file}");
    }
    let (code, err) = batch(&[l, "--output-dir", o, "--resume"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("3 lines, 3 done already, 0 to run"), "{err}");
    let (code, err) = batch(&[l, "--output-dir", o]);
    assert_clean_error(code, &err, &["line 1", "1.png exists already", "--resume"]);
}

/// Bad lines are named by number before the model loads; bad flags are one-line errors.
#[test]
fn batch_names_the_bad_line() {
    let dir = tmp("batch-bad");
    let list = dir.join("p.jsonl");
    std::fs::write(
        &list,
        "{\"prompt\": \"x\"}\n{\"prompt\": \"x\", \"steps\": 0}\n",
    )
    .unwrap();
    let (l, d) = (list.to_str().unwrap(), dir.to_str().unwrap());
    let (code, err) = batch(&[l, "--output-dir", d]);
    assert_clean_error(code, &err, &["line 2", "steps 0"]);
    std::fs::write(&list, "{\"prompt\": \"x\"}\nnot json\n").unwrap();
    let (code, err) = batch(&[l, "--output-dir", d]);
    assert_clean_error(code, &err, &["line 2", "not a request"]);
    // The wrong type: the field named, in the API's words.
    std::fs::write(&list, "{\"prompt\": \"x\", \"seed\": -1}\n").unwrap();
    let (code, err) = batch(&[l, "--output-dir", d]);
    assert_clean_error(
        code,
        &err,
        &[
            "line 1",
            "not a request (seed: invalid value",
            "a whole number",
        ],
    );
    std::fs::write(
        &list,
        "{\"prompt\": \"x\"}\n{\"prompt\": \"x\", \"cache\": \"fbcache:-1\"}\n",
    )
    .unwrap();
    let (code, err) = batch(&[l, "--output-dir", d]);
    assert_clean_error(code, &err, &["line 2", "cache fbcache:-1", "at least 0"]);
    std::fs::write(&list, "{\"prompt\": \"x\", \"size\": \"50x50\"}\n").unwrap();
    let (code, err) = batch(&[l, "--output-dir", d]);
    assert_clean_error(code, &err, &["line 1", "size (width) 50"]);
    for (args, needle) in [
        (vec![l, "--output-dir", d, "--shard", "2/2"], "--shard 2/2"),
        (vec![l, "--output-dir", d, "--shard", "x"], "I/N"),
        (
            vec![l, "--output-dir", "/nonexistent/dir"],
            "no such folder",
        ),
        (
            vec!["/nonexistent.jsonl", "--output-dir", d],
            "cannot read it",
        ),
    ] {
        let (code, err) = batch(&args);
        assert_clean_error(code, &err, &[needle]);
    }
}

/// One batched forward of n images gives the images of n single runs with seeds s..s+n-1: SD3
/// layout with batched CFG (the demo) and FLUX.1-dev (embedded guidance), in f32.
#[test]
fn a_batched_forward_equals_single_runs() {
    use candle_core::{DType, Device};
    let demo = mmdit::presets::Preset::find("demo")
        .unwrap()
        .model_ref(None);
    let flux =
        mmdit::ModelRef::parse(common::fixture("flux-dev-tiny").to_str().unwrap(), None).unwrap();
    for (model, size) in [(demo, 32), (flux, 32)] {
        let mut pipe = mmdit::Spec::open(&model)
            .unwrap()
            .load(&Device::Cpu, DType::F32)
            .unwrap();
        let req = mmdit::Request {
            prompt: "a red circle on a white background".into(),
            steps: Some(3),
            seed: Some(11),
            width: Some(size),
            height: Some(size),
            max_sequence_length: Some(16),
            ..Default::default()
        };
        let r = pipe.resolve(&req).unwrap();
        assert!(pipe.batch_size(&r) >= 3);
        let mut steps = 0;
        let batch = pipe.generate_batch(&req, 3, &mut |_| steps += 1).unwrap();
        assert_eq!((batch.len(), steps), (3, 3));
        for (k, b) in batch.iter().enumerate() {
            let one = mmdit::Request {
                seed: Some(11 + k as u64),
                ..req.clone()
            };
            let single = pipe.generate(&one, &mut |_| {}).unwrap();
            assert_eq!(b.request.seed, 11 + k as u64);
            let (d, m) = common::max_diff(&b.latents, &single.latents);
            println!(
                "{} image {k}: latents max diff {d:e} of {m}",
                pipe.spec.name()
            );
            // Bit for bit where the products run on the `gemm` crate (CPUs without AVX-512:
            // each row's values independent of the rows beside it); the AVX-512 kernels are
            // row-independent by construction too, but keep the old bound (not run where this
            // was measured).
            let bound = if mmdit::cpu::features().avx512 {
                1e-5 * m
            } else {
                0.0
            };
            assert!(d <= bound, "image {k}: {d} of {m}");
            assert!(
                common::max_u8_diff(&b.image.data, &single.image.data) <= 1,
                "image {k}"
            );
        }
    }
}

/// A line's `cache` is `generate --cache`: a TaylorSeer line of two images (one batched forward) and
/// a first-block-cache line of two (each image deciding for itself) equal single runs.
#[test]
fn batch_lines_take_a_cache() {
    let dir = tmp("batch-cache");
    let out = dir.join("out");
    std::fs::create_dir(&out).unwrap();
    let list = dir.join("p.jsonl");
    std::fs::write(
        &list,
        concat!(
            "{\"prompt\": \"a red circle on a white background\", \"size\": \"32x32\", \"steps\": 8, \"n\": 2, \"seed\": 3, \"cache\": \"taylorseer:1:2\"}\n",
            "{\"prompt\": \"a blue square on a black background\", \"size\": \"32x32\", \"steps\": 8, \"n\": 2, \"seed\": 3, \"cache\": \"fbcache:0.08\"}\n",
        ),
    )
    .unwrap();
    let (code, err) = batch(&[
        list.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    for (file, prompt, seed, cache) in [
        (
            "1-1.png",
            "a red circle on a white background",
            "3",
            "taylorseer:1:2",
        ),
        (
            "1-2.png",
            "a red circle on a white background",
            "4",
            "taylorseer:1:2",
        ),
        (
            "2-1.png",
            "a blue square on a black background",
            "3",
            "fbcache:0.08",
        ),
        (
            "2-2.png",
            "a blue square on a black background",
            "4",
            "fbcache:0.08",
        ),
    ] {
        let one = dir.join(format!("one-{file}"));
        generate(
            &one,
            &[
                "--prompt", prompt, "--seed", seed, "--steps", "8", "--width", "32", "--height",
                "32", "--cache", cache,
            ],
        );
        assert!(pixels(&out.join(file)) == pixels(&one), "{file}");
    }
}
