//! PSNR of a bf16 run's VAE decode (bf16 convolution operands on the CPU) against the f32 VAE's, on
//! the same latents (normal noise, drawn once), for a model folder:
//! `cargo run --release --example vae_bf16_psnr -- bench-models/sd3-bench 512`.
use candle_core::{DType, Device, Tensor};
use mmdit::{ModelRef, Spec};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (model, size) = match args.as_slice() {
        [_, m, s] => (m.clone(), s.parse::<usize>()?),
        _ => anyhow::bail!("usage: vae_bf16_psnr MODEL_FOLDER SIZE"),
    };
    let m = ModelRef::parse(&model, None)?;
    let dev = Device::Cpu;
    let mut images = Vec::new();
    let mut z: Option<Tensor> = None;
    for dtype in [DType::F32, DType::BF16] {
        let pipe = Spec::open(&m)?.load(&dev, dtype)?;
        let cfg = pipe.vae.config();
        let f = 1 << (cfg.block_out_channels.len() - 1);
        let shape = (1, cfg.latent_channels, size / f, size / f);
        let z = match &z {
            Some(z) => z.clone(),
            None => z.insert(Tensor::randn(0f32, 1f32, shape, &dev)?).clone(),
        };
        let t = Instant::now();
        let x = pipe.vae.decode_with(&z, false)?;
        println!("{dtype:?}: decode {:.2} s", t.elapsed().as_secs_f64());
        images.push(mmdit::vae::to_rgb8(&x)?.remove(0).2);
    }
    let mse = images[0]
        .iter()
        .zip(&images[1])
        .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
        .sum::<f64>()
        / images[0].len() as f64;
    println!(
        "bf16 vs f32 VAE: PSNR {:.1} dB",
        10.0 * (255f64.powi(2) / mse).log10()
    );
    Ok(())
}
