//! Issue 5: the embedded demo model (models/demo) draws what the prompt says, and equals diffusers.
//! The judge is the same simple measure scripts/train_demo.py uses: foreground = every pixel far
//! from the background colour (so a stray pixel anywhere, such as a dark corner, stretches the
//! bounding box and fails the shape); colour = palette entry nearest the foreground mean; shape =
//! fill ratio of the foreground's bounding box (triangle ~0.5, circle ~0.785, square ~1; thresholds
//! at the midpoints).

mod common;

use candle_core::{DType, Device};
use common::*;
use mmdit::presets::Preset;
use mmdit::{Pipeline, Request, RgbImage, Spec};

const SHAPES: [&str; 3] = ["circle", "square", "triangle"];
const COLOURS: [(&str, [f32; 3]); 6] = [
    ("red", [220.0, 30.0, 30.0]),
    ("green", [30.0, 170.0, 50.0]),
    ("blue", [30.0, 60.0, 220.0]),
    ("yellow", [240.0, 220.0, 30.0]),
    ("purple", [140.0, 40.0, 180.0]),
    ("orange", [250.0, 140.0, 20.0]),
];
const BACKGROUNDS: [(&str, [f32; 3]); 3] = [
    ("white", [255.0; 3]),
    ("black", [0.0; 3]),
    ("gray", [128.0; 3]),
];

/// (colour right, shape right)
fn judge(img: &RgbImage, shape: &str, colour: &str, bg: [f32; 3]) -> (bool, bool) {
    let (w, h) = (img.width, img.height);
    let px = |i: usize| {
        [
            img.data[3 * i] as f32,
            img.data[3 * i + 1] as f32,
            img.data[3 * i + 2] as f32,
        ]
    };
    let far: Vec<bool> = (0..w * h)
        .map(|i| {
            px(i)
                .iter()
                .zip(bg)
                .map(|(a, b)| (a - b).abs())
                .sum::<f32>()
                > 120.0
        })
        .collect();
    let fg: Vec<usize> = (0..w * h).filter(|&i| far[i]).collect();
    if fg.len() < 20 {
        return (false, false);
    }
    let mut mean = [0f32; 3];
    for &i in &fg {
        for (m, v) in mean.iter_mut().zip(px(i)) {
            *m += v / fg.len() as f32;
        }
    }
    let dist = |p: [f32; 3]| {
        p.iter()
            .zip(mean)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f32>()
    };
    let best = COLOURS
        .iter()
        .min_by(|a, b| dist(a.1).total_cmp(&dist(b.1)))
        .unwrap()
        .0;
    let (xs, ys): (Vec<usize>, Vec<usize>) = fg.iter().map(|&i| (i % w, i / w)).unzip();
    let bw = xs.iter().max().unwrap() - xs.iter().min().unwrap() + 1;
    let bh = ys.iter().max().unwrap() - ys.iter().min().unwrap() + 1;
    let fill = fg.len() as f32 / (bw * bh) as f32;
    let guess = if fill < 0.64 {
        "triangle"
    } else if fill < 0.89 {
        "circle"
    } else {
        "square"
    };
    (best == colour, guess == shape)
}

fn demo() -> Pipeline {
    let p = Preset::find("demo").unwrap();
    Spec::open(&p.model_ref(None))
        .unwrap()
        .load(&device(), DType::F32)
        .unwrap()
}

fn request(prompt: &str, steps: usize, seed: u64) -> Request {
    let mut r = Request {
        prompt: prompt.into(),
        steps: Some(steps),
        seed: Some(seed),
        ..Default::default()
    };
    Preset::find("demo").unwrap().apply(&mut r);
    r
}

#[test]
fn demo_matches_diffusers_for_the_same_noise() {
    let mut pipe = demo();
    let r = reference("demo-ref");
    let meta = meta("demo-ref");
    for (k, run) in meta["runs"].as_array().unwrap().iter().enumerate() {
        let noise = candle_core::safetensors::load(
            fixture("demo-ref").join(run["noise"].as_str().unwrap()),
            &Device::Cpu,
        )
        .unwrap()
        .remove("noise")
        .unwrap();
        let mut req = request(
            run["prompt"].as_str().unwrap(),
            run["steps"].as_u64().unwrap() as usize,
            0,
        );
        req.noise = Some(noise);
        req.guidance = run["guidance"].as_f64();
        req.max_sequence_length = meta["max_sequence_length"].as_u64().map(|v| v as usize);
        let out = pipe.generate(&req, &mut |_| {}).unwrap();
        let want = reference_image(&r, k);
        let worst = max_u8_diff(&out.image.data, &want);
        println!("demo run {k}: max diff {worst}/255");
        assert!(worst <= 2, "demo run {k}: {worst}/255");
    }
}

