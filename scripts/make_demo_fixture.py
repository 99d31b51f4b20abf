"""Reference images of the embedded demo model (models/demo) from diffusers, for given noise, so the
Rust test (tests/demo.rs) can check mmdit draws the same pictures, and the PSNR of diffusers' own bf16
images against its f32 ones (the floor of the bf16 test):

    python scripts/make_demo_fixture.py
"""

import json
import os

import numpy as np
import torch
import diffusers
from diffusers import StableDiffusion3Pipeline
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(__file__), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "demo-ref")
# Twelve prompts over every colour, shape and background, most at the default 28 steps: bf16 rounding
# moves the demo's hard shape edges by a pixel here and there, so one image's PSNR varies by several dB
# between two bf16 engines; the bf16 check compares means over these.
RUNS = [
    dict(prompt=f"a {colour} {shape} on a {bg} background", steps=steps, guidance=4.0)
    for colour, shape, bg, steps in [
        ("red", "circle", "white", 28), ("blue", "triangle", "gray", 4), ("green", "square", "black", 28),
        ("yellow", "circle", "gray", 28), ("purple", "triangle", "white", 28), ("orange", "square", "white", 4),
        ("red", "square", "black", 28), ("blue", "circle", "white", 28), ("green", "triangle", "gray", 28),
        ("yellow", "square", "white", 28), ("purple", "circle", "black", 4), ("orange", "triangle", "gray", 28),
    ]
]


def main():
    os.makedirs(OUT, exist_ok=True)
    # The T5 length the model was trained with (scripts/train_demo.py), as its preset uses.
    with open(os.path.join(ROOT, "models", "demo", "training.json")) as fh:
        max_seq = json.load(fh)["max_sequence_length"]
    pipe = StableDiffusion3Pipeline.from_pretrained(os.path.join(ROOT, "models", "demo"), torch_dtype=torch.float32)
    pipe16 = StableDiffusion3Pipeline.from_pretrained(os.path.join(ROOT, "models", "demo"), torch_dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    tensors, runs = {}, []
    for k, r in enumerate(RUNS):
        noise = torch.randn((1, 4, 16, 16), generator=g)
        save_file({"noise": noise}, os.path.join(OUT, f"noise_{k}.safetensors"))
        img = pipe(r["prompt"], num_inference_steps=r["steps"], guidance_scale=r["guidance"], height=64, width=64,
                   latents=noise, max_sequence_length=max_seq, output_type="pil").images[0]
        tensors[f"run.{k}.image"] = torch.from_numpy(np.array(img).copy())
        img16 = pipe16(r["prompt"], num_inference_steps=r["steps"], guidance_scale=r["guidance"], height=64, width=64,
                       latents=noise.to(torch.bfloat16), max_sequence_length=max_seq, output_type="pil").images[0]
        mse = ((np.array(img16, np.float64) - np.array(img, np.float64)) ** 2).mean()
        psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
        runs.append(dict(r, noise=f"noise_{k}.safetensors", diffusers_bf16_psnr_db=round(psnr, 2)))
    save_file(tensors, os.path.join(OUT, "reference.safetensors"))
    with open(os.path.join(OUT, "fixture.json"), "w") as fh:
        json.dump({"generator": "scripts/make_demo_fixture.py", "torch": torch.__version__,
                   "diffusers": diffusers.__version__, "seed": 5, "max_sequence_length": max_seq, "runs": runs}, fh, indent=1)


if __name__ == "__main__":
    main()
