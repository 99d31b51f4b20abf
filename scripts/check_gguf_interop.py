"""Reads a GGUF file written by `mmdit convert` the way the Python tools do and compares it with the
model it was converted from: the `gguf` package's reader (which ComfyUI-GGUF uses) for the header,
and diffusers' `from_single_file(..., quantization_config=GGUFQuantizationConfig(...))` for the
names and the dequantized weights.

    mmdit convert tests/fixtures/sd35-tiny --quantize q8_0 -o /tmp/sd35-q8_0.gguf
    python scripts/check_gguf_interop.py /tmp/sd35-q8_0.gguf tests/fixtures/sd35-tiny

Prints the architecture, the tensor count, and the worst relative error of a weight (max |a - b| /
max |b|); fails when a tensor is missing or a name does not map.
"""

import os
import sys

import gguf
import torch
from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig, SD3Transformer2DModel
from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(__file__))
from make_gguf_fixtures import flux_width_converter  # noqa: E402


def main(path, folder):
    r = gguf.GGUFReader(path)
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    cls = {"flux": FluxTransformer2DModel, "sd3": SD3Transformer2DModel}[arch]
    ref = {}
    d = os.path.join(folder, "transformer")
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            ref.update(load_file(os.path.join(d, f)))
    if arch == "flux":
        flux_width_converter(ref["x_embedder.weight"].shape[0])
    m = cls.from_single_file(path, config=folder, subfolder="transformer", local_files_only=True,
                             quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
                             torch_dtype=torch.float32)
    sd = m.state_dict()
    assert set(sd) == set(ref), f"names differ: {sorted(set(sd) ^ set(ref))[:6]}"
    worst = 0.0
    for k, v in sd.items():
        x = dequantize_gguf_tensor(v).float() if hasattr(v, "quant_type") else v.float()
        worst = max(worst, (x.reshape(ref[k].shape) - ref[k].float()).abs().max().item()
                    / (ref[k].abs().max().item() + 1e-12))
    print(f"{path}: architecture {arch}, {len(r.tensors)} GGUF tensors -> {len(sd)} diffusers tensors, "
          f"worst relative error {worst:.4f}")


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
