"""Tiny random FLUX.2 transformers (`Flux2Transformer2DModel`, diffusers 0.42.1) and their outputs on
random inputs, for the parity test of the FLUX.2 transformer (tests/flux2.rs):

    pip install -r scripts/requirements.txt
    python scripts/make_flux2_fixtures.py

Writes tests/fixtures/flux2-transformer/<name>/ (config.json, diffusion_pytorch_model.safetensors,
reference.safetensors, fixture.json) for a [klein]-like model (no guidance embedding) and a
[dev]-like one (guidance embedding), each on a non-square latent grid and a batch of two.
"""

import json
import os
import sys

import torch
import diffusers
from diffusers import Flux2Transformer2DModel
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from make_sd3_fixtures import ROOT, SEED, randomize  # noqa: E402

OUT = os.path.join(ROOT, "flux2-transformer")

TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=32, mlp_ratio=3.0,
            axes_dims_rope=[4, 4, 4, 4], rope_theta=2000)


def main():
    torch.set_grad_enabled(False)
    for name, guidance in [("klein-tiny", False), ("dev-tiny", True)]:
        torch.manual_seed(SEED)
        model = Flux2Transformer2DModel(**TINY, guidance_embeds=guidance).eval()
        randomize(model)
        out = os.path.join(OUT, name)
        model.save_pretrained(out)
        g = torch.Generator().manual_seed(SEED + 5)
        b, h, w, s = 2, 3, 5, 7
        x = torch.randn((b, h * w, TINY["in_channels"]), generator=g)
        ctx = torch.randn((b, s, TINY["joint_attention_dim"]), generator=g)
        sigma = torch.tensor([1.0, 0.3575])
        gd = torch.tensor([4.0, 2.5]) if guidance else None
        # diffusers' _prepare_text_ids / _prepare_latent_ids: (t, h, w, l)
        txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(s))
        img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))
        y = model(hidden_states=x, encoder_hidden_states=ctx, timestep=sigma, img_ids=img_ids, txt_ids=txt_ids,
                  guidance=gd, return_dict=False)[0]
        t = {"x": x, "context": ctx, "sigma": sigma, "out": y}
        if gd is not None:
            t["guidance"] = gd
        save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(out, "reference.safetensors"))
        with open(os.path.join(out, "fixture.json"), "w") as fh:
            json.dump({"generator": "scripts/make_flux2_fixtures.py", "torch": torch.__version__,
                       "diffusers": diffusers.__version__, "seed": SEED, "grid": [h, w], "text_tokens": s}, fh,
                      indent=1)
        print(name, "max |out|", float(y.abs().max()))


if __name__ == "__main__":
    main()
