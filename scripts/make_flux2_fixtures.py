"""Tiny random FLUX.2 models (diffusers 0.42.1) and the reference outputs the parity tests compare
against:

    pip install -r scripts/requirements.txt
    python scripts/make_flux2_fixtures.py

- tests/fixtures/flux2-transformer/<name>/ (config.json, diffusion_pytorch_model.safetensors,
  reference.safetensors, fixture.json): `Flux2Transformer2DModel` alone, a [klein]-like model (no
  guidance embedding) and a [dev]-like one (guidance embedding), on a non-square latent grid and a
  batch of two (tests/flux2.rs);
- tests/fixtures/flux2-klein-tiny: a whole `Flux2KleinPipeline` (a 28-layer tiny Qwen3 with a
  locally trained Qwen2-style tokenizer and Qwen3's chat template, `AutoencoderKLFlux2` with random
  batch-norm statistics), with token ids, text embeddings, transformer and VAE outputs and images
  with and without classifier-free guidance (tests/parity.rs); and flux2-klein-distilled-tiny, the
  same models as a step-distilled pipeline (no guidance).
"""

import json
import os
import sys

import torch
import diffusers
import numpy as np
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
from PIL import Image
from safetensors.torch import save_file
from transformers import Qwen3Config, Qwen3ForCausalLM

sys.path.insert(0, os.path.dirname(__file__))
from make_sd3_fixtures import PROMPTS, ROOT, SEED, randomize  # noqa: E402
from tiny_tokenizers import qwen_tokenizer  # noqa: E402

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


def klein_pipeline(distilled):
    torch.manual_seed(SEED)
    qcfg = Qwen3Config(vocab_size=600, hidden_size=16, intermediate_size=32, num_hidden_layers=28,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_parameters={
                           "rope_theta": 1000000.0, "rope_type": "default"})
    qwen = Qwen3ForCausalLM(qcfg).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(SEED + 2)
        for p in qwen.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / p.shape[-1] ** 0.5 if p.ndim > 1 else 0.1) + (1.0 if p.ndim == 1 else 0.0))
    torch.manual_seed(SEED)
    transformer = Flux2Transformer2DModel(**dict(TINY, joint_attention_dim=3 * 16), guidance_embeds=False).eval()
    randomize(transformer)
    torch.manual_seed(SEED)
    vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                             latent_channels=4, norm_num_groups=4, sample_size=32).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(SEED + 4)
        vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=g) * 0.3)
        vae.bn.running_var.copy_(torch.rand(vae.bn.running_var.shape, generator=g) + 0.5)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                            max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    return Flux2KleinPipeline(scheduler=sched, vae=vae, text_encoder=qwen, tokenizer=qwen_tokenizer(),
                              transformer=transformer, is_distilled=distilled)


def klein(name, distilled, runs):
    pipe = klein_pipeline(distilled)
    out = os.path.join(ROOT, name)
    pipe.save_pretrained(out)
    max_seq = 40
    tensors = {}
    meta = {"generator": "scripts/make_flux2_fixtures.py", "torch": torch.__version__,
            "diffusers": diffusers.__version__, "seed": SEED, "max_sequence_length": max_seq, "prompts": PROMPTS,
            "runs": []}
    g = torch.Generator().manual_seed(SEED + 3)
    for i, p in enumerate(PROMPTS):
        text = pipe.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                  add_generation_prompt=True, enable_thinking=False)
        ids = pipe.tokenizer(text, padding="max_length", truncation=True, max_length=max_seq, return_tensors="pt")
        tensors[f"text.{i}.ids_qwen"] = ids.input_ids
        tensors[f"text.{i}.context"] = pipe._get_qwen3_prompt_embeds(pipe.text_encoder, pipe.tokenizer, p,
                                                                     max_sequence_length=max_seq)
    c = pipe.transformer.config.in_channels
    b, h, w, s = 2, 3, 5, 7
    lat = torch.randn((b, c, h, w), generator=g)
    ctx = torch.randn((b, s, pipe.transformer.config.joint_attention_dim), generator=g)
    sigma = torch.tensor([1.0, 0.2575])
    txt_ids = pipe._prepare_text_ids(ctx)
    img_ids = pipe._prepare_latent_ids(lat)
    tensors.update({"pack.latents": lat, "transformer.context": ctx, "transformer.sigma": sigma})
    tensors["transformer.out"] = pipe.transformer(
        hidden_states=pipe._pack_latents(lat), encoder_hidden_states=ctx, timestep=sigma, img_ids=img_ids,
        txt_ids=txt_ids, guidance=None, return_dict=False)[0]
    z = torch.randn((1, pipe.vae.config.latent_channels, 12, 8), generator=g)
    tensors["vae.z"] = z
    tensors["vae.out"] = pipe.vae.decode(z, return_dict=False)[0]
    f = pipe.vae_scale_factor * 2
    for k, r in enumerate(runs):
        noise = torch.randn((1, c, r["height"] // f, r["width"] // f), generator=g)
        save_file({"noise": noise.contiguous()}, os.path.join(out, f"noise_{k}.safetensors"))
        img = pipe(prompt=r["prompt"], num_inference_steps=r["steps"], guidance_scale=r["guidance"],
                   height=r["height"], width=r["width"], latents=noise, max_sequence_length=max_seq,
                   output_type="pil").images[0]
        tensors[f"run.{k}.image"] = torch.from_numpy(np.array(img).copy())
        tensors[f"run.{k}.sigmas"] = pipe.scheduler.sigmas.clone()
        meta["runs"].append(dict(r, noise=f"noise_{k}.safetensors"))
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, "reference.safetensors"))
    with open(os.path.join(out, "fixture.json"), "w") as fh:
        json.dump(meta, fh, indent=1, ensure_ascii=False)
    print(name, "written")


