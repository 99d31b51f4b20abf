//! Tiled VAE decoding and encoding (`--vae-tiling`) against diffusers' `enable_tiling()` on the tiny
//! AutoencoderKL and AutoencoderKLFlux2 (scripts/make_tiling_fixtures.py): 16-latent tiles every 12
//! latents blended over 8 pixels, 32-pixel tiles every 24 pixels blended over 4 latents, on sizes
//! that are not multiples of the stride.

mod common;

use candle_core::DType;
use common::*;
use mmdit::{ModelRef, Spec};

#[test]
fn tiled_decode_and_encode_match_diffusers() {
    let meta = common::meta("vae-tiling");
    let r = reference("vae-tiling");
    for case in meta["cases"].as_array().unwrap() {
        let name = case["model"].as_str().unwrap();
        let m = ModelRef::parse(fixture(name).to_str().unwrap(), None).unwrap();
        let mut pipe = Spec::open(&m).unwrap().load(&device(), DType::F32).unwrap();
        let z = &r[&format!("{name}.z")];
        let tiled = pipe.vae.decode_with(z, true).unwrap();
        assert_close_rel(
            &format!("{name} tiled decode"),
            &tiled,
            &r[&format!("{name}.decoded")],
            1e-4,
        );
        // Untiled differs: the test sees the tiles.
        let plain = pipe.vae.decode_with(z, false).unwrap();
        let (d, _) = max_diff(&plain, &tiled);
        assert!(d > 1e-3, "{name}: tiling changed nothing ({d})");
        let x = &r[&format!("{name}.x")];
        let dist = pipe.vae_encoder().unwrap().encode_with(x, true).unwrap();
        for (what, ours) in [("mean", &dist.mean), ("logvar", &dist.logvar)] {
            assert_close_rel(
                &format!("{name} tiled encode {what}"),
                ours,
                &r[&format!("{name}.{what}")],
                1e-4,
            );
        }
    }
}

/// `generate --vae-tiling` decodes in tiles (the image differs from the untiled one and equals the
/// library's tiled run), records it in the PNG, and `--from` replays it.
#[test]
fn generate_vae_tiling_is_recorded_and_replayed() {
    let dir = tmp("vae-tiling-cli");
    let model = fixture("flux-dev-tiny");
    let run_cli = |out: &std::path::Path, extra: &[&str]| {
        let mut args: Vec<&std::ffi::OsStr> =
            vec!["generate".as_ref(), "--model".as_ref(), model.as_os_str()];
        for a in [
            "--prompt",
            "a red circle",
            "--steps",
            "2",
            "--seed",
            "3",
            "--width",
            "48",
            "--height",
            "40",
        ] {
            args.push(a.as_ref());
        }
        args.extend(extra.iter().map(|a| std::ffi::OsStr::new(*a)));
        args.extend(["--output".as_ref(), out.as_os_str()]);
        let (code, err) = run(&args);
        assert_eq!(code, Some(0), "{err}");
        mmdit::output::read_png(out).unwrap()
    };
    let (tiled, text) = run_cli(&dir.join("tiled.png"), &["--vae-tiling"]);
    let (plain, _) = run_cli(&dir.join("plain.png"), &[]);
    assert!(tiled != plain, "tiling changed nothing");
    assert!(
        text.contains(&("vae_tiling".into(), "true".into())),
        "{text:?}"
    );

    let m = ModelRef::parse(model.to_str().unwrap(), None).unwrap();
    let mut spec = Spec::open(&m).unwrap();
    spec.set_vae_tiling(true);
    let mut pipe = spec.load(&device(), DType::F32).unwrap();
    let lib = pipe
        .generate(
            &mmdit::Request {
                prompt: "a red circle".into(),
                steps: Some(2),
                seed: Some(3),
                width: Some(48),
                height: Some(40),
                ..Default::default()
            },
            &mut |_| {},
        )
        .unwrap();
    assert!(
        lib.image == tiled,
        "the CLI's tiled image differs from the library's"
    );

    let again = dir.join("again.png");
    let (code, err) = run(&[
        "generate".as_ref(),
        "--from".as_ref(),
        dir.join("tiled.png").as_os_str(),
        "--output".as_ref(),
        again.as_os_str(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(mmdit::output::read_png(&again).unwrap().0 == tiled);
}
