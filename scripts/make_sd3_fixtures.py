"""Builds tiny random SD3 pipelines in diffusers layout under tests/fixtures/ and the reference outputs
the Rust parity tests compare against (tests/parity.rs).

    pip install -r scripts/requirements.txt
    python scripts/make_sd3_fixtures.py

Each pipeline folder gets `reference.safetensors` (tensors) and `fixture.json` (the script, versions,
seed and every parameter of each reference run).
"""

import json
import os
import sys

import numpy as np
import torch
import diffusers
import transformers
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

sys.path.insert(0, os.path.dirname(__file__))
from tiny_tokenizers import clip_tokenizer, t5_tokenizer  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
SEED = 0

PROMPTS = [
    "a red circle on a white background",
    "",
    # longer than 77 CLIP tokens: truncated
    "a photo of a cat sitting on a red sofa, " * 12,
    "café crème brûlée über naïve façade 🐱 ✨",
]


def clip(hidden, layers, heads, proj, act, eos_token_id, vocab=1000, inter=37):
    torch.manual_seed(SEED)
    cfg = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=eos_token_id,
        hidden_size=hidden,
        intermediate_size=inter,
        layer_norm_eps=1e-05,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        pad_token_id=1,
        vocab_size=vocab,
        hidden_act=act,
        projection_dim=proj,
    )
    return CLIPTextModelWithProjection(cfg).eval()


def t5(d_model, layers=2, heads=4, d_kv=8, d_ff=37, vocab=400):
    torch.manual_seed(SEED)
    cfg = T5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=d_kv,
        d_ff=d_ff,
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(cfg).eval()


def randomize(module, scale=0.5):
    """Random weights of a healthy size everywhere (diffusers zero-initialises the AdaLN gates and the
    output projection, which would make the transformer output trivially zero)."""
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            fan = p.shape[-1] if p.ndim > 1 else p.shape[0]
            p.copy_(torch.randn(p.shape, generator=g) * scale / max(fan, 1) ** 0.5 + (1.0 if name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or "norm_added" in name else 0.0) * (p.ndim == 1))


def build(name, tcfg, l_cfg, g_cfg, t5_cfg, vae_cfg, sched_cfg):
    torch.manual_seed(SEED)
    transformer = SD3Transformer2DModel(**tcfg).eval()
    randomize(transformer)
    torch.manual_seed(SEED)
    vae = AutoencoderKL(**vae_cfg).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(**sched_cfg)
    te1 = clip(**l_cfg)
    te2 = clip(**g_cfg)
    tok1 = clip_tokenizer(pad_token="<|endoftext|>")
    tok2 = clip_tokenizer(pad_token="!")
    te3 = t5(**t5_cfg) if t5_cfg else None
    tok3 = t5_tokenizer() if t5_cfg else None
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=te1,
        tokenizer=tok1,
        text_encoder_2=te2,
        tokenizer_2=tok2,
        text_encoder_3=te3,
        tokenizer_3=tok3,
    )
    out = os.path.join(ROOT, name)
    pipe.save_pretrained(out)
    return pipe, out


