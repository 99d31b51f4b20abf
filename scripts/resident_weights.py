"""Bytes of weights a bf16 CPU run of a bench model holds (MiB), for scripts/bench_gguf.sh:
the transformer from a GGUF file (blocks as stored, float tensors at bf16) or from the folder (bf16),
the text encoders at bf16 and the VAE at f32 (mmdit runs the CPU VAE in f32).

  python3 scripts/resident_weights.py bench-models/flux-bench [bench-models/gguf/flux-bench-q8_0.gguf]
"""
import json
import struct
import sys
from pathlib import Path


def elements(folder: Path) -> int:
    """Elements of every tensor in a diffusers component folder's safetensors files."""
    n = 0
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for k, v in header.items():
            if k != "__metadata__":
                count = 1
                for d in v["shape"]:
                    count *= d
                n += count
    return n


def main() -> None:
    model = Path(sys.argv[1])
    total = 0
    for part in sorted(p for p in model.iterdir() if p.is_dir()):
        if part.name == "transformer" and len(sys.argv) > 2:
            continue
        per = 4 if part.name == "vae" else 2
        total += elements(part) * per
    if len(sys.argv) > 2:
        import gguf

        for t in gguf.GGUFReader(sys.argv[2]).tensors:
            if t.tensor_type.name in ("F32", "F16", "BF16"):
                total += int(t.n_elements) * 2
            else:
                total += int(t.n_bytes)
    print(f"{total / 2**20:.0f}")


if __name__ == "__main__":
    main()
