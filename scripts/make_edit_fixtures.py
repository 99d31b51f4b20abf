"""Reference outputs of diffusers' editing pipelines on the tiny random models of tests/fixtures/, for
the editing parity tests (tests/edit.rs): the image processor's resize, the VAE encoder, and whole
img2img runs from recorded noise.

    pip install -r scripts/requirements.txt
    python scripts/make_sd3_fixtures.py && python scripts/make_flux_fixtures.py   # the models
    python scripts/make_edit_fixtures.py

Writes tests/fixtures/edit/: the input images (PNG), `reference.safetensors` and `fixture.json` (the
script, versions, seeds and every parameter of each run). Each run draws its noise from a torch
generator seeded with the run's seed, as diffusers does: first the VAE latent distribution's sample
noise (`eps`), then the initial noise (`noise`); both are saved so the Rust side can inject them.
"""

import json
import os
import sys

import numpy as np
import torch
import diffusers
import transformers
from diffusers import (
    FluxFillPipeline,
    FluxImg2ImgPipeline,
    FluxKontextPipeline,
    FluxInpaintPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3InpaintPipeline,
    StableDiffusion3Pipeline,
)
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from make_sd3_fixtures import randomize  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
OUT = os.path.join(ROOT, "edit")


def drawing(width, height, seed):
    """A smooth colour gradient with a disc and a little noise: content a resize visibly changes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([x / max(width - 1, 1), y / max(height - 1, 1), 0.5 + 0.5 * np.sin(x / 3.0 + y / 5.0)], -1)
    cy, cx, r = height * 0.45, width * 0.55, min(width, height) * 0.3
    disc = (x - cx) ** 2 + (y - cy) ** 2 < r * r
    img[disc] = [0.9, 0.1, 0.15]
    img = img * 255 + rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8), "RGB")


def mask_drawing(width, height, mode):
    """A soft-edged ellipse, white inside: grays around 0.5 at its edge, so the resize and the
    binarisation both matter."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    d = ((x - width * 0.4) / (width * 0.3)) ** 2 + ((y - height * 0.5) / (height * 0.35)) ** 2
    v = np.clip((1.3 - d) / 0.6, 0, 1) * 255
    img = Image.fromarray(v.round().astype(np.uint8), "L")
    return img.convert(mode)


