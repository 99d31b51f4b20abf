"""Reference images of the embedded demo model (models/demo) from diffusers, for given noise, so the
Rust test (tests/demo.rs) can check mmdit draws the same pictures (tests/fixtures/demo-ref), and the
PSNR of diffusers' own bf16 images against its f32 ones, the floor of the bf16 test
(tests/fixtures/demo-bf16):

    python scripts/make_demo_fixture.py [ref|bf16]   (both without an argument)
"""

import itertools
import json
import os
import sys

import numpy as np
import torch
import diffusers
from diffusers import StableDiffusion3Pipeline
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(__file__), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "demo-ref")
OUT_BF16 = os.path.join(ROOT, "tests", "fixtures", "demo-bf16")
# Twelve prompts over every colour, shape and background, most at the default 28 steps (the f32 parity
# check).
RUNS = [
    dict(prompt=f"a {colour} {shape} on a {bg} background", steps=steps, guidance=4.0)
    for colour, shape, bg, steps in [
        ("red", "circle", "white", 28), ("blue", "triangle", "gray", 4), ("green", "square", "black", 28),
        ("yellow", "circle", "gray", 28), ("purple", "triangle", "white", 28), ("orange", "square", "white", 4),
        ("red", "square", "black", 28), ("blue", "circle", "white", 28), ("green", "triangle", "gray", 28),
        ("yellow", "square", "white", 28), ("purple", "circle", "black", 4), ("orange", "triangle", "gray", 28),
    ]
]


# The bf16 set: every colour x shape x background once, at 4 steps. Per image the PSNR of a bf16 run
# against the f32 image is chaotic (edges a pixel either way): between diffusers' and mmdit's bf16 the
# per-image difference has a standard deviation of 3.3 dB at 4 steps and 4.6 dB at 28 (54 prompts
# each, measured with other seeds), so the mean over 54 images at 4 steps has a standard error of
# 0.45 dB, where the 12 images of demo-ref (most at 28 steps) had 1.1, for fewer model evaluations.
BF16_RUNS = [
    dict(prompt=f"a {colour} {shape} on a {bg} background", steps=4, guidance=4.0)
    for colour, shape, bg in itertools.product(
        ["red", "green", "blue", "yellow", "purple", "orange"], ["circle", "square", "triangle"],
        ["white", "black", "gray"])
]


def psnr_db(a, b):
    mse = ((np.array(a, np.float64) - np.array(b, np.float64)) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def pipelines():
    """The demo in f32 and in bf16, and the T5 length it was trained with (scripts/train_demo.py),
    as its preset uses."""
    with open(os.path.join(ROOT, "models", "demo", "training.json")) as fh:
        max_seq = json.load(fh)["max_sequence_length"]
    pipe = StableDiffusion3Pipeline.from_pretrained(os.path.join(ROOT, "models", "demo"), torch_dtype=torch.float32)
    pipe16 = StableDiffusion3Pipeline.from_pretrained(os.path.join(ROOT, "models", "demo"), torch_dtype=torch.bfloat16)
    return pipe, pipe16, max_seq


def bf16_set():
    os.makedirs(OUT_BF16, exist_ok=True)
    pipe, pipe16, max_seq = pipelines()
    g = torch.Generator().manual_seed(6)
    noises, tensors, runs = {}, {}, []
    for k, r in enumerate(BF16_RUNS):
        noise = torch.randn((1, 4, 16, 16), generator=g)
        noises[f"run.{k}.noise"] = noise
        kw = dict(num_inference_steps=r["steps"], guidance_scale=r["guidance"], height=64, width=64,
                  max_sequence_length=max_seq, output_type="pil")
        img = pipe(r["prompt"], latents=noise, **kw).images[0]
        tensors[f"run.{k}.image"] = torch.from_numpy(np.array(img).copy())
        img16 = pipe16(r["prompt"], latents=noise.to(torch.bfloat16), **kw).images[0]
        runs.append(dict(r, diffusers_bf16_psnr_db=round(min(psnr_db(img16, img), 99.0), 2)))
    save_file(noises, os.path.join(OUT_BF16, "noise.safetensors"))
    save_file(tensors, os.path.join(OUT_BF16, "reference.safetensors"))
    with open(os.path.join(OUT_BF16, "fixture.json"), "w") as fh:
        json.dump({"generator": "scripts/make_demo_fixture.py bf16", "torch": torch.__version__,
                   "diffusers": diffusers.__version__, "seed": 6, "max_sequence_length": max_seq,
                   "runs": runs}, fh, indent=1)


def reference_set():
    os.makedirs(OUT, exist_ok=True)
    pipe, pipe16, max_seq = pipelines()
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
        runs.append(dict(r, noise=f"noise_{k}.safetensors", diffusers_bf16_psnr_db=round(psnr_db(img16, img), 2)))
    save_file(tensors, os.path.join(OUT, "reference.safetensors"))
    with open(os.path.join(OUT, "fixture.json"), "w") as fh:
        json.dump({"generator": "scripts/make_demo_fixture.py", "torch": torch.__version__,
                   "diffusers": diffusers.__version__, "seed": 5, "max_sequence_length": max_seq, "runs": runs}, fh, indent=1)


if __name__ == "__main__":
    which = sys.argv[1:] or ["ref", "bf16"]
    if not set(which) <= {"ref", "bf16"}:
        sys.exit(f"unknown fixture {which}: give ref, bf16 or nothing for both")
    if "ref" in which:
        reference_set()
    if "bf16" in which:
        bf16_set()
