"""PyTorch's matrix-product throughput on the shapes of `cargo run --release --example gemm_bench`,
for the side-by-side table in README.md:  python scripts/gemm_torch.py  (2 threads, as the bench)."""
import time

import torch

SHAPES = [(2048, 2048, 2048), (1536, 3072, 21504), (1536, 15360, 3072), (2714, 1536, 6144), (2714, 6144, 1536)]

torch.set_num_threads(2)
for m, k, n in SHAPES:
    for name, dt in [("f32", torch.float32), ("bf16", torch.bfloat16)]:
        a = torch.rand(m, k, dtype=dt) - 0.5
        w = torch.rand(n, k, dtype=dt) - 0.5
        torch.nn.functional.linear(a, w)
        t = time.perf_counter()
        torch.nn.functional.linear(a, w)
        s = time.perf_counter() - t
        print(f"torch {name} {m}x{k}x{n}: {2 * m * k * n / s / 1e9:.0f} GFLOP/s ({s * 1e3:.1f} ms)")
