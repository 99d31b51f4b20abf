//! Convolution throughput of the CPU kernels (GFLOP/s) at the VAE decoder's shapes, channels-last
//! images as the decoder keeps them: `cargo run --release --example conv_bench` (best of three,
//! or of `REPS`; `OPERANDS=f32` for the f32 kernel, default bf16).
use mmdit::cpu::conv::{Operands, PackedConv2d};
use std::time::Instant;

fn main() {
    // As a generation runs: large blocks reused from the heap rather than mapped afresh.
    let _heap = mmdit::cpu::heap::LargeBlocks::keep();
    // SHAPES="512x64,128x512" (channels x side) replaces the default shapes (the SD3/FLUX.1
    // decoder's 3x3 convolutions at 512 x 512 pixels).
    let shapes: Vec<(usize, usize)> = match std::env::var("SHAPES") {
        Ok(list) => list
            .split(',')
            .map(|s| {
                let (c, side) = s
                    .split_once('x')
                    .expect("SHAPES: channels x side, e.g. 128x512");
                (
                    c.trim().parse().expect("channels"),
                    side.trim().parse().expect("side"),
                )
            })
            .collect(),
        Err(_) => vec![
            (512, 64),
            (512, 128),
            (512, 256),
            (256, 256),
            (256, 512),
            (128, 512),
        ],
    };
    let reps: usize = std::env::var("REPS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let operands = match std::env::var("OPERANDS").as_deref() {
        Ok("f32") => Operands::F32,
        _ if mmdit::cpu::dpbf16::available() => Operands::Bf16,
        _ => Operands::Bf16Weights,
    };
    for &(c, side) in &shapes {
        let w: Vec<f32> = (0..c * c * 9)
            .map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let x: Vec<f32> = (0..c * side * side)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let conv = PackedConv2d::new(&w, Some(vec![0.1; c]), (c, c, 3, 1), operands);
        let flops = 2.0 * (side * side * c * c * 9) as f64;
        let mut best = f64::MAX;
        for _ in 0..reps {
            let t = Instant::now();
            let y = conv.forward_channels_last(&x, 1, side, side);
            best = best.min(t.elapsed().as_secs_f64());
            std::hint::black_box(y);
        }
        println!(
            "{c} channels, {side}x{side}: {:.3} s, {:.0} GFLOP/s ({operands:?})",
            best,
            flops / best / 1e9
        );
    }
}