RUNS = [
    # SD3.5-like (qk norm, dual attention, CFG with a negative prompt), input resized down and stretched.
    dict(model="sd35-tiny", input=(45, 29), width=32, height=48, strength=0.6, steps=4, guidance=7.0,
         negative_prompt="blurry", prompt="a blue circle on a white background", seed=11, max_sequence_length=32),
    # No T5, dynamic shift, full strength, input at the output size (no resize).
    dict(model="sd3-no-t5", input=(48, 32), width=48, height=32, strength=1.0, steps=3, guidance=4.5,
         prompt="a red square", seed=12, max_sequence_length=16),
    # FLUX.1-schnell-like: input resized up.
    dict(model="flux-schnell-tiny", input=(21, 30), width=32, height=48, strength=0.75, steps=4, guidance=0.0,
         prompt="a blue circle on a white background", seed=13, max_sequence_length=24),
    # FLUX.1-dev-like (guidance embedding), low strength.
    dict(model="flux-dev-tiny", input=(40, 24), width=40, height=24, strength=0.45, steps=5, guidance=3.5,
         prompt="a green circle", seed=14, max_sequence_length=24),
    # Inpainting: SD3.5-like with CFG, a gray mask of another size than the image.
    dict(model="sd35-tiny", input=(45, 29), width=32, height=48, strength=0.8, steps=4, guidance=7.0,
         negative_prompt="blurry", prompt="a blue circle", seed=21, max_sequence_length=32,
         mask=(30, 40), mask_mode="L"),
    # Inpainting at full strength (pure noise start), an RGB mask at the image's size.
    dict(model="sd3-no-t5", input=(48, 32), width=48, height=32, strength=1.0, steps=3, guidance=4.5,
         prompt="a red square", seed=22, max_sequence_length=16, mask=(48, 32), mask_mode="RGB"),
    dict(model="flux-schnell-tiny", input=(21, 30), width=32, height=48, strength=0.6, steps=4, guidance=0.0,
         prompt="a blue circle", seed=23, max_sequence_length=24, mask=(16, 24), mask_mode="L"),
    dict(model="flux-dev-tiny", input=(40, 24), width=40, height=24, strength=0.9, steps=5, guidance=3.5,
         prompt="a green circle", seed=24, max_sequence_length=24, mask=(40, 24), mask_mode="L"),
    # FLUX.1 Fill: its default full strength, a resized input and a mask of another size.
    dict(model="flux-fill-tiny", input=(45, 29), width=32, height=48, strength=1.0, steps=4, guidance=30.0,
         prompt="a blue circle", seed=31, max_sequence_length=24, mask=(30, 40), mask_mode="L"),
    # FLUX.1 Fill from the input's latents (strength below 1), non-square.
    dict(model="flux-fill-tiny", input=(40, 24), width=40, height=24, strength=0.7, steps=5, guidance=10.0,
         prompt="a green circle", seed=32, max_sequence_length=24, mask=(40, 24), mask_mode="RGB"),
    # FLUX.1 Kontext: a 45x29 reference (kept at its size rounded down, `_auto_resize=False`: the
    # training resolutions would make thousands of reference tokens on a tiny model), a portrait
    # output request that the pipeline rescales to its default area (256x256 for this model).
    dict(model="flux-kontext-tiny", input=(45, 29), width=32, height=48, steps=3, guidance=2.5,
         prompt="make it blue", seed=41, max_sequence_length=24, kontext=True),
]