/// Floors (issue 5): colour >= 95% and shape >= 85% at 28 steps, colour >= 85% at 4 steps.
#[test]
fn demo_draws_the_prompted_colour_and_shape() {
    let mut pipe = demo();
    let n = SHAPES.len() * COLOURS.len() * BACKGROUNDS.len();
    for steps in [28, 4] {
        let (mut colour_ok, mut shape_ok, mut k) = (0, 0, 0);
        for shape in SHAPES {
            for (colour, _) in COLOURS {
                for (bg, bgc) in BACKGROUNDS {
                    let prompt = format!("a {colour} {shape} on a {bg} background");
                    let out = pipe
                        .generate(&request(&prompt, steps, 1000 + k), &mut |_| {})
                        .unwrap();
                    // The preset's T5 length holds every caption the model was trained on.
                    assert_eq!(out.truncations, vec![], "{prompt}");
                    let (c, s) = judge(&out.image, shape, colour, bgc);
                    colour_ok += c as usize;
                    shape_ok += s as usize;
                    k += 1;
                }
            }
        }
        let (cp, sp) = (colour_ok as f64 / n as f64, shape_ok as f64 / n as f64);
        println!(
            "{steps} steps: colour {colour_ok}/{n} ({:.0}%), shape {shape_ok}/{n} ({:.0}%)",
            cp * 100.0,
            sp * 100.0
        );
        if steps == 28 {
            assert!(cp >= 0.95, "colour at 28 steps {cp}");
            assert!(sp >= 0.85, "shape at 28 steps {sp}");
        } else {
            assert!(cp >= 0.85, "colour at 4 steps {cp}");
        }
    }
}

/// bf16 (the GPU default) against diffusers' f32 images of the trained demo model, over the 54
/// prompts of `tests/fixtures/demo-bf16` (every colour, shape and background, 4 steps): the mean
/// PSNR at least diffusers' own bf16 mean less 0.5 dB, and no image below 25 dB. Per image the two
/// engines' bf16 roundings move the hard shape edges differently, so one image's PSNR is up to
/// 10 dB above or below the other's; the difference has a standard deviation of 3.3 dB, and the
/// mean over 54 images a standard error of 0.45 dB (the set and the figures are in
/// scripts/make_demo_fixture.py and docs/demo.md).
#[test]
fn demo_in_bf16_stays_as_close_to_diffusers_f32_as_diffusers_bf16() {
    let p = Preset::find("demo").unwrap();
    let mut pipe = Spec::open(&p.model_ref(None))
        .unwrap()
        .load(&device(), DType::BF16)
        .unwrap();
    let r = reference("demo-bf16");
    let meta = meta("demo-bf16");
    let noise = candle_core::safetensors::load(
        fixture("demo-bf16").join("noise.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let runs = meta["runs"].as_array().unwrap();
    assert!(runs.len() >= 54, "the fixture has {} runs", runs.len());
    let (mut ours, mut theirs, mut low) = (Vec::new(), Vec::new(), Vec::new());
    for (k, run) in runs.iter().enumerate() {
        let mut req = request(
            run["prompt"].as_str().unwrap(),
            run["steps"].as_u64().unwrap() as usize,
            0,
        );
        req.noise = Some(noise[&format!("run.{k}.noise")].clone());
        req.guidance = run["guidance"].as_f64();
        req.max_sequence_length = Some(meta["max_sequence_length"].as_u64().unwrap() as usize);
        let out = pipe.generate(&req, &mut |_| {}).unwrap();
        let p = psnr(&out.image.data, &reference_image(&r, k));
        let t = run["diffusers_bf16_psnr_db"].as_f64().unwrap();
        println!(
            "demo run {k}: bf16 PSNR {p:.1} dB against diffusers f32 (diffusers bf16 {t:.1} dB)"
        );
        if p < 25.0 {
            low.push(format!("run {k} {p:.1} dB"));
        }
        ours.push(p);
        theirs.push(t);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (m, t) = (mean(&ours), mean(&theirs));
    println!("mean bf16 PSNR: ours {m:.2} dB, diffusers {t:.2} dB");
    assert!(low.is_empty(), "bf16 images below 25 dB: {low:?}");
    assert!(
        m >= t - 0.5,
        "mean bf16 PSNR {m:.2} dB < diffusers' {t:.2} dB - 0.5"
    );
}

/// With `keep_text` off the encoders are dropped after encoding and loaded again for the next
/// request; the images are the same as with them kept.
#[test]
fn released_text_encoders_reload_for_the_next_request() {
    let mut kept = demo();
    let mut released = demo();
    released.keep_text = false;
    for prompt in [
        "a red circle on a white background",
        "a blue square on a black background",
    ] {
        let want = kept.generate(&request(prompt, 4, 3), &mut |_| {}).unwrap();
        let got = released
            .generate(&request(prompt, 4, 3), &mut |_| {})
            .unwrap();
        assert!(released.text.is_none(), "text encoders still loaded");
        assert!(kept.text.is_some());
        assert_eq!(got.image.data, want.image.data, "{prompt}");
    }
}
