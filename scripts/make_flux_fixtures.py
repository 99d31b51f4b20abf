"""Builds tiny random Flux pipelines in diffusers layout under tests/fixtures/ and the reference outputs
the Rust parity tests compare against (tests/parity.rs).

    pip install -r scripts/requirements.txt
    python scripts/make_flux_fixtures.py
"""

import json
import os
import sys

import numpy as np
import torch
import diffusers
import transformers
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

sys.path.insert(0, os.path.dirname(__file__))
from tiny_tokenizers import clip_tokenizer, t5_tokenizer  # noqa: E402
from make_sd3_fixtures import PROMPTS, ROOT, SEED, randomize, t5  # noqa: E402


def clip_plain(hidden=32, layers=5, heads=4, act="gelu", eos_token_id=2):
    torch.manual_seed(SEED)
    cfg = CLIPTextConfig(bos_token_id=0, eos_token_id=eos_token_id, hidden_size=hidden, intermediate_size=37,
                         layer_norm_eps=1e-05, num_attention_heads=heads, num_hidden_layers=layers, pad_token_id=1,
                         vocab_size=1000, hidden_act=act, projection_dim=32)
    return CLIPTextModel(cfg).eval()


def build(name, tcfg, clip_cfg, t5_cfg, vae_cfg, sched_cfg):
    torch.manual_seed(SEED)
    transformer = FluxTransformer2DModel(**tcfg).eval()
    randomize(transformer)
    torch.manual_seed(SEED)
    vae = AutoencoderKL(**vae_cfg).eval()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**sched_cfg),
        vae=vae,
        text_encoder=clip_plain(**clip_cfg),
        tokenizer=clip_tokenizer(),
        text_encoder_2=t5(**t5_cfg),
        tokenizer_2=t5_tokenizer(),
        transformer=transformer,
    )
    out = os.path.join(ROOT, name)
    pipe.save_pretrained(out)
    return pipe, out


def references(pipe, out, runs, max_seq, tshape, vshape):
    tensors = {}
    meta = {
        "generator": "scripts/make_flux_fixtures.py",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "seed": SEED,
        "max_sequence_length": max_seq,
        "prompts": PROMPTS,
        "runs": [],
    }
    g = torch.Generator().manual_seed(SEED + 3)
    with torch.no_grad():
        for i, p in enumerate(PROMPTS):
            tok = lambda t, n: t(p, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
            tensors[f"text.{i}.ids_clip"] = tok(pipe.tokenizer, 77)
            tensors[f"text.{i}.ids_t5"] = tok(pipe.tokenizer_2, max_seq)
            pe, ppe, _ = pipe.encode_prompt(prompt=p, prompt_2=None, max_sequence_length=max_seq)
            tensors[f"text.{i}.context"] = pe
            tensors[f"text.{i}.pooled"] = ppe

        tc = pipe.transformer.config
        c = pipe.vae.config.latent_channels
        b, h, w = tshape
        lat = torch.randn((b, c, h, w), generator=g)
        packed = pipe._pack_latents(lat, b, c, h, w)
        tensors["pack.latents"] = lat
        tensors["pack.packed"] = packed
        ctx = torch.randn((b, 7, tc.joint_attention_dim), generator=g)
        pooled = torch.randn((b, tc.pooled_projection_dim), generator=g)
        sigma = torch.tensor([1.0, 0.2575][:b])
        guidance = torch.tensor([3.5, 5.0][:b]) if tc.guidance_embeds else None
        img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
        txt_ids = torch.zeros(7, 3)
        tensors.update({"transformer.context": ctx, "transformer.pooled": pooled, "transformer.sigma": sigma})
        if guidance is not None:
            tensors["transformer.guidance"] = guidance
        tensors["transformer.out"] = pipe.transformer(
            hidden_states=packed, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=sigma,
            img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False,
        )[0]

        vc = pipe.vae.config
        z = torch.randn((1, vc.latent_channels) + vshape, generator=g)
        tensors["vae.z"] = z
        tensors["vae.out"] = pipe.vae.decode(z, return_dict=False)[0]

        f = pipe.vae_scale_factor
        for k, r in enumerate(runs):
            noise = torch.randn((1, c, r["height"] // f, r["width"] // f), generator=g)
            save_file({"noise": noise.contiguous()}, os.path.join(out, f"noise_{k}.safetensors"))
            packed_noise = pipe._pack_latents(noise, 1, c, noise.shape[2], noise.shape[3])
            kw = {}
            if "negative_prompt" in r:
                kw = dict(negative_prompt=r["negative_prompt"], true_cfg_scale=r["true_cfg"])
            img = pipe(
                prompt=r["prompt"], num_inference_steps=r["steps"], guidance_scale=r.get("guidance", 3.5),
                height=r["height"], width=r["width"], latents=packed_noise, max_sequence_length=max_seq,
                output_type="pil", **kw,
            ).images[0]
            tensors[f"run.{k}.image"] = torch.from_numpy(np.array(img).copy())
            tensors[f"run.{k}.sigmas"] = pipe.scheduler.sigmas.clone()
            meta["runs"].append(dict(r, noise=f"noise_{k}.safetensors"))

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, os.path.join(out, "reference.safetensors"))
    with open(os.path.join(out, "fixture.json"), "w") as fh:
        json.dump(meta, fh, indent=1, ensure_ascii=False)


def main():
    torch.set_grad_enabled(False)
    # 1. diffusers' own test dummy (tests/pipelines/flux, get_dummy_components), tokenizers trained here.
    pipe, out = build(
        "flux-dummy",
        dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]),
        dict(),
        dict(d_model=32),
        dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
             latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
             shift_factor=0.0609, scaling_factor=1.5035),
        {},
    )
    references(pipe, out, [dict(prompt=PROMPTS[0], steps=2, height=32, width=32)], 48, (2, 8, 12), (8, 8))

    vae2 = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                latent_channels=4, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
                shift_factor=0.1159, scaling_factor=0.3611,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    tiny = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 6, 6])
    # 2. schnell-like: no guidance embedding, static shift 1, a 2-level VAE (factor 2), non-square.
    pipe, out = build("flux-schnell-tiny", tiny, dict(act="quick_gelu"), dict(d_model=32), vae2, {"shift": 1.0})
    references(pipe, out, [dict(prompt=PROMPTS[3], steps=4, height=24, width=40)], 32, (1, 6, 10), (8, 12))

    # 3. dev-like: guidance embedding, dynamic shifting; an embedded-guidance run and a true-CFG run.
    pipe, out = build(
        "flux-dev-tiny",
        dict(tiny, guidance_embeds=True),
        dict(),
        dict(d_model=32),
        vae2,
        {"shift": 3.0, "use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 4096,
         "base_shift": 0.5, "max_shift": 1.15},
    )
    references(pipe, out, [
        dict(prompt=PROMPTS[0], steps=3, guidance=3.5, height=32, width=32),
        dict(prompt=PROMPTS[0], negative_prompt="blurry", true_cfg=2.5, steps=2, guidance=5.0, height=40, width=24),
    ], 24, (2, 6, 10), (12, 8))


if __name__ == "__main__":
    main()
