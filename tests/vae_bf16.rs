//! A bf16 run's VAE on the CPU: its tensors stay f32 between layers, its convolutions take bf16
//! operands (AVX512-BF16 dot products) where the CPU has them and bf16 weights (widened in the f32
//! kernel) where it does not. The image it decodes stays within
//! 40 dB of the f32 VAE's, on both tiny VAEs (AutoencoderKL, AutoencoderKLFlux2), tiled and not, and
//! so does what it encodes.

mod common;

use candle_core::DType;
use common::*;
use mmdit::{ModelRef, Spec};

fn image(x: &candle_core::Tensor) -> Vec<u8> {
    mmdit::vae::to_rgb8(x).unwrap().remove(0).2
}

#[test]
fn bf16_vae_stays_within_40_db_of_the_f32_vae() {
    let r = reference("vae-tiling");
    for case in common::meta("vae-tiling")["cases"].as_array().unwrap() {
        let name = case["model"].as_str().unwrap();
        let m = ModelRef::parse(fixture(name).to_str().unwrap(), None).unwrap();
        let load = |dtype| Spec::open(&m).unwrap().load(&device(), dtype).unwrap();
        let (mut f32_pipe, mut bf16_pipe) = (load(DType::F32), load(DType::BF16));
        let z = &r[&format!("{name}.z")];
        for tiled in [false, true] {
            let want = image(&f32_pipe.vae.decode_with(z, tiled).unwrap());
            let got = image(&bf16_pipe.vae.decode_with(z, tiled).unwrap());
            let p = psnr(&got, &want);
            eprintln!("{name} decode (tiled {tiled}): {p:.1} dB");
            assert!(
                p >= 40.0,
                "{name} decode (tiled {tiled}): {p:.1} dB < 40 dB"
            );
        }
        let x = &r[&format!("{name}.x")];
        let want = f32_pipe
            .vae_encoder()
            .unwrap()
            .encode_with(x, false)
            .unwrap();
        let got = bf16_pipe
            .vae_encoder()
            .unwrap()
            .encode_with(x, false)
            .unwrap();
        let (d, m) = max_diff(&got.mean, &want.mean);
        eprintln!("{name} encode: mean within {d:.2e} (max {m:.2})");
        assert!(d <= 2e-2 * m.max(1.0), "{name} encode mean: {d} (max {m})");
    }
}