def references(pipe, out, runs, max_seq, tshape, vshape):
    tensors = {}
    meta = {
        "generator": "scripts/make_sd3_fixtures.py",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "seed": SEED,
        "max_sequence_length": max_seq,
        "prompts": PROMPTS,
        "runs": [],
    }
    g = torch.Generator().manual_seed(SEED + 2)
    with torch.no_grad():
        # Tokens and text embeddings, one prompt at a time.
        for i, p in enumerate(PROMPTS):
            tok = lambda t, n: t(p, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
            tensors[f"text.{i}.ids_l"] = tok(pipe.tokenizer, 77)
            tensors[f"text.{i}.ids_g"] = tok(pipe.tokenizer_2, 77)
            if pipe.tokenizer_3 is not None:
                tensors[f"text.{i}.ids_t5"] = tok(pipe.tokenizer_3, max_seq)
            pe, _, ppe, _ = pipe.encode_prompt(
                prompt=p, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False, max_sequence_length=max_seq
            )
            tensors[f"text.{i}.context"] = pe
            tensors[f"text.{i}.pooled"] = ppe

        # Transformer on random inputs (batch 2, different timesteps).
        tc = pipe.transformer.config
        b, h, w = tshape
        x = torch.randn((b, tc.in_channels, h, w), generator=g)
        ctx = torch.randn((b, 7, tc.joint_attention_dim), generator=g)
        pooled = torch.randn((b, tc.pooled_projection_dim), generator=g)
        t = torch.tensor([1000.0, 257.5][:b])
        tensors.update({"transformer.x": x, "transformer.context": ctx, "transformer.pooled": pooled, "transformer.t": t})
        tensors["transformer.out"] = pipe.transformer(
            hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t, return_dict=False
        )[0]

        # VAE decode of random latents (already unscaled).
        vc = pipe.vae.config
        z = torch.randn((1, vc.latent_channels) + vshape, generator=g)
        tensors["vae.z"] = z
        tensors["vae.out"] = pipe.vae.decode(z, return_dict=False)[0]

        # Whole pipeline for given noise.
        f = pipe.vae_scale_factor
        for k, r in enumerate(runs):
            noise = torch.randn((1, tc.in_channels, r["height"] // f, r["width"] // f), generator=g)
            save_file({"noise": noise.contiguous()}, os.path.join(out, f"noise_{k}.safetensors"))
            img = pipe(
                prompt=r["prompt"],
                negative_prompt=r.get("negative_prompt"),
                num_inference_steps=r["steps"],
                guidance_scale=r["guidance"],
                height=r["height"],
                width=r["width"],
                latents=noise,
                max_sequence_length=max_seq,
                output_type="pil",
            ).images[0]
            tensors[f"run.{k}.image"] = torch.from_numpy(np.array(img).copy())
            pipe.scheduler.set_timesteps(r["steps"], **_mu(pipe, r))
            tensors[f"run.{k}.sigmas"] = pipe.scheduler.sigmas
            meta["runs"].append(dict(r, noise=f"noise_{k}.safetensors"))

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, os.path.join(out, "reference.safetensors"))
    with open(os.path.join(out, "fixture.json"), "w") as fh:
        json.dump(meta, fh, indent=1, ensure_ascii=False)


def _mu(pipe, r):
    sc = pipe.scheduler.config
    if not sc.use_dynamic_shifting:
        return {}
    f = pipe.vae_scale_factor * pipe.transformer.config.patch_size
    seq = (r["height"] // f) * (r["width"] // f)
    m = (sc.max_shift - sc.base_shift) / (sc.max_image_seq_len - sc.base_image_seq_len)
    return {"mu": seq * m + sc.base_shift - m * sc.base_image_seq_len}


def schedules():
    """Sigmas for several step counts and shifts, static and dynamic."""
    out = {"generator": "scripts/make_sd3_fixtures.py", "diffusers": diffusers.__version__, "cases": []}
    for cfg in [
        {},
        {"shift": 3.0},
        {"shift": 3.0, "shift_terminal": 0.1},
        {"use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 4096},
        {"use_dynamic_shifting": True, "time_shift_type": "linear"},
    ]:
        for n in [1, 2, 4, 10, 28, 50]:
            if n == 1 and cfg.get("shift_terminal"):
                continue  # diffusers divides 0 by 0 here (a single sigma of 1 cannot be stretched)
            for mu in ([None] if not cfg.get("use_dynamic_shifting") else [0.5, 1.15, 0.77]):
                s = FlowMatchEulerDiscreteScheduler(**cfg)
                s.set_timesteps(n, **({"mu": mu} if mu is not None else {}))
                out["cases"].append(
                    {"config": cfg, "steps": n, "mu": mu, "sigmas": s.sigmas.tolist(), "timesteps": s.timesteps.tolist()}
                )
        # custom sigmas as the Flux pipeline passes them
        for n in [1, 4, 28]:
            if n == 1 and cfg.get("shift_terminal"):
                continue
            sig = np.linspace(1.0, 1 / n, n).tolist()
            s = FlowMatchEulerDiscreteScheduler(**cfg)
            mu = 0.9 if cfg.get("use_dynamic_shifting") else None
            s.set_timesteps(sigmas=sig, **({"mu": mu} if mu is not None else {}))
            out["cases"].append(
                {"config": cfg, "custom_sigmas": sig, "mu": mu, "sigmas": s.sigmas.tolist(), "timesteps": s.timesteps.tolist()}
            )
    with open(os.path.join(ROOT, "schedules.json"), "w") as fh:
        json.dump(out, fh, indent=0)


def main():
    torch.set_grad_enabled(False)
    os.makedirs(ROOT, exist_ok=True)
    schedules()

    # 1. diffusers' own test dummy (tests/pipelines/stable_diffusion_3, get_dummy_components), with
    #    tokenizers trained here; T5 narrower than CLIP-L+G, so the CLIP features are cropped.
    pipe, out = build(
        "sd3-dummy",
        dict(sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
             caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4),
        dict(hidden=32, layers=5, heads=4, proj=32, act="gelu", eos_token_id=2),
        dict(hidden=32, layers=5, heads=4, proj=32, act="gelu", eos_token_id=2),
        dict(d_model=32),
        dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
             latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
             shift_factor=0.0609, scaling_factor=1.5035),
        {},
    )
    references(pipe, out, [
        dict(prompt=PROMPTS[0], steps=2, guidance=5.0, height=32, width=32),
        dict(prompt=PROMPTS[0], steps=3, guidance=1.0, height=16, width=32),
    ], 256, (2, 8, 12), (8, 8))

    # 2. SD3.5-like: patch 2, 16 channels, qk RMSNorm, MMDiT-X dual attention on layers 0 and 1,
    #    CLIP narrower than T5 (zero padding), static shift 3, a 2-level VAE (factor 2).
    sd35 = dict(sample_size=16, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=8, num_attention_heads=4,
                caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64, out_channels=16,
                pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0, 1))
    vae2 = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                latent_channels=16, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
                shift_factor=0.0609, scaling_factor=1.5305,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    pipe, out = build(
        "sd35-tiny",
        sd35,
        dict(hidden=24, layers=3, heads=4, proj=32, act="quick_gelu", eos_token_id=738),
        dict(hidden=32, layers=4, heads=4, proj=32, act="gelu", eos_token_id=2),
        dict(d_model=64),
        vae2,
        {"shift": 3.0},
    )
    references(pipe, out, [
        dict(prompt=PROMPTS[0], negative_prompt="blurry", steps=4, guidance=7.0, height=48, width=32),
    ], 32, (2, 8, 12), (12, 8))

    # 3. Without T5 (zeros in its place), dynamic shifting.
    pipe, out = build(
        "sd3-no-t5",
        dict(sd35, dual_attention_layers=(), qk_norm=None, num_layers=2),
        dict(hidden=24, layers=3, heads=4, proj=32, act="quick_gelu", eos_token_id=738),
        dict(hidden=32, layers=4, heads=4, proj=32, act="gelu", eos_token_id=2),
        None,
        vae2,
        {"use_dynamic_shifting": True, "base_image_seq_len": 16, "max_image_seq_len": 256},
    )
    references(pipe, out, [
        dict(prompt=PROMPTS[3], steps=3, guidance=4.5, height=32, width=48),
    ], 16, (1, 8, 8), (8, 12))


if __name__ == "__main__":
    main()
