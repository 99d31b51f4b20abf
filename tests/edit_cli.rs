//! Editing from the command line: `--image`/`--strength` end to end on the demo model, replaying an
//! edit with `--from`, `bench` on an edit, inputs that are converted (CMYK, EXIF-rotated, 16-bit,
//! grayscale, RGBA WebP), and bad input: each a named test with one clear error line, exit 2 and no
//! output file.

mod common;

use common::*;
use mmdit::{image_io, output, Param};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// `mmdit generate` on the demo model ("a blue circle on a white background", 4 steps) plus
/// `extra`, into `out`.
fn edit(extra: &[&OsStr], out: &Path) -> (Option<i32>, String) {
    let mut args: Vec<&OsStr> = [
        "generate",
        "--prompt",
        "a blue circle on a white background",
    ]
    .iter()
    .map(OsStr::new)
    .collect();
    if !extra.contains(&OsStr::new("--steps")) {
        args.extend([OsStr::new("--steps"), OsStr::new("4")]);
    }
    args.extend(extra);
    args.extend([OsStr::new("--output"), out.as_os_str()]);
    run(&args)
}

/// A demo image to edit: a red circle, 64x64, written by the CLI into `dir`.
fn red_circle(dir: &Path) -> PathBuf {
    let p = dir.join("red.png");
    let (code, err) = run(&[
        "generate",
        "--prompt",
        "a red circle on a white background",
        "--steps",
        "4",
        "--seed",
        "1",
        "--output",
    ]
    .iter()
    .map(OsStr::new)
    .chain([p.as_os_str()])
    .collect::<Vec<_>>());
    assert_eq!(code, Some(0), "{err}");
    p
}

fn expect_error(extra: &[&OsStr], test: &str, needles: &[&str]) {
    let out = tmp(test).join("out.png");
    let (code, err) = edit(extra, &out);
    assert_clean_error(code, &err, needles);
    assert_eq!(code, Some(2), "{test}: exit code");
    assert!(!out.exists(), "{test}: an output file was written");
}

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