def dev_pipeline():
    """A tiny `Flux2Pipeline`: Mistral3ForConditionalGeneration (a 32-layer tiny Mistral language model,
    a one-layer Pixtral vision tower the pipeline never runs), a left-padding Mistral-style tokenizer
    with a Mistral-3.1-style chat template, a [dev]-like transformer (guidance embedding) and the
    klein fixtures' VAE."""
    from diffusers import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig
    from tiny_tokenizers import mistral_tokenizer

    torch.manual_seed(SEED)
    tc = MistralConfig(vocab_size=600, hidden_size=16, intermediate_size=32, num_hidden_layers=32,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=None,
                       rope_parameters={"rope_theta": 1e9, "rope_type": "default"})
    vc = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                             head_dim=8, image_size=28, patch_size=14)
    mistral = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=tc, vision_config=vc, image_token_index=7, spatial_merge_size=2,
        multimodal_projector_bias=False)).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(SEED + 6)
        for p in mistral.model.language_model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / p.shape[-1] ** 0.5 if p.ndim > 1 else 0.1) + (1.0 if p.ndim == 1 else 0.0))
    klein = klein_pipeline(False)
    torch.manual_seed(SEED)
    transformer = Flux2Transformer2DModel(**dict(TINY, joint_attention_dim=3 * 16), guidance_embeds=True).eval()
    randomize(transformer)
    return Flux2Pipeline(scheduler=klein.scheduler, vae=klein.vae, text_encoder=mistral, tokenizer=mistral_tokenizer(),
                         transformer=transformer)


def dev(name, runs):
    """tests/fixtures/flux2-dev-tiny: token ids and embeddings of the prompts (system message, chat
    template, left padding), and images with embedded guidance."""
    pipe = dev_pipeline()
    out = os.path.join(ROOT, name)
    pipe.save_pretrained(out)
    # The system message alone is 107 tokens of the tiny vocabulary: short prompts are padded, the
    # longest is cut.
    max_seq = 160
    tensors = {}
    meta = {"generator": "scripts/make_flux2_fixtures.py", "torch": torch.__version__,
            "diffusers": diffusers.__version__, "seed": SEED, "max_sequence_length": max_seq, "prompts": PROMPTS,
            "runs": []}
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input
    g = torch.Generator().manual_seed(SEED + 7)
    for i, p in enumerate(PROMPTS):
        ids = pipe.tokenizer.apply_chat_template(format_input([p], pipe.system_message), add_generation_prompt=False,
                                                 tokenize=True, return_dict=True, return_tensors="pt",
                                                 padding="max_length", truncation=True, max_length=max_seq)
        tensors[f"text.{i}.ids_mistral"] = ids["input_ids"]
        tensors[f"text.{i}.context"] = pipe._get_mistral_3_small_prompt_embeds(
            pipe.text_encoder, pipe.tokenizer, p, max_sequence_length=max_seq)
    c = pipe.transformer.config.in_channels
    f = pipe.vae_scale_factor * 2
    for k, r in enumerate(runs):
        noise = torch.randn((1, c, r["height"] // f, r["width"] // f), generator=g)
        save_file({"noise": noise.contiguous()}, os.path.join(out, f"noise_{k}.safetensors"))
        # A run with reference images takes them from tests/fixtures/flux2-edit (written by
        # scripts/make_flux2_edit_fixtures.py).
        images = [Image.open(os.path.join(ROOT, "flux2-edit", p)).convert("RGB") for p in r.get("images", [])]
        img = pipe(prompt=r["prompt"], num_inference_steps=r["steps"], guidance_scale=r["guidance"],
                   height=r["height"], width=r["width"], latents=noise, max_sequence_length=max_seq,
                   output_type="pil", image=images or None).images[0]
        tensors[f"run.{k}.image"] = torch.from_numpy(np.array(img).copy())
        meta["runs"].append(dict(r, noise=f"noise_{k}.safetensors"))
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, "reference.safetensors"))
    with open(os.path.join(out, "fixture.json"), "w") as fh:
        json.dump(meta, fh, indent=1, ensure_ascii=False)
    print(name, "written")


if __name__ == "__main__":
    main()
    klein("flux2-klein-tiny", False, [
        dict(prompt=PROMPTS[0], steps=3, guidance=4.0, height=48, width=32),
        dict(prompt=PROMPTS[3], steps=2, guidance=1.0, height=32, width=32),
    ])
    klein("flux2-klein-distilled-tiny", True, [dict(prompt=PROMPTS[0], steps=2, guidance=4.0, height=32, width=48)])
    dev("flux2-dev-tiny", [
        dict(prompt=PROMPTS[0], steps=3, guidance=4.0, height=48, width=32),
        dict(prompt=PROMPTS[3], steps=2, guidance=2.5, height=32, width=48),
        dict(prompt="make it blue", steps=2, guidance=4.0, height=40, width=32, images=["input_1.png", "input_0.png"]),
    ])
