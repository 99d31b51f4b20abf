"""PyTorch's matrix-product throughput on the shapes of `cargo run --release --example gemm_bench`,
for the side-by-side table in README.md:  python scripts/gemm_torch.py  (2 threads, as the bench)."""
import os
import time

import torch

SHAPES = [(2048, 2048, 2048), (1536, 3072, 21504), (1536, 15360, 3072), (2714, 1536, 6144), (2714, 6144, 1536)]
if os.environ.get("SHAPES"):  # SHAPES="256x4096x10240,512x4096x4096" (m x k x n), as gemm_bench
    SHAPES = [tuple(int(d) for d in s.split("x")) for s in os.environ["SHAPES"].split(",")]

torch.set_num_threads(int(os.environ.get("THREADS", 2)))  # THREADS=1: one thread
for m, k, n in SHAPES:
    for name, dt in [("f32", torch.float32), ("bf16", torch.bfloat16)]:
        a = torch.rand(m, k, dtype=dt) - 0.5
        # COLD=1: rotate through copies of the weights larger together than the L3 cache, as gemm_bench
        copies = max(2, -(-(int(os.environ.get("COLD_MIB", 256)) << 20) // (n * k * 4))) if os.environ.get("COLD") else 1
        ws = [torch.rand(n, k, dtype=dt) - 0.5 for _ in range(copies)]
        torch.nn.functional.linear(a, ws[0])
        s = float("inf")
        for i in range(int(os.environ.get("REPS", 3))):  # best of three, as gemm_bench's f32
            w = ws[(i + 1) % copies]
            t = time.perf_counter()
            torch.nn.functional.linear(a, w)
            s = min(s, time.perf_counter() - t)
        print(f"torch {name} {m}x{k}x{n}: {2 * m * k * n / s / 1e9:.0f} GFLOP/s ({s * 1e3:.1f} ms)")
