"""FLUX.2 reference-image editing against diffusers 0.42.1's `Flux2KleinPipeline(image=[...])` on the
tiny FLUX.2 [klein] fixtures (tests/fixtures/flux2-edit, tests/flux2.rs): one and two reference
images of their own sizes (cropped to the model's multiple, centred), with and without guidance.

    pip install -r scripts/requirements.txt
    python scripts/make_flux2_fixtures.py        # the models
    python scripts/make_flux2_edit_fixtures.py

Writes the input PNGs, `reference.safetensors` (each run's initial noise, its references' latents
and the image) and `fixture.json` (script, versions, seed and every parameter of each run).
"""

import json
import os
import sys

import numpy as np
import torch
import diffusers
import transformers
from diffusers import Flux2KleinPipeline
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from make_edit_fixtures import drawing  # noqa: E402
from make_sd3_fixtures import PROMPTS, ROOT, SEED  # noqa: E402

OUT = os.path.join(ROOT, "flux2-edit")

# Inputs: sizes not multiples of the tiny model's 4 pixels, so the centred crop matters.
INPUTS = [(70, 90), (101, 66)]
RUNS = [
    dict(model="flux2-klein-tiny", images=[0], width=32, height=48, steps=3, guidance=4.0, prompt="make it blue"),
    dict(model="flux2-klein-tiny", images=[0, 1], steps=2, guidance=4.0, prompt=PROMPTS[0]),
    dict(model="flux2-klein-distilled-tiny", images=[1, 0], width=48, height=32, steps=2, guidance=1.0,
         prompt="a red circle"),
]


def main():
    torch.set_grad_enabled(False)
    os.makedirs(OUT, exist_ok=True)
    inputs = []
    for k, (w, h) in enumerate(INPUTS):
        img = drawing(w, h, SEED + 20 + k)
        img.save(os.path.join(OUT, f"input_{k}.png"))
        inputs.append(Image.open(os.path.join(OUT, f"input_{k}.png")).convert("RGB"))
    tensors = {}
    meta = {"generator": "scripts/make_flux2_edit_fixtures.py", "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__, "seed": SEED,
            "inputs": [f"input_{k}.png" for k in range(len(INPUTS))], "runs": []}
    g = torch.Generator().manual_seed(SEED + 21)
    pipes = {}
    for k, r in enumerate(RUNS):
        if r["model"] not in pipes:
            pipes[r["model"]] = Flux2KleinPipeline.from_pretrained(os.path.join(ROOT, r["model"]))
            pipes[r["model"]].set_progress_bar_config(disable=True)
        pipe = pipes[r["model"]]
        max_seq = json.load(open(os.path.join(ROOT, r["model"], "fixture.json")))["max_sequence_length"]
        images = [inputs[i] for i in r["images"]]
        # The output size diffusers takes when none is given: the first reference's, cropped.
        m = pipe.vae_scale_factor * 2
        width = r.get("width", images[0].size[0] // m * m)
        height = r.get("height", images[0].size[1] // m * m)
        c = pipe.transformer.config.in_channels
        noise = torch.randn((1, c, height // m, width // m), generator=g)
        tensors[f"run.{k}.noise"] = noise
        # The reference latents as the pipeline prepares them (cropped, encoded, patch-normalised).
        cropped = []
        for img in images:
            w, h = img.size
            cropped.append(pipe.image_processor.preprocess(img, height=h // m * m, width=w // m * m,
                                                           resize_mode="crop"))
        lat, ids = pipe.prepare_image_latents(cropped, 1, None, "cpu", torch.float32)
        tensors[f"run.{k}.references"] = lat
        tensors[f"run.{k}.reference_ids"] = ids
        kw = dict(height=r["height"], width=r["width"]) if "width" in r else {}
        img = pipe(image=images, prompt=r["prompt"], num_inference_steps=r["steps"], guidance_scale=r["guidance"],
                   latents=noise, max_sequence_length=max_seq, output_type="pil", **kw).images[0]
        assert img.size == (width, height), (img.size, width, height)
        tensors[f"run.{k}.image"] = torch.from_numpy(np.array(img).copy())
        meta["runs"].append(dict(r, width=width, height=height, size_given="width" in r, max_sequence_length=max_seq,
                                 noise=f"run.{k}.noise"))
        print(k, r["model"], (width, height), "references", tuple(lat.shape))
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "reference.safetensors"))
    with open(os.path.join(OUT, "fixture.json"), "w") as fh:
        json.dump(meta, fh, indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main()
