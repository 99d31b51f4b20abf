//! Attention throughput of the CPU f32 kernel (GFLOP/s, counting the two products): the AVX-512
//! kernel, or `sdpa_gemm` (the `gemm` crate) on CPUs without AVX-512, as `nn::attention` picks:
//! `cargo run --release --example attn_bench` (ATTN="48x1357x64": batch·heads x tokens x head width).
use mmdit::cpu::attention::{sdpa_f32, sdpa_gemm, Heads};
use std::time::Instant;

fn main() {
    let spec = std::env::var("ATTN").unwrap_or_else(|_| "48x1357x64,24x4096x64".into());
    for s in spec.split(',') {
        let d: Vec<usize> = s
            .split('x')
            .map(|v| v.parse().expect("ATTN: bh x n x d"))
            .collect();
        let (bh, n, dd) = (d[0], d[1], d[2]);
        let len = bh * n * dd;
        let gen = |seed: usize| -> Vec<f32> {
            (0..len)
                .map(|i| (((i * 7919 + seed) % 1000) as f32 / 1000.0 - 0.5) * 4.0)
                .collect()
        };
        let (q, k, v) = (gen(1), gen(2), gen(3));
        let heads = Heads { bh, n, m: n, d: dd };
        let scale = 1.0 / (dd as f32).sqrt();
        let (name, sdpa): (_, &dyn Fn() -> Vec<f32>) = match mmdit::cpu::features().avx512 {
            true => ("sdpa f32", &|| sdpa_f32(&q, &k, &v, heads, scale)),
            false => ("sdpa_gemm f32", &|| {
                sdpa_gemm(&q, &k, &v, heads, scale, None)
            }),
        };
        sdpa();
        let best = (0..5)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(sdpa());
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min);
        let flop = 4.0 * (bh * n * n * dd) as f64;
        println!(
            "{name} {s}: {:.0} GFLOP/s ({:.1} ms)",
            flop / best / 1e9,
            best * 1e3
        );
    }
}
