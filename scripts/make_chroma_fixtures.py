"""Builds a tiny random Chroma pipeline in diffusers layout under tests/fixtures/chroma-tiny and the
reference outputs the Rust parity tests compare against (tests/parity.rs).

    pip install -r scripts/requirements.txt
    python scripts/make_chroma_fixtures.py

The attention mask. diffusers 0.42.1's ChromaPipeline casts the T5 mask to the text encoder's float
dtype, and scaled_dot_product_attention *adds* a float mask to the scores: padded tokens then get
+0 instead of -inf and are attended to (diffusers issue #12116). The original Chroma code, ComfyUI
and the issue's proposed fix mask them. The references here are diffusers' pipeline given the same
mask as booleans (`prompt_attention_mask=...bool()`), which masks as the original does.
"""

import json
import os
import sys

import numpy as np
import torch
import diffusers
import transformers
from diffusers import AutoencoderKL, ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from tiny_tokenizers import t5_tokenizer  # noqa: E402
from make_sd3_fixtures import PROMPTS, ROOT, SEED, randomize, t5  # noqa: E402

NAME = "chroma-tiny"


def build():
    torch.manual_seed(SEED)
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[4, 6, 6],
        approximator_num_channels=16, approximator_hidden_dim=32, approximator_layers=2,
    ).eval()
    randomize(transformer)
    torch.manual_seed(SEED)
    vae = AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.1159, scaling_factor=0.3611,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    ).eval()
    sched = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096,
        base_shift=0.5, max_shift=1.15,
    )
    pipe = ChromaPipeline(scheduler=sched, vae=vae, text_encoder=t5(d_model=32), tokenizer=t5_tokenizer(),
                          transformer=transformer)
    out = os.path.join(ROOT, NAME)
    pipe.save_pretrained(out)
    return pipe, out


def encode(pipe, prompt, max_seq):
    """The prompt's T5 states and its attention mask as booleans (see the module docstring)."""
    embeds, mask = pipe._get_t5_prompt_embeds(prompt=prompt, max_sequence_length=max_seq, device="cpu")
    return embeds, mask.bool()


def main():
    torch.set_grad_enabled(False)
    pipe, out = build()
    max_seq = 24
    runs = [
        # guidance 5 (the pipeline's default): CFG against the empty negative prompt
        dict(prompt=PROMPTS[0], steps=3, guidance=5.0, height=24, width=40),
        dict(prompt=PROMPTS[3], negative_prompt="blurry, low quality", steps=2, guidance=3.0, height=40, width=32),
        # guidance 1: no CFG; a prompt cut at max_seq (no padding left)
        dict(prompt=PROMPTS[2], steps=2, guidance=1.0, height=32, width=32),
    ]
    tensors = {}
    meta = {
        "generator": "scripts/make_chroma_fixtures.py",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "seed": SEED,
        "max_sequence_length": max_seq,
        "prompts": PROMPTS,
        "mask": "boolean (diffusers' float mask is additive: issue #12116)",
        "runs": [],
    }
    g = torch.Generator().manual_seed(SEED + 3)
    for i, p in enumerate(PROMPTS):
        t = pipe.tokenizer(p, padding="max_length", max_length=max_seq, truncation=True, return_tensors="pt")
        tensors[f"text.{i}.ids_t5"] = t.input_ids
        embeds, mask = encode(pipe, p, max_seq)
        # What the transformer attends to: the prompt's tokens and the first padding token.
        keep = int(mask.sum())
        tensors[f"text.{i}.context"] = embeds[:, :keep]

    tc = pipe.transformer.config
    c = pipe.vae.config.latent_channels
    b, h, w = 2, 6, 10
    lat = torch.randn((b, c, h, w), generator=g)
    packed = pipe._pack_latents(lat, b, c, h, w)
    tensors["pack.latents"] = lat
    tensors["pack.packed"] = packed
    # 9 text tokens of which the last 2 are masked: the same as 7 tokens unmasked.
    ctx = torch.randn((b, 9, tc.joint_attention_dim), generator=g)
    sigma = torch.tensor([1.0, 0.2575])
    img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    txt_mask = torch.tensor([[True] * 7 + [False] * 2] * b)
    mask = torch.cat([txt_mask, torch.ones(b, img_ids.shape[0], dtype=torch.bool)], dim=1)
    tensors.update({"transformer.context": ctx[:, :7], "transformer.sigma": sigma})
    tensors["transformer.out"] = pipe.transformer(
        hidden_states=packed, encoder_hidden_states=ctx, timestep=sigma, img_ids=img_ids,
        txt_ids=torch.zeros(9, 3), attention_mask=mask, return_dict=False,
    )[0]

    vc = pipe.vae.config
    z = torch.randn((1, vc.latent_channels, 12, 8), generator=g)
    tensors["vae.z"] = z
    tensors["vae.out"] = pipe.vae.decode(z, return_dict=False)[0]

    f = pipe.vae_scale_factor
    for k, r in enumerate(runs):
        noise = torch.randn((1, c, r["height"] // f, r["width"] // f), generator=g)
        save_file({"noise": noise.contiguous()}, os.path.join(out, f"noise_{k}.safetensors"))
        packed_noise = pipe._pack_latents(noise, 1, c, noise.shape[2], noise.shape[3])
        pe, pm = encode(pipe, r["prompt"], max_seq)
        ne, nm = encode(pipe, r.get("negative_prompt", ""), max_seq)
        img = pipe(
            prompt_embeds=pe, prompt_attention_mask=pm, negative_prompt_embeds=ne,
            negative_prompt_attention_mask=nm, num_inference_steps=r["steps"], guidance_scale=r["guidance"],
            height=r["height"], width=r["width"], latents=packed_noise, max_sequence_length=max_seq,
            output_type="pil",
        ).images[0]
        tensors[f"run.{k}.image"] = torch.from_numpy(np.array(img).copy())
        tensors[f"run.{k}.sigmas"] = pipe.scheduler.sigmas.clone()
        meta["runs"].append(dict(r, noise=f"noise_{k}.safetensors"))

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, os.path.join(out, "reference.safetensors"))
    with open(os.path.join(out, "fixture.json"), "w") as fh:
        json.dump(meta, fh, indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main()
