"""Tiled VAE decoding and encoding (`enable_tiling()`) against diffusers 0.42.1 on the tiny VAEs of
tests/fixtures/ (AutoencoderKL of flux-dev-tiny, AutoencoderKLFlux2 of flux2-klein-tiny; both with
sample_size 32 and 2 levels, so 16-latent tiles every 12 latents, blended over 8 pixels; encoding:
32-pixel tiles every 24 pixels, blended over 4 latents). For tests/vae_tiling.rs.

    pip install -r scripts/requirements.txt
    python scripts/make_tiling_fixtures.py

Writes tests/fixtures/vae-tiling/{reference.safetensors,fixture.json}.
"""

import json
import os
import sys

import torch
import diffusers
from diffusers import AutoencoderKL, AutoencoderKLFlux2
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from make_sd3_fixtures import ROOT, SEED  # noqa: E402

OUT = os.path.join(ROOT, "vae-tiling")
# (fixture, class, latent (h, w) to decode, image (h, w) to encode): not multiples of the stride.
CASES = [
    ("flux-dev-tiny", AutoencoderKL, (40, 28), (72, 56)),
    ("flux2-klein-tiny", AutoencoderKLFlux2, (17, 30), (34, 66)),
]


def main():
    torch.set_grad_enabled(False)
    os.makedirs(OUT, exist_ok=True)
    g = torch.Generator().manual_seed(SEED + 31)
    tensors = {}
    meta = {"generator": "scripts/make_tiling_fixtures.py", "torch": torch.__version__,
            "diffusers": diffusers.__version__, "seed": SEED, "cases": []}
    for name, cls, (zh, zw), (xh, xw) in CASES:
        vae = cls.from_pretrained(os.path.join(ROOT, name, "vae")).eval()
        z = torch.randn((1, vae.config.latent_channels, zh, zw), generator=g)
        x = torch.rand((1, 3, xh, xw), generator=g) * 2 - 1
        plain = vae.decode(z).sample
        vae.enable_tiling()
        tiled = vae.decode(z).sample
        dist = vae.encode(x).latent_dist
        assert (tiled - plain).abs().max() > 1e-3, "tiling changed nothing"
        tensors.update({f"{name}.z": z, f"{name}.decoded": tiled, f"{name}.x": x,
                        f"{name}.mean": dist.mean, f"{name}.logvar": dist.logvar})
        meta["cases"].append(dict(model=name, latent=[zh, zw], image=[xh, xw]))
        print(name, tuple(tiled.shape), tuple(dist.mean.shape), float((tiled - plain).abs().max()))
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "reference.safetensors"))
    with open(os.path.join(OUT, "fixture.json"), "w") as fh:
        json.dump(meta, fh, indent=1)


if __name__ == "__main__":
    main()
