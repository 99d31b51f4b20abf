"""Writes random-weight models at real width for speed comparisons (not committed: GBs, made in seconds):

    python scripts/make_bench_models.py [--out bench-models]

- sd3-bench: SD3-medium width (1536, 24 heads x 64), 2 joint layers, the real 16-channel VAE, tiny text
  encoders with the real output widths (CLIP pooled 768 + 1280, T5 width 4096).
- flux-bench: Flux width (3072, 24 heads x 128), 1 double + 2 single blocks, schnell-like (no guidance
  embedding), the real Flux VAE, tiny text encoders with the real output widths (CLIP 768, T5 4096).
Both engines load the same folders (diffusers layout).
"""

import argparse
import os
import sys

import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                       SD3Transformer2DModel, StableDiffusion3Pipeline)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

sys.path.insert(0, os.path.dirname(__file__))
from tiny_tokenizers import clip_tokenizer, t5_tokenizer  # noqa: E402
from make_sd3_fixtures import t5  # noqa: E402


def clip(proj=None, hidden=64):
    cfg = CLIPTextConfig(hidden_size=hidden, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
                         vocab_size=1000, projection_dim=proj or hidden, hidden_act="gelu", eos_token_id=2)
    return (CLIPTextModelWithProjection(cfg) if proj else CLIPTextModel(cfg)).eval()


def vae(scaling, shift):
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                         layers_per_block=2, latent_channels=16, norm_num_groups=32, sample_size=1024,
                         use_quant_conv=False, use_post_quant_conv=False, scaling_factor=scaling, shift_factor=shift)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "bench-models"))
    args = ap.parse_args()
    torch.manual_seed(0)
    t5_enc = lambda: t5(d_model=4096, layers=1, heads=4, d_kv=64, d_ff=64)
    sd3 = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(sample_size=64, patch_size=2, in_channels=16, num_layers=2,
                                          attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                          caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                                          pos_embed_max_size=192),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae(1.5305, 0.0609),
        text_encoder=clip(768), tokenizer=clip_tokenizer(), text_encoder_2=clip(1280), tokenizer_2=clip_tokenizer(pad_token="!"),
        text_encoder_3=t5_enc(), tokenizer_3=t5_tokenizer(),
    )
    sd3.save_pretrained(os.path.join(args.out, "sd3-bench"))
    del sd3
    flux = FluxPipeline(
        transformer=FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2,
                                           attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                           pooled_projection_dim=768, guidance_embeds=False, axes_dims_rope=(16, 56, 56)),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=vae(0.3611, 0.1159),
        text_encoder=clip(hidden=768), tokenizer=clip_tokenizer(), text_encoder_2=t5_enc(), tokenizer_2=t5_tokenizer(),
    )
    flux.save_pretrained(os.path.join(args.out, "flux-bench"))
    print("wrote", os.path.abspath(args.out))


if __name__ == "__main__":
    main()
