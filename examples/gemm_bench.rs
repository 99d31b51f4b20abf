//! Matrix-product throughput of the CPU kernels (GFLOP/s), for the figures in README.md:
//! `cargo run --release --example gemm_bench` (best of three, or of `REPS`; `COLD=1`: weights read
//! from memory, copies of them larger together than `COLD_MIB` (256) MiB; `BF16_ONLY=1`: the bf16
//! kernels alone).
use half::bf16;
use mmdit::cpu::{amx, dpbf16, sgemm};
use std::time::Instant;

fn main() {
    // SHAPES="256x4096x10240,512x4096x4096" (m x k x n) replaces the default shapes.
    let shapes: Vec<(usize, usize, usize)> = match std::env::var("SHAPES") {
        Ok(list) => list
            .split(',')
            .map(|s| {
                let d: Vec<usize> = s
                    .split('x')
                    .map(|d| {
                        d.trim()
                            .parse()
                            .expect("SHAPES: m x k x n, e.g. 256x4096x10240")
                    })
                    .collect();
                assert!(d.len() == 3, "SHAPES: m x k x n, e.g. 256x4096x10240");
                (d[0], d[1], d[2])
            })
            .collect(),
        Err(_) => vec![
            (2048, 2048, 2048),
            (1536, 3072, 21504),
            (1536, 15360, 3072),
            (2714, 1536, 6144),
            (2714, 6144, 1536),
        ],
    };
    // REPS=7: best of seven f32 runs (default three).
    let reps: usize = std::env::var("REPS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    for &(m, k, n) in &shapes {
        let a: Vec<bf16> = (0..m * k)
            .map(|i| bf16::from_f32(((i * 7919) % 1000) as f32 / 1000.0 - 0.5))
            .collect();
        let w: Vec<bf16> = (0..n * k)
            .map(|i| bf16::from_f32(((i * 104729) % 1000) as f32 / 1000.0 - 0.5))
            .collect();
        if sgemm::available() && std::env::var("BF16_ONLY").is_err() {
            let af: Vec<f32> = a.iter().map(|v| v.to_f32()).collect();
            let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
            // COLD=1: rotate through copies of the weights larger together than the L3 cache, so
            // each product reads its weights from memory, as a model's layers do.
            let copies = match std::env::var("COLD") {
                Ok(_) => cold_bytes().div_ceil(n * k * 4).max(2),
                Err(_) => 1,
            };
            let ps: Vec<_> = (0..copies)
                .map(|_| sgemm::PackedF32::from_nk(&wf, n, k))
                .collect();
            // ROWS=1: also the weights read where they lie (`sgemm::Rows`, a text encoder's
            // layers), alternated with the packed panels rep by rep.
            let rows = std::env::var("ROWS").is_ok();
            let ws: Vec<Vec<f32>> = match rows {
                true => (0..copies).map(|_| wf.clone()).collect(),
                false => Vec::new(),
            };
            let mut out = vec![0f32; m * n];
            sgemm::matmul(&af, m, k, &ps[0], None, &mut out, n);
            let (mut s, mut s_rows) = (f64::INFINITY, f64::INFINITY);
            for i in 0..reps {
                let p = &ps[(i + 1) % copies];
                let t = Instant::now();
                sgemm::matmul(&af, m, k, p, None, &mut out, n);
                s = s.min(t.elapsed().as_secs_f64());
                if rows {
                    let r = sgemm::Rows::new(sgemm::RowValues::F32(&ws[(i + 1) % copies]), n, k);
                    let t = Instant::now();
                    sgemm::matmul(&af, m, k, &r, None, &mut out, n);
                    s_rows = s_rows.min(t.elapsed().as_secs_f64());
                }
            }
            let gflops = |s: f64| 2.0 * (m * k * n) as f64 / s / 1e9;
            println!(
                "avx512 f32 {m}x{k}x{n}: {:.0} GFLOP/s ({:.1} ms)",
                gflops(s),
                s * 1e3
            );
            if rows {
                println!(
                    "avx512 f32 rows {m}x{k}x{n}: {:.0} GFLOP/s ({:.1} ms)",
                    gflops(s_rows),
                    s_rows * 1e3
                );
            }
        }
        if sgemm::available()
            && !amx::available()
            && std::env::var("F32_ONLY").is_err()
            && std::env::var("BF16_ONLY").is_err()
        {
            let af: Vec<f32> = a.iter().map(|v| v.to_f32()).collect();
            let p = sgemm::PackedBf16::from_nk(&w, n, k);
            let mut out = vec![0f32; m * n];
            sgemm::matmul(&af, m, k, &p, None, &mut out, n);
            let t = Instant::now();
            sgemm::matmul(&af, m, k, &p, None, &mut out, n);
            let s = t.elapsed().as_secs_f64();
            println!(
                "avx512 bf16 panels {m}x{k}x{n}: {:.0} GFLOP/s ({:.1} ms)",
                2.0 * (m * k * n) as f64 / s / 1e9,
                s * 1e3
            );
        }
        if dpbf16::available() && std::env::var("F32_ONLY").is_err() {
            let t = Instant::now();
            let p = dpbf16::PackedPairs::from_nk(&w, n, k);
            let pack = t.elapsed().as_secs_f64();
            // COLD=1: as for f32, copies of the panels larger together than the L3 cache.
            let copies = match std::env::var("COLD") {
                Ok(_) => cold_bytes().div_ceil(n * k * 2).max(2),
                Err(_) => 1,
            };
            let ps: Vec<_> = (0..copies).map(|_| p.clone()).collect();
            let mut out = vec![0f32; m * n];
            dpbf16::matmul(&a, m, k, &p, None, &mut out, n);
            let mut s = f64::INFINITY;
            for i in 0..reps {
                let t = Instant::now();
                dpbf16::matmul(&a, m, k, &ps[(i + 1) % copies], None, &mut out, n);
                s = s.min(t.elapsed().as_secs_f64());
            }
            println!(
                "avx512-bf16 {m}x{k}x{n}: {:.0} GFLOP/s ({:.1} ms), pack {:.1} ms",
                2.0 * (m * k * n) as f64 / s / 1e9,
                s * 1e3,
                pack * 1e3
            );
        }
        if amx::available() && std::env::var("F32_ONLY").is_err() {
            let t = Instant::now();
            let p = amx::PackedB::from_nk(&w, n, k);
            let pack = t.elapsed().as_secs_f64();
            // COLD=1: as for f32, copies of the packed weights larger together than the L3 cache
            // (`COLD_MIB`, default 256).
            let copies = match std::env::var("COLD") {
                Ok(_) => cold_bytes().div_ceil(n * k * 2).max(2),
                Err(_) => 1,
            };
            let ps: Vec<_> = (0..copies).map(|_| p.clone()).collect();
            let mut out = vec![bf16::ZERO; m * n];
            amx::matmul(&a, m, k, &p, None, &mut out, n);
            let mut s = f64::INFINITY;
            for i in 0..reps {
                let t = Instant::now();
                amx::matmul(&a, m, k, &ps[(i + 1) % copies], None, &mut out, n);
                s = s.min(t.elapsed().as_secs_f64());
            }
            println!(
                "amx bf16 {m}x{k}x{n}: {:.0} GFLOP/s ({:.1} ms), pack {:.1} ms",
                2.0 * (m * k * n) as f64 / s / 1e9,
                s * 1e3,
                pack * 1e3
            );
        }
    }
}

/// How many bytes of weight copies `COLD=1` rotates through: `COLD_MIB` (default 256) MiB.
fn cold_bytes() -> usize {
    std::env::var("COLD_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256usize)
        << 20
}
