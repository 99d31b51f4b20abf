//! Attention throughput of the CPU kernels (GFLOP/s, counting the two products): f32 on the AVX-512
//! kernel, or `sdpa_gemm` (the `gemm` crate) on CPUs without AVX-512, as `nn::attention` picks;
//! and bf16 on AMX or AVX512-BF16 where the CPU has them:
//! `cargo run --release --example attn_bench` (ATTN="48x1357x64": batch·heads x tokens x head width;
//! BF16_ONLY=1 skips f32, for profiles of the bf16 kernel).
use half::bf16;
use mmdit::cpu::attention::{sdpa_bf16, sdpa_dpbf16, sdpa_f32, sdpa_gemm, Heads};
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
        let (qb, kb, vb) = (to_bf16(&q), to_bf16(&k), to_bf16(&v));
        let f32_sdpa: (_, Box<dyn Fn()>) = match mmdit::cpu::features().avx512 {
            true => (
                "sdpa f32",
                Box::new(|| drop(std::hint::black_box(sdpa_f32(&q, &k, &v, heads, scale)))),
            ),
            false => (
                "sdpa_gemm f32",
                Box::new(|| {
                    drop(std::hint::black_box(sdpa_gemm(
                        &q, &k, &v, heads, scale, None,
                    )))
                }),
            ),
        };
        let mut runs = match std::env::var("BF16_ONLY").is_ok_and(|v| v == "1") {
            true => vec![],
            false => vec![f32_sdpa],
        };
        let cpu = mmdit::cpu::features();
        if cpu.amx {
            runs.push((
                "sdpa bf16 (AMX)",
                Box::new(|| drop(std::hint::black_box(sdpa_bf16(&qb, &kb, &vb, heads, scale)))),
            ));
        } else if cpu.avx512_bf16 {
            runs.push((
                "sdpa bf16 (AVX512-BF16)",
                Box::new(|| {
                    drop(std::hint::black_box(sdpa_dpbf16(
                        &qb, &kb, &vb, heads, scale,
                    )))
                }),
            ));
        }
        for (name, sdpa) in &runs {
            sdpa();
            let best = (0..5)
                .map(|_| {
                    let t = Instant::now();
                    sdpa();
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
}

fn to_bf16(x: &[f32]) -> Vec<bf16> {
    x.iter().map(|&v| bf16::from_f32(v)).collect()
}
