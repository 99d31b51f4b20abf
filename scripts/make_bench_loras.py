"""Random LoRAs for the real-width bench model flux-bench (scripts/make_bench_models.py), in kohya's
FLUX.1 layout over every linear layer of its blocks (image/text q-k-v, projections, MLPs, modulations;
the single blocks' linear1/linear2/modulation), as most published FLUX.1 LoRAs are. For the LoRA rows of
docs/performance.md: merge time (rank 64) and the run-time path's cost per step (rank 16).

    python scripts/make_bench_loras.py       # writes bench-models/loras/flux-bench-r{16,64}.safetensors
"""

import json
import os

import torch
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(__file__), "..", "bench-models")


def main():
    cfg = json.load(open(os.path.join(ROOT, "flux-bench", "transformer", "config.json")))
    dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    mlp = 4 * dim
    mods = []
    for i in range(cfg["num_layers"]):
        for s in ["img", "txt"]:
            mods += [(f"double_blocks_{i}_{s}_attn_qkv", 3 * dim, dim), (f"double_blocks_{i}_{s}_attn_proj", dim, dim),
                     (f"double_blocks_{i}_{s}_mlp_0", mlp, dim), (f"double_blocks_{i}_{s}_mlp_2", dim, mlp),
                     (f"double_blocks_{i}_{s}_mod_lin", 6 * dim, dim)]
    for i in range(cfg["num_single_layers"]):
        mods += [(f"single_blocks_{i}_linear1", 3 * dim + mlp, dim), (f"single_blocks_{i}_linear2", dim, dim + mlp),
                 (f"single_blocks_{i}_modulation_lin", 3 * dim, dim)]
    os.makedirs(os.path.join(ROOT, "loras"), exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for rank in [16, 64]:
        sd = {}
        for name, o, i in mods:
            sd[f"lora_unet_{name}.lora_down.weight"] = (torch.randn(rank, i, generator=g) / i ** 0.5).bfloat16()
            sd[f"lora_unet_{name}.lora_up.weight"] = (torch.randn(o, rank, generator=g) * 0.01).bfloat16()
            sd[f"lora_unet_{name}.alpha"] = torch.tensor(float(rank)).bfloat16()
        path = os.path.join(ROOT, "loras", f"flux-bench-r{rank}.safetensors")
        save_file(sd, path)
        print(path, sum(v.numel() for v in sd.values()), "parameters")


if __name__ == "__main__":
    main()
