"""Writes random-weight models at real width for speed comparisons (not committed: GBs, made in seconds):

    python scripts/make_bench_models.py [--out bench-models]

- sd3-bench: SD3-medium width (1536, 24 heads x 64), 2 joint layers, the real 16-channel VAE, tiny text
  encoders with the real output widths (CLIP pooled 768 + 1280, T5 width 4096).
- flux-bench: Flux width (3072, 24 heads x 128), 1 double + 2 single blocks, schnell-like (no guidance
  embedding), the real Flux VAE, tiny text encoders with the real output widths (CLIP 768, T5 4096).
- flux2-bench: FLUX.2 [klein] 4B width (3072, 24 heads x 128, text width 7680), 1 double + 2 single
  blocks, step-distilled (no guidance), the real FLUX.2 VAE (AutoencoderKLFlux2 defaults), a narrow
  28-layer Qwen3 with the real output width (2560 per hidden state).
- text-bench: the text encoders at real width for the text phase: CLIP-L (768 wide, 12 heads, 3072
  MLP), CLIP-G (1280, 20 heads, 5120) and T5-XXL (4096, 64 heads x 64, gated-GELU 10240, 32 relative
  buckets up to 128), 2 layers each, in an SD3 pipeline with a narrow 1-layer transformer and a small
  VAE (its step and decode are not what it measures).
Both engines load the same folders (diffusers layout).

With --full (for a GPU: 4 + 24 GB in bf16), all layers at the real configs instead:
- sd3-medium-full: SD3-medium's transformer (24 layers, 1536 wide, pos_embed_max_size 192);
- flux-dev-full: FLUX.1-dev's transformer (19 double + 38 single blocks, 3072 wide, guidance embedding);
with the same real VAEs and tiny text encoders. `--device cuda --dtype bf16` builds them on the GPU.
"""

import argparse
import os
import sys

import torch
from diffusers import (AutoencoderKL, AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline,
                       Flux2Transformer2DModel, FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel,
                       StableDiffusion3Pipeline)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, Qwen3Config, Qwen3ForCausalLM,
                          T5Config, T5EncoderModel)

sys.path.insert(0, os.path.dirname(__file__))
from tiny_tokenizers import clip_tokenizer, qwen_tokenizer, t5_tokenizer  # noqa: E402
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
    ap.add_argument("--full", action="store_true", help="all layers (SD3-medium, FLUX.1-dev)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--only", default=None, choices=["sd3", "flux", "flux2", "text"])
    args = ap.parse_args()
    torch.manual_seed(0)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    sd3_layers, flux_layers = (24, (19, 38)) if args.full else (2, (1, 2))
    suffix = "-full" if args.full else "-bench"

    def save(pipe, name):
        with torch.no_grad():
            pipe.to(dtype)
        pipe.save_pretrained(os.path.join(args.out, name))

    t5_enc = lambda: t5(d_model=4096, layers=1, heads=4, d_kv=64, d_ff=64)
    with torch.device(args.device):
        if args.only in (None, "sd3"):
            make_sd3(sd3_layers, t5_enc, lambda p: save(p, ("sd3-medium" if args.full else "sd3") + suffix))
        if args.only in (None, "flux"):
            make_flux(flux_layers, args.full, t5_enc, lambda p: save(p, ("flux-dev" if args.full else "flux") + suffix))
        if args.only in (None, "flux2") and not args.full:
            make_flux2(lambda p: save(p, "flux2-bench"))
        if args.only in (None, "text") and not args.full:
            make_text(lambda p: save(p, "text-bench"))
    print("wrote", os.path.abspath(args.out))


def make_sd3(layers, t5_enc, save):
    sd3 = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=layers,
                                          attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                          caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                                          pos_embed_max_size=192),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae(1.5305, 0.0609),
        text_encoder=clip(768), tokenizer=clip_tokenizer(), text_encoder_2=clip(1280), tokenizer_2=clip_tokenizer(pad_token="!"),
        text_encoder_3=t5_enc(), tokenizer_3=t5_tokenizer(),
    )
    save(sd3)


def make_flux(layers, guidance, t5_enc, save):
    flux = FluxPipeline(
        transformer=FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=layers[0],
                                           num_single_layers=layers[1], attention_head_dim=128,
                                           num_attention_heads=24, joint_attention_dim=4096,
                                           pooled_projection_dim=768, guidance_embeds=guidance,
                                           axes_dims_rope=(16, 56, 56)),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=vae(0.3611, 0.1159),
        text_encoder=clip(hidden=768), tokenizer=clip_tokenizer(), text_encoder_2=t5_enc(), tokenizer_2=t5_tokenizer(),
    )
    save(flux)


def make_flux2(save):
    qwen = Qwen3ForCausalLM(Qwen3Config(vocab_size=600, hidden_size=2560, intermediate_size=64, num_hidden_layers=28,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=64)).eval()
    flux2 = Flux2KleinPipeline(
        transformer=Flux2Transformer2DModel(num_layers=1, num_single_layers=2, num_attention_heads=24,
                                            joint_attention_dim=7680, guidance_embeds=False),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True), vae=AutoencoderKLFlux2(),
        text_encoder=qwen, tokenizer=qwen_tokenizer(), is_distilled=True,
    )
    save(flux2)


def make_text(save):
    def real_clip(hidden, inter, heads):
        cfg = CLIPTextConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                             num_hidden_layers=2, vocab_size=1000, projection_dim=hidden, hidden_act="gelu",
                             eos_token_id=2)
        return CLIPTextModelWithProjection(cfg).eval()

    t5_xxl = T5EncoderModel(T5Config(vocab_size=400, d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64,
                                     relative_attention_num_buckets=32, relative_attention_max_distance=128,
                                     feed_forward_proj="gated-gelu", is_encoder_decoder=False)).eval()
    small_vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                              up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 32, 32),
                              layers_per_block=1, latent_channels=16, norm_num_groups=32, sample_size=1024,
                              use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305,
                              shift_factor=0.0609)
    sd3 = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=1,
                                          attention_head_dim=32, num_attention_heads=2, joint_attention_dim=4096,
                                          caption_projection_dim=64, pooled_projection_dim=2048, out_channels=16,
                                          pos_embed_max_size=192),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=small_vae,
        text_encoder=real_clip(768, 3072, 12), tokenizer=clip_tokenizer(),
        text_encoder_2=real_clip(1280, 5120, 20), tokenizer_2=clip_tokenizer(pad_token="!"),
        text_encoder_3=t5_xxl, tokenizer_3=t5_tokenizer(),
    )
    save(sd3)


if __name__ == "__main__":
    main()
