"""float8 twins of the single-file fixtures, and diffusers' images from their weights as PyTorch
casts them, for the fp8 reader (src/loader/weights.rs, tests/fp8.rs):

    python scripts/make_fp8_fixtures.py

From tests/fixtures/single/ (BFL FLUX.1 and SAI SD3.5 twins of flux-dev-tiny and sd35-tiny) writes,
under tests/fixtures/fp8/<variant>/:
- `model.safetensors`: the file with every 2-D weight in float8 (biases, norms and the rest as they
  were): `e4m3fn` and `e5m2` cast directly (`w.to(torch.float8_e4m3fn)`), `e4m3fn-scaled` as
  ComfyUI's scaled fp8 (`w / s` cast, `<layer>.scale_weight` = s = max|w| / 448 in f32, and a
  `scaled_fp8` marker tensor);
- `expected.safetensors`: each float8 weight as PyTorch widens it (`w8.float() * s`);
- `reference.safetensors` + `fixture.json`: diffusers' images (f32) from those widened weights,
  loaded with `from_single_file`, for every recorded run of the twin, with the twin's noise.
"""

import json
import os
import sys
import tempfile

import numpy as np
import torch
import diffusers
from diffusers import FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(__file__))
from make_gguf_fixtures import flux_width_converter  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
FIX = os.path.join(ROOT, "tests", "fixtures")

VARIANTS = [
    ("flux-dev-tiny-e4m3fn", "flux-dev-tiny", "flux1-dev-tiny.safetensors", torch.float8_e4m3fn, False),
    ("flux-dev-tiny-e5m2", "flux-dev-tiny", "flux1-dev-tiny.safetensors", torch.float8_e5m2, False),
    ("flux-dev-tiny-e4m3fn-scaled", "flux-dev-tiny", "flux1-dev-tiny.safetensors", torch.float8_e4m3fn, True),
    ("sd35-tiny-e4m3fn-scaled", "sd35-tiny", "sd35_tiny.safetensors", torch.float8_e4m3fn, True),
]


def to_fp8(sd, dtype, scaled):
    out, expected = {}, {}
    for k, w in sd.items():
        if w.ndim != 2 or not k.endswith(".weight"):
            out[k] = w
            continue
        if scaled:
            s = (w.abs().max().float() / 448.0).clamp(min=1e-12)
            w8 = (w.float() / s).to(dtype)
            out[k] = w8
            out[k[: -len(".weight")] + ".scale_weight"] = s.reshape(())
            expected[k] = w8.float() * s
        else:
            w8 = w.to(dtype)
            out[k] = w8
            expected[k] = w8.float()
    if scaled:
        out["scaled_fp8"] = torch.zeros(2, dtype=dtype)
    return out, expected


def main():
    torch.set_grad_enabled(False)
    flux_width_converter(32)
    for name, twin, fname, dtype, scaled in VARIANTS:
        out_dir = os.path.join(FIX, "fp8", name)
        os.makedirs(out_dir, exist_ok=True)
        src = load_file(os.path.join(FIX, "single", twin, fname))
        fp8, expected = to_fp8(src, dtype, scaled)
        save_file(fp8, os.path.join(out_dir, "model.safetensors"))
        save_file(expected, os.path.join(out_dir, "expected.safetensors"))
        widened = {k: expected.get(k, v.float()) for k, v in src.items()}
        folder = os.path.join(FIX, twin)
        flux = twin.startswith("flux")
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, fname)
            save_file({k: v.contiguous() for k, v in widened.items()}, path)
            cls = FluxTransformer2DModel if flux else SD3Transformer2DModel
            model = cls.from_single_file(path, config=folder, subfolder="transformer", local_files_only=True,
                                         torch_dtype=torch.float32)
        pipe_cls = FluxPipeline if flux else StableDiffusion3Pipeline
        pipe = pipe_cls.from_pretrained(folder, transformer=model, torch_dtype=torch.float32, local_files_only=True)
        meta = json.load(open(os.path.join(folder, "fixture.json")))
        tensors = {}
        for k, r in enumerate(meta["runs"]):
            noise = load_file(os.path.join(folder, r["noise"]))["noise"]
            lat = pipe._pack_latents(noise, 1, noise.shape[1], noise.shape[2], noise.shape[3]) if flux else noise
            kw = {}
            if "negative_prompt" in r:
                kw["negative_prompt"] = r["negative_prompt"]
            if "true_cfg" in r:
                kw["true_cfg_scale"] = r["true_cfg"]
            img = pipe(prompt=r["prompt"], num_inference_steps=r["steps"], guidance_scale=r["guidance"],
                       height=r["height"], width=r["width"], latents=lat,
                       max_sequence_length=meta["max_sequence_length"], output_type="pil", **kw).images[0]
            tensors[f"run.{k}.image"] = torch.from_numpy(np.array(img).copy())
        save_file(tensors, os.path.join(out_dir, "reference.safetensors"))
        with open(os.path.join(out_dir, "fixture.json"), "w") as fh:
            json.dump({"generator": "scripts/make_fp8_fixtures.py", "torch": torch.__version__,
                       "diffusers": diffusers.__version__, "twin": twin, "file": f"single/{twin}/{fname}",
                       "float8": str(dtype).replace("torch.", ""), "scaled": scaled,
                       "max_sequence_length": meta["max_sequence_length"], "runs": meta["runs"]}, fh, indent=1)
        print(f"wrote tests/fixtures/fp8/{name}: {len(expected)} float8 weights")


if __name__ == "__main__":
    sys.exit(main())