def odd_inputs():
    """Inputs that must be converted, not refused: a CMYK JPEG and a JPEG whose EXIF orientation says
    "rotate 90 degrees clockwise". Each is saved with PIL's own reading of it (`*.expected.png`:
    `ImageOps.exif_transpose` + RGB), which the decoder is compared against."""
    from PIL import ImageOps

    base = drawing(30, 20, seed=7)
    cmyk = base.convert("CMYK")
    cmyk.save(os.path.join(OUT, "cmyk.jpg"), quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6
    base.save(os.path.join(OUT, "exif6.jpg"), quality=95, exif=exif.tobytes())
    for name in ["cmyk.jpg", "exif6.jpg"]:
        with Image.open(os.path.join(OUT, name)) as im:
            ImageOps.exif_transpose(im).convert("RGB").save(os.path.join(OUT, name.replace(".jpg", ".expected.png")))


def build_fill():
    """tests/fixtures/flux-fill-tiny: flux-dev-tiny's VAE, text encoders and scheduler with a FLUX.1
    Fill transformer (input: 4 x (latents + masked-image latents + the mask folded into f x f
    channels) per 2x2 patch; output: 4 x latents)."""
    dev = FluxPipeline.from_pretrained(os.path.join(ROOT, "flux-dev-tiny"), torch_dtype=torch.float32)
    cfg = dict(dev.transformer.config)
    latent, f = dev.vae.config.latent_channels, dev.vae_scale_factor
    keep = ["patch_size", "num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads",
            "joint_attention_dim", "pooled_projection_dim", "guidance_embeds", "axes_dims_rope"]
    torch.manual_seed(0)
    tr = FluxTransformer2DModel(**{k: cfg[k] for k in keep}, in_channels=4 * (2 * latent + f * f),
                                out_channels=4 * latent).eval()
    randomize(tr)
    fill = FluxFillPipeline(transformer=tr, scheduler=dev.scheduler, vae=dev.vae, text_encoder=dev.text_encoder,
                            tokenizer=dev.tokenizer, text_encoder_2=dev.text_encoder_2, tokenizer_2=dev.tokenizer_2)
    fill.save_pretrained(os.path.join(ROOT, "flux-fill-tiny"))


def kontext_run(pipe, r, k, img, name, tensors):
    """A FLUX.1 Kontext run: the reference kept at its size rounded down to the multiple, the output
    size rescaled to the pipeline's area (`max_area`, here the tiny model's default 256x256), the
    noise the generator's first draw (the reference is encoded with `sample_mode="argmax"`)."""
    m = pipe.vae_scale_factor * 2
    rw, rh = r["input"][0] // m * m, r["input"][1] // m * m
    ref = pipe.image_processor.preprocess(pipe.image_processor.resize(img, rh, rw), rh, rw)
    tensors[f"run.{k}.pre"] = ref
    with torch.no_grad():
        dist = pipe.vae.encode(ref).latent_dist
    tensors[f"run.{k}.enc.mean"] = dist.mean
    tensors[f"run.{k}.enc.logvar"] = dist.logvar
    area = (pipe.default_sample_size * pipe.vae_scale_factor) ** 2
    ratio = r["width"] / r["height"]
    w, h = round((area * ratio) ** 0.5) // m * m, round((area / ratio) ** 0.5) // m * m
    g = torch.Generator("cpu").manual_seed(r["seed"])
    c = pipe.vae.config.latent_channels
    tensors[f"run.{k}.noise"] = randn_tensor((1, c, h // pipe.vae_scale_factor, w // pipe.vae_scale_factor),
                                             generator=g, dtype=torch.float32)
    out = pipe(prompt=r["prompt"], image=img, num_inference_steps=r["steps"], guidance_scale=r["guidance"],
               height=r["height"], width=r["width"], max_sequence_length=r["max_sequence_length"], max_area=area,
               _auto_resize=False, output_type="pil", generator=torch.Generator("cpu").manual_seed(r["seed"])).images[0]
    assert out.size == (w, h), (out.size, w, h)
    tensors[f"run.{k}.image"] = torch.from_numpy(np.array(out).copy())
    tensors[f"run.{k}.sigmas"] = pipe.scheduler.sigmas.clone()
    print(f"run {k} ({r['model']}): {r['steps']} steps, reference {rw}x{rh}, output {w}x{h}")
    return dict(r, input=name, input_size=list(r["input"]), reference_size=[rw, rh], output_size=[w, h])


def build_kontext():
    """tests/fixtures/flux-kontext-tiny: flux-dev-tiny as a FLUX.1 Kontext pipeline (the same
    transformer; the reference image's latents join the sequence)."""
    dev = FluxPipeline.from_pretrained(os.path.join(ROOT, "flux-dev-tiny"), torch_dtype=torch.float32)
    FluxKontextPipeline(**{k: v for k, v in dev.components.items() if k in (
        "transformer", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")}
    ).save_pretrained(os.path.join(ROOT, "flux-kontext-tiny"))


def main():
    os.makedirs(OUT, exist_ok=True)
    build_fill()
    build_kontext()
    odd_inputs()
    torch.set_num_threads(2)
    tensors = {}
    meta = {
        "generator": "scripts/make_edit_fixtures.py",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "runs": [],
    }
    for k, r in enumerate(RUNS):
        folder = os.path.join(ROOT, r["model"])
        flux = r["model"].startswith("flux")
        with open(os.path.join(folder, "model_index.json")) as fh:
            saved = json.load(fh)
        # Components the tiny pipeline was saved without (e.g. no T5) are passed as None.
        absent = {c: None for c in ["text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor"]
                  if saved.get(c, [None])[0] is None}
        base = (FluxPipeline if flux else StableDiffusion3Pipeline).from_pretrained(
            folder, torch_dtype=torch.float32, **absent)
        inpaint = "mask" in r
        if r["model"] == "flux-fill-tiny":
            cls = FluxFillPipeline
        elif r.get("kontext"):
            cls = FluxKontextPipeline
        elif inpaint:
            cls = FluxInpaintPipeline if flux else StableDiffusion3InpaintPipeline
        else:
            cls = FluxImg2ImgPipeline if flux else StableDiffusion3Img2ImgPipeline
        pipe = cls.from_pipe(base)
        pipe.set_progress_bar_config(disable=True)
        img = drawing(*r["input"], seed=r["seed"])
        name = f"input_{k}.png"
        img.save(os.path.join(OUT, name))

        if cls is FluxKontextPipeline:
            meta["runs"].append(kontext_run(pipe, r, k, img, name, tensors))
            continue

        # The image processor's resize and normalisation, and the VAE encoder on its output.
        pre = pipe.image_processor.preprocess(img, height=r["height"], width=r["width"])
        tensors[f"run.{k}.pre"] = pre
        with torch.no_grad():
            dist = pipe.vae.encode(pre).latent_dist
        tensors[f"run.{k}.enc.mean"] = dist.mean
        tensors[f"run.{k}.enc.logvar"] = dist.logvar

        # The two draws the pipeline makes from its generator, in its order.
        g = torch.Generator("cpu").manual_seed(r["seed"])
        eps = randn_tensor(dist.mean.shape, generator=g, dtype=torch.float32)
        noise = randn_tensor(dist.mean.shape, generator=g, dtype=torch.float32)
        tensors[f"run.{k}.eps"] = eps
        tensors[f"run.{k}.noise"] = noise
        if cls is FluxFillPipeline:
            # Fill encodes the masked image third.
            tensors[f"run.{k}.eps2"] = randn_tensor(dist.mean.shape, generator=g, dtype=torch.float32)

        kwargs = dict(
            prompt=r["prompt"], image=img, strength=r["strength"], num_inference_steps=r["steps"],
            guidance_scale=r["guidance"], height=r["height"], width=r["width"],
            max_sequence_length=r["max_sequence_length"], output_type="pil",
            generator=torch.Generator("cpu").manual_seed(r["seed"]),
        )
        if "negative_prompt" in r:
            kwargs["negative_prompt"] = r["negative_prompt"]
        extra = {}
        if inpaint:
            mask = mask_drawing(*r["mask"], r["mask_mode"])
            extra["mask"] = f"mask_{k}.png"
            extra["mask_size"] = list(r["mask"])
            mask.save(os.path.join(OUT, extra["mask"]))
            kwargs["mask_image"] = mask
            tensors[f"run.{k}.mask"] = pipe.mask_processor.preprocess(mask, height=r["height"], width=r["width"])
        out = pipe(**kwargs).images[0]
        tensors[f"run.{k}.image"] = torch.from_numpy(np.array(out).copy())
        if inpaint and not flux:
            # diffusers 0.42.1's SD3 inpainting decodes `latents / scaling_factor` without adding
            # `shift_factor` back (huggingface/diffusers#13611, issue 1; every other SD3 pipeline adds
            # it). The reference is its latents decoded as the other SD3 pipelines decode them; the
            # image as shipped is kept to measure the difference.
            tensors[f"run.{k}.image_as_shipped"] = tensors[f"run.{k}.image"]
            kwargs["generator"] = torch.Generator("cpu").manual_seed(r["seed"])
            lat = pipe(**dict(kwargs, output_type="latent")).images
            vc = pipe.vae.config
            with torch.no_grad():
                dec = pipe.vae.decode(lat / vc.scaling_factor + vc.shift_factor, return_dict=False)[0]
            fixed = pipe.image_processor.postprocess(dec, output_type="pil")[0]
            tensors[f"run.{k}.image"] = torch.from_numpy(np.array(fixed).copy())
            extra["reference_decode"] = "latents / scaling_factor + shift_factor (diffusers#13611)"
        tensors[f"run.{k}.sigmas"] = pipe.scheduler.sigmas[pipe.scheduler.begin_index:].clone()
        meta["runs"].append(dict(r, input=name, input_size=list(r["input"]), **extra))
        print(f"run {k} ({r['model']}): {len(tensors[f'run.{k}.sigmas']) - 1} steps")

    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "reference.safetensors"))
    with open(os.path.join(OUT, "fixture.json"), "w") as fh:
        json.dump(meta, fh, indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main()