#[test]
fn an_edit_records_its_input_and_replays_only_from_the_same_file() {
    let dir = tmp("edit-replay");
    let input = red_circle(&dir);
    let out = dir.join("blue.png");
    let (code, err) = edit(
        &[
            os("--image"),
            input.as_os_str(),
            os("--strength"),
            os("0.75"),
            os("--seed"),
            os("3"),
        ],
        &out,
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("3 of 4 steps run"), "{err}");
    let (img, text) = output::read_png(&out).unwrap();
    assert_eq!((img.width, img.height), (64, 64));
    let get = |k: &str| {
        text.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(get("strength").as_deref(), Some("0.75"));
    assert_eq!(get("image_sha256").unwrap().len(), 64);
    assert!(get("image").unwrap().ends_with("red.png"));

    // Replayed from the PNG alone: the same image.
    let again = dir.join("again.png");
    let (code, err) = run(&[
        os("generate"),
        os("--from"),
        out.as_os_str(),
        os("--output"),
        again.as_os_str(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(output::read_png(&again).unwrap().0, img);

    // The input changed: refused, naming the file.
    let red = output::read_png(&input).unwrap().0;
    let mut changed = red.clone();
    changed.data[0] ^= 1;
    output::write_png(&input, &changed, &[]).unwrap();
    let third = dir.join("third.png");
    let (code, err) = run(&[
        os("generate"),
        os("--from"),
        out.as_os_str(),
        os("--output"),
        third.as_os_str(),
    ]);
    assert_clean_error(code, &err, &["red.png", "has changed", "--image"]);
    assert!(!third.exists());

    // The input is gone: refused.
    std::fs::remove_file(&input).unwrap();
    let (code, err) = run(&[
        os("generate"),
        os("--from"),
        out.as_os_str(),
        os("--output"),
        third.as_os_str(),
    ]);
    assert_clean_error(code, &err, &["red.png", "is missing"]);
    assert!(!third.exists());
}

#[test]
fn an_edit_of_a_red_circle_to_blue_keeps_the_white_background() {
    let dir = tmp("edit-recolour");
    let input = red_circle(&dir);
    let out = dir.join("blue.png");
    let (code, err) = edit(
        &[
            os("--image"),
            input.as_os_str(),
            os("--strength"),
            os("0.9"),
            os("--steps"),
            os("28"),
            os("--seed"),
            os("5"),
        ],
        &out,
    );
    assert_eq!(code, Some(0), "{err}");
    let img = output::read_png(&out).unwrap().0;
    // Mean colour of the pixels far from white: blue dominates.
    let (mut sum, mut n) = ([0f64; 3], 0);
    for p in img.data.chunks(3) {
        if p.iter().map(|&v| 255 - i32::from(v)).sum::<i32>() > 150 {
            for c in 0..3 {
                sum[c] += f64::from(p[c]);
            }
            n += 1;
        }
    }
    assert!(n > 100, "no foreground");
    let mean: Vec<f64> = sum.iter().map(|s| s / f64::from(n)).collect();
    assert!(
        mean[2] > mean[0] + 60.0 && mean[2] > mean[1] + 60.0,
        "not blue: {mean:?}"
    );
    // Corners stay near white.
    let corner = &img.data[..3];
    assert!(corner.iter().all(|&v| v > 200), "corner {corner:?}");
}

#[test]
fn bench_measures_an_edit() {
    let dir = tmp("edit-bench");
    let input = red_circle(&dir);
    let out = dir.join("bench");
    let o = mmdit()
        .args([
            "bench",
            "--steps",
            "2,4",
            "--no-reference",
            "--strength",
            "0.5",
            "--image",
        ])
        .arg(&input)
        .arg("--output-dir")
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let rows = results["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
}

// ---- inputs that are converted ------------------------------------------------------------------

/// Mean absolute difference of two 8-bit images of the same size.
fn mean_abs_diff(a: &mmdit::RgbImage, b: &mmdit::RgbImage) -> f64 {
    assert_eq!((a.width, a.height), (b.width, b.height));
    let s: u64 = a
        .data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| u64::from(x.abs_diff(*y)))
        .sum();
    s as f64 / a.data.len() as f64
}

#[test]
fn cmyk_and_exif_rotated_jpegs_read_as_pil_reads_them() {
    for name in ["cmyk", "exif6"] {
        let dir = fixture("edit");
        let got = image_io::read_rgb(&dir.join(format!("{name}.jpg")), Param::Image).unwrap();
        let want = output::read_png(&dir.join(format!("{name}.expected.png")))
            .unwrap()
            .0;
        let d = mean_abs_diff(&got, &want);
        println!("{name}: mean abs diff {d:.2} against PIL");
        assert!(
            d <= 2.0,
            "{name}: mean abs diff {d:.2} against PIL's reading"
        );
    }
}

#[test]
fn sixteen_bit_gray_and_rgba_webp_inputs_are_converted() {
    let dir = tmp("edit-odd");
    let (w, h) = (24u32, 16u32);
    let deep = image::ImageBuffer::<image::Rgb<u16>, _>::from_fn(w, h, |x, _| {
        image::Rgb([(x * 2000) as u16, 65535, 0])
    });
    let p16 = dir.join("deep.png");
    deep.save(&p16).unwrap();
    let got = image_io::read_rgb(&p16, Param::Image).unwrap();
    assert_eq!((got.width, got.height), (24, 16));
    assert_eq!(&got.data[3..6], &[8, 255, 0]); // 2000 / 257 rounds to 8

    let gray = image::GrayImage::from_fn(w, h, |x, y| image::Luma([(x + y) as u8]));
    let pg = dir.join("gray.png");
    gray.save(&pg).unwrap();
    assert_eq!(
        &image_io::read_rgb(&pg, Param::Image).unwrap().data[..6],
        &[0, 0, 0, 1, 1, 1]
    );

    let rgba = image::RgbaImage::from_fn(w, h, |x, _| {
        image::Rgba([0, 0, 255, if x == 0 { 0 } else { 255 }])
    });
    let pw = dir.join("rgba.webp");
    rgba.save(&pw).unwrap();
    let got = image_io::read_rgb(&pw, Param::Image).unwrap();
    assert_eq!(&got.data[..6], &[255, 255, 255, 0, 0, 255]);

    // And the CLI edits it.
    let out = dir.join("out.png");
    let (code, err) = edit(
        &[
            os("--image"),
            p16.as_os_str(),
            os("--width"),
            os("32"),
            os("--height"),
            os("16"),
        ],
        &out,
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("24x16 is resized to 32x16"), "{err}");
}

// ---- bad input ------------------------------------------------------------------------------------

#[test]
fn image_missing() {
    expect_error(
        &[os("--image"), os("/nonexistent/in.png")],
        "img-missing",
        &["--image /nonexistent/in.png", "no such file"],
    );
}

#[test]
fn image_that_is_not_an_image() {
    let dir = tmp("img-text");
    let p = dir.join("notes.png");
    std::fs::write(&p, "hello, not a picture").unwrap();
    expect_error(
        &[os("--image"), p.as_os_str()],
        "img-text-run",
        &["notes.png", "not a PNG, JPEG or WebP image"],
    );
}

#[test]
fn image_truncated() {
    let dir = tmp("img-trunc");
    let full = red_circle(&dir);
    let bytes = std::fs::read(&full).unwrap();
    let p = dir.join("cut.png");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    expect_error(
        &[os("--image"), p.as_os_str()],
        "img-trunc-run",
        &["cut.png", "damaged or truncated"],
    );
}

/// CRC-32 (ISO-HDLC, as PNG chunks use).
fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

#[test]
fn image_header_of_100000_by_100000_is_refused_before_decoding() {
    let dir = tmp("img-bomb");
    let p = dir.join("bomb.png");
    // Signature, IHDR (100000 x 100000, 8-bit RGB), one small IDAT, IEND: a few dozen bytes that
    // promise 30 GB of pixels.
    let mut ihdr = Vec::new();
    ihdr.extend(100_000u32.to_be_bytes());
    ihdr.extend(100_000u32.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, data) in [
        (&b"IHDR"[..], ihdr),
        (
            b"IDAT",
            vec![0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
        ),
        (b"IEND", vec![]),
    ] {
        bytes.extend((data.len() as u32).to_be_bytes());
        let mut chunk = kind.to_vec();
        chunk.extend(&data);
        bytes.extend(&chunk);
        bytes.extend(crc32(&chunk).to_be_bytes());
    }
    std::fs::write(&p, bytes).unwrap();
    assert!(std::fs::metadata(&p).unwrap().len() < 1024);
    expect_error(
        &[os("--image"), p.as_os_str()],
        "img-bomb-run",
        &["bomb.png", "100000x100000", "at most 16384"],
    );
}

#[test]
fn image_smaller_than_one_latent_patch() {
    let dir = tmp("img-tiny");
    let p = dir.join("tiny.png");
    image::RgbImage::new(3, 3).save(&p).unwrap();
    expect_error(
        &[os("--image"), p.as_os_str()],
        "img-tiny-run",
        &["--image: 3x3", "--width", "--height"],
    );
}

#[test]
fn strength_outside_zero_to_one() {
    let dir = tmp("strength-range");
    let input = red_circle(&dir);
    for (i, s) in ["0", "1.5", "-0.2", "NaN"].iter().enumerate() {
        let arg = format!("--strength={s}");
        expect_error(
            &[os("--image"), input.as_os_str(), os(&arg)],
            &format!("strength-range-{i}"),
            &[&format!("--strength {s}"), "(0, 1]"],
        );
    }
}

#[test]
fn strength_so_small_that_no_step_runs() {
    let dir = tmp("strength-small");
    let input = red_circle(&dir);
    expect_error(
        &[
            os("--image"),
            input.as_os_str(),
            os("--strength"),
            os("1e-20"),
            os("--steps"),
            os("4"),
        ],
        "strength-small-run",
        &[
            "--strength 0.00000000000000000001",
            "with 4 steps it leaves no step",
            "--strength 0.25 or more",
            "--steps",
        ],
    );
}

#[test]
fn strength_without_image() {
    expect_error(
        &[os("--strength"), os("0.5")],
        "strength-alone",
        &["--strength applies to editing only", "--image"],
    );
}

// ---- inpainting ------------------------------------------------------------------------------------

/// A mask of `w` x `h`: white inside the centred square of side `side`, black elsewhere.
fn square_mask(dir: &Path, name: &str, w: u32, h: u32, side: u32) -> PathBuf {
    let (x0, y0) = ((w - side) / 2, (h - side) / 2);
    let m = image::GrayImage::from_fn(w, h, |x, y| {
        let inside = (x0..x0 + side).contains(&x) && (y0..y0 + side).contains(&y);
        image::Luma([if inside { 255 } else { 0 }])
    });
    let p = dir.join(name);
    m.save(&p).unwrap();
    p
}

#[test]
fn inpainting_keeps_the_input_outside_the_mask_and_records_the_mask() {
    let dir = tmp("inpaint");
    let input = red_circle(&dir);
    // Of another size than the image: resized, with a notice.
    let mask = square_mask(&dir, "mask.png", 32, 32, 8);
    let out = dir.join("out.png");
    let (code, err) = edit(
        &[
            os("--image"),
            input.as_os_str(),
            os("--mask"),
            mask.as_os_str(),
            os("--strength"),
            os("1"),
        ],
        &out,
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("--mask: 32x32 differs from the image's 64x64; both are resized to 64x64"),
        "{err}"
    );
    let got = output::read_png(&out).unwrap();
    let red = output::read_png(&input).unwrap().0;
    // Far from the mask, the image is the input's VAE round trip: a few levels off at most.
    let corner = |img: &mmdit::RgbImage| -> Vec<u8> {
        (0..8)
            .flat_map(|y| img.data[y * 64 * 3..y * 64 * 3 + 24].to_vec())
            .collect()
    };
    let d = max_u8_diff(&corner(&got.0), &corner(&red));
    println!("top-left 8x8 corner: max diff {d}/255 from the input");
    assert!(d <= 12, "top-left corner moved by {d}/255");
    let has = |k: &str| got.1.iter().any(|(key, _)| key == k);
    assert!(has("mask") && has("mask_sha256"));
}

#[test]
fn mask_that_selects_nothing_warns_and_returns_the_input() {
    let dir = tmp("mask-empty");
    let input = red_circle(&dir);
    let mask = square_mask(&dir, "none.png", 64, 64, 0);
    let out = dir.join("out.png");
    let (code, err) = edit(
        &[
            os("--image"),
            input.as_os_str(),
            os("--mask"),
            mask.as_os_str(),
        ],
        &out,
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("--mask selects nothing to repaint"), "{err}");
    // The input's VAE round trip: mean difference of a few levels.
    let a = output::read_png(&out).unwrap().0;
    let b = output::read_png(&input).unwrap().0;
    let d = mean_abs_diff(&a, &b);
    println!("empty mask: mean abs diff {d:.2} from the input");
    assert!(d <= 4.0, "mean abs diff {d:.2}");
}

#[test]
fn mask_without_image() {
    let dir = tmp("mask-alone");
    let mask = square_mask(&dir, "m.png", 64, 64, 8);
    expect_error(
        &[os("--mask"), mask.as_os_str()],
        "mask-alone-run",
        &["--mask needs --image"],
    );
}

#[test]
fn mask_that_is_not_an_image() {
    let dir = tmp("mask-text");
    let input = red_circle(&dir);
    let p = dir.join("mask.png");
    std::fs::write(&p, [0u8; 64]).unwrap();
    expect_error(
        &[
            os("--image"),
            input.as_os_str(),
            os("--mask"),
            p.as_os_str(),
        ],
        "mask-text-run",
        &["--mask", "mask.png", "not a PNG, JPEG or WebP image"],
    );
}

// ---- FLUX.1 Fill ---------------------------------------------------------------------------------

#[test]
fn fill_needs_an_image_and_a_mask() {
    let fill = fixture("flux-fill-tiny");
    expect_error(
        &[os("--model"), fill.as_os_str()],
        "fill-alone",
        &["FLUX.1 Fill", "--image and --mask"],
    );
    let input = fixture("edit").join("input_0.png");
    expect_error(
        &[
            os("--model"),
            fill.as_os_str(),
            os("--image"),
            input.as_os_str(),
        ],
        "fill-no-mask",
        &["FLUX.1 Fill", "--image and --mask"],
    );
}

#[test]
fn fill_runs_from_the_command_line() {
    let dir = tmp("fill-cli");
    let fill = fixture("flux-fill-tiny");
    let input = fixture("edit").join("input_0.png");
    let mask = fixture("edit").join("mask_4.png");
    let out = dir.join("out.png");
    let (code, err) = edit(
        &[
            os("--model"),
            fill.as_os_str(),
            os("--image"),
            input.as_os_str(),
            os("--mask"),
            mask.as_os_str(),
            os("--width"),
            os("32"),
            os("--height"),
            os("48"),
        ],
        &out,
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("edit at strength 1 (4 of 4 steps run)"),
        "{err}"
    );
    assert_eq!(output::read_png(&out).unwrap().0.width, 32);
}

// ---- FLUX.1 Kontext ------------------------------------------------------------------------------

#[test]
fn kontext_needs_an_image_and_takes_no_mask_or_strength() {
    let kontext = fixture("flux-kontext-tiny");
    expect_error(
        &[os("--model"), kontext.as_os_str()],
        "kontext-alone",
        &["FLUX.1 Kontext", "--image"],
    );
    let input = fixture("edit").join("input_0.png");
    let mask = fixture("edit").join("mask_4.png");
    expect_error(
        &[
            os("--model"),
            kontext.as_os_str(),
            os("--image"),
            input.as_os_str(),
            os("--mask"),
            mask.as_os_str(),
        ],
        "kontext-mask",
        &["--mask does not apply to", "reference image"],
    );
    expect_error(
        &[
            os("--model"),
            kontext.as_os_str(),
            os("--image"),
            input.as_os_str(),
            os("--strength"),
            os("0.5"),
        ],
        "kontext-strength",
        &["--strength does not apply to"],
    );
}

/// FLUX.2 takes several `--image`s as references: the image equals the library's run with the same
/// references, the PNG records every input (one per line) and `--from` replays it.
#[test]
fn flux2_takes_repeated_images_and_replays_them() {
    let dir = tmp("flux2-refs");
    let edit_dir = fixture("flux2-edit");
    let (a, b) = (edit_dir.join("input_0.png"), edit_dir.join("input_1.png"));
    let model = fixture("flux2-klein-distilled-tiny");
    let out = dir.join("out.png");
    let args = |out: &Path| -> Vec<std::ffi::OsString> {
        [
            "generate",
            "--model",
            "MODEL",
            "--prompt",
            "make it blue",
            "--steps",
            "2",
            "--seed",
            "4",
            "--image",
            "A",
            "--image",
            "B",
            "--output",
            "OUT",
        ]
        .iter()
        .map(|s| match *s {
            "MODEL" => model.clone().into_os_string(),
            "A" => a.clone().into_os_string(),
            "B" => b.clone().into_os_string(),
            "OUT" => out.as_os_str().to_owned(),
            s => s.into(),
        })
        .collect()
    };
    let argv = args(&out);
    let (code, err) = run(&argv.iter().map(|s| s.as_os_str()).collect::<Vec<_>>());
    assert_eq!(code, Some(0), "{err}");
    let (img, text) = output::read_png(&out).unwrap();
    // The first reference's size (70x90), cropped to the tiny model's multiple of 4.
    assert_eq!((img.width, img.height), (68, 88));
    let get = |k: &str| {
        text.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    let images = get("image").unwrap();
    let lines: Vec<&str> = images.lines().collect();
    assert_eq!(lines.len(), 2, "{images}");
    assert!(lines[0].ends_with("input_0.png") && lines[1].ends_with("input_1.png"));
    assert_eq!(get("image_sha256").unwrap().lines().count(), 2);

    let m = mmdit::ModelRef::parse(model.to_str().unwrap(), None).unwrap();
    let mut pipe = mmdit::Spec::open(&m)
        .unwrap()
        .load(&device(), candle_core::DType::F32)
        .unwrap();
    let read = |p: &Path| image_io::read_rgb(p, Param::Image).unwrap();
    let lib = pipe
        .generate(
            &mmdit::Request {
                prompt: "make it blue".into(),
                steps: Some(2),
                seed: Some(4),
                image: Some(read(&a)),
                reference_images: vec![read(&b)],
                ..Default::default()
            },
            &mut |_| {},
        )
        .unwrap();
    assert!(
        lib.image == img,
        "the CLI's image differs from the library's"
    );

    let again = dir.join("again.png");
    let (code, err) = run(&[
        os("generate"),
        os("--from"),
        out.as_os_str(),
        os("--output"),
        again.as_os_str(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(output::read_png(&again).unwrap().0, img);
}
