"""Shape manifests of the twelve real models, from diffusers/transformers classes built with the real
configs on the meta device (nothing is downloaded, nothing allocated):

    python scripts/make_manifests.py

Writes tests/fixtures/manifests/<model>.json: for each component, every tensor's name, shape and the
dtype the Hub files store it in. Configs follow the Hub's config.json files as recorded in
shared/REFERENCE.md section 1 (transformer) and 3 (VAE); text encoders are the standard CLIP ViT-L/14,
OpenCLIP bigG/14 text towers and T5-v1.1-XXL encoder.
"""

import json
import math
import os

import torch
import diffusers
import transformers
from diffusers import (AutoencoderKL, AutoencoderKLFlux2, ChromaTransformer2DModel, Flux2Transformer2DModel,
                       FluxTransformer2DModel, SD3Transformer2DModel)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, Qwen3Config, Qwen3ForCausalLM,
                          T5Config, T5EncoderModel)

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "manifests")

CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_hidden_layers=32,
              num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", is_encoder_decoder=False)
VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
           latent_channels=16, norm_num_groups=32, sample_size=1024, use_quant_conv=False, use_post_quant_conv=False)

SD3 = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
           joint_attention_dim=4096, pooled_projection_dim=2048)
MODELS = {
    "sd3-medium": ("sd3", "fp16", dict(SD3, num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192)),
    "sd3.5-large": ("sd3", "bf16", dict(SD3, num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192, qk_norm="rms_norm")),
    "sd3.5-large-turbo": ("sd3", "bf16", dict(SD3, num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192, qk_norm="rms_norm")),
    "sd3.5-medium": ("sd3", "bf16", dict(SD3, num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))),
    "flux.1-schnell": ("flux", "bf16", dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=False, axes_dims_rope=(16, 56, 56))),
    "flux.1-dev": ("flux", "bf16", dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))),
    # FLUX.1 Fill [dev]: 4 x (16 latent + 16 masked-image latent + 8x8 mask) inputs, 4 x 16 outputs.
    # FLUX.1 Kontext [dev]: FLUX.1-dev's shapes (the reference image's tokens need no new weights).
    "flux.1-kontext-dev": ("flux", "bf16", dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))),
    "flux.1-fill-dev": ("flux", "bf16", dict(patch_size=1, in_channels=384, out_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))),
    # Chroma1-HD and Chroma1-Base (lodestones/Chroma1-*/transformer/config.json): diffusers' defaults.
    "chroma1-hd": ("chroma", "bf16", dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, axes_dims_rope=(16, 56, 56), approximator_num_channels=64, approximator_hidden_dim=5120, approximator_layers=5)),
    "chroma1-base": ("chroma", "bf16", dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, axes_dims_rope=(16, 56, 56), approximator_num_channels=64, approximator_hidden_dim=5120, approximator_layers=5)),
    # FLUX.2 [klein] 4B and 9B (black-forest-labs/FLUX.2-klein-{4B,9B}): the transformer's
    # published shape (5 + 20 blocks at width 3072; 8 + 24 at 4096), Qwen3-4B / Qwen3-8B as text
    # encoders (hidden states 9, 18, 27 side by side: joint_attention_dim = 3 x their width) and
    # AutoencoderKLFlux2's defaults. Written from the model cards' figures; to be checked against the
    # Hub's config.json files where the Hub is reachable.
    "flux.2-klein-4b": ("flux2-klein", "bf16", dict(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680, guidance_embeds=False)),
    "flux.2-klein-9b": ("flux2-klein", "bf16", dict(num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288, guidance_embeds=False)),
}

# Qwen3-4B and Qwen3-8B (Qwen/Qwen3-{4B,8B}/config.json); the 4B ties its output embedding.
QWEN3 = {
    "flux.2-klein-4b": dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                            num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                            rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"}),
    "flux.2-klein-9b": dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                            num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                            rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"}),
}


def shapes(module, dtype):
    return [{"name": n, "shape": list(p.shape), "dtype": dtype} for n, p in module.state_dict().items()]


def main():
    os.makedirs(OUT, exist_ok=True)
    with torch.device("meta"):
        clip_l_proj = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L))
        clip_l = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))
        t5 = T5EncoderModel(T5Config(**T5_XXL))
        for name, (family, dt, cfg) in MODELS.items():
            vae = AutoencoderKL(**VAE, scaling_factor=1.5305 if family == "sd3" else 0.3611,
                                shift_factor=0.0609 if family == "sd3" else 0.1159)
            extra = {}
            if family == "flux2-klein":
                tr = Flux2Transformer2DModel(**cfg)
                vae = AutoencoderKLFlux2()
                qwen = Qwen3ForCausalLM(Qwen3Config(**QWEN3[name]))
                te = [t for t in shapes(qwen, dt) if not (QWEN3[name]["tie_word_embeddings"] and t["name"] == "lm_head.weight")]
                comps = {"transformer": shapes(tr, dt), "vae": [t for t in shapes(vae, dt) if not t["name"].endswith("num_batches_tracked")],
                         "text_encoder": te}
                extra = {"vae_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vae.config.items()
                                        if not k.startswith("_")},
                         "text_config": QWEN3[name]}
            elif family == "sd3":
                tr = SD3Transformer2DModel(**cfg)
                comps = {"transformer": shapes(tr, dt), "vae": shapes(vae, dt), "text_encoder": shapes(clip_l_proj, "fp16"),
                         "text_encoder_2": shapes(clip_g, "fp16"), "text_encoder_3": shapes(t5, "fp16")}
            elif family == "chroma":
                tr = ChromaTransformer2DModel(**cfg)
                comps = {"transformer": shapes(tr, dt), "vae": shapes(vae, dt), "text_encoder": shapes(t5, dt)}
            else:
                tr = FluxTransformer2DModel(**cfg)
                comps = {"transformer": shapes(tr, dt), "vae": shapes(vae, dt), "text_encoder": shapes(clip_l, dt),
                         "text_encoder_2": shapes(t5, dt)}
            # transformers 5 ties T5's `encoder.embed_tokens` to `shared`: the Hub files store `shared.weight`.
            for k in ("text_encoder_3", "text_encoder_2", "text_encoder"):
                if k in comps and any(t["name"] == "shared.weight" for t in comps[k]):
                    comps[k] = [t for t in comps[k] if t["name"] != "encoder.embed_tokens.weight"]
            doc = {"generator": "scripts/make_manifests.py", "diffusers": diffusers.__version__,
                   "transformers": transformers.__version__, "model": name, "family": family,
                   "transformer_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
                   "components": comps, **extra}
            with open(os.path.join(OUT, f"{name}.json"), "w") as fh:
                json.dump(doc, fh, separators=(",", ":"))
            n = sum(1 for c in comps.values() for _ in c)
            print(name, n, "tensors")
    flux2_dev()


# Mistral Small 3.1 (mistralai/Mistral-Small-3.1-24B-Instruct-2503/config.json), FLUX.2 [dev]'s text
# encoder: the language model and the Pixtral vision tower the pipeline never runs. Written from the
# published config; to be checked against the Hub's where it is reachable.
MISTRAL3_TEXT = dict(vocab_size=131072, hidden_size=5120, intermediate_size=32768, num_hidden_layers=40,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                     max_position_embeddings=131072, sliding_window=None,
                     rope_parameters={"rope_theta": 1000000000.0, "rope_type": "default"})
MISTRAL3_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       head_dim=64, image_size=1540, patch_size=14, rope_theta=10000.0)


def flux2_dev():
    """FLUX.2 [dev] (black-forest-labs/FLUX.2-dev): diffusers' `Flux2Transformer2DModel` and
    `AutoencoderKLFlux2` defaults are [dev]'s configs; Mistral Small 3.1 as text encoder, its tensors
    named as transformers saves `Mistral3ForConditionalGeneration` (`language_model.model.*`)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig
    with torch.device("meta"):
        tr = Flux2Transformer2DModel()
        vae = AutoencoderKLFlux2()
        te = Mistral3ForConditionalGeneration(Mistral3Config(
            text_config=MistralConfig(**MISTRAL3_TEXT), vision_config=PixtralVisionConfig(**MISTRAL3_VISION),
            image_token_index=10, spatial_merge_size=2, multimodal_projector_bias=False,
            projector_hidden_act="gelu", vision_feature_layer=-1))
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in tr.config.items() if not k.startswith("_")}
    # The names transformers writes (its save reverses the in-memory `model.language_model` layout).
    names = {}
    for n, p in te.state_dict().items():
        for new, old in (("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
                         ("model.multi_modal_projector.", "multi_modal_projector."), ("lm_head.", "language_model.lm_head.")):
            if n.startswith(new):
                n = old + n[len(new):]
                break
        names[n] = list(p.shape)
    text = [{"name": n, "shape": s, "dtype": "bf16"} for n, s in names.items()]
    doc = {"generator": "scripts/make_manifests.py", "diffusers": diffusers.__version__,
           "transformers": transformers.__version__, "model": "flux.2-dev", "family": "flux2-dev",
           "transformer_config": cfg,
           "components": {"transformer": shapes(tr, "bf16"),
                          "vae": [t for t in shapes(vae, "bf16") if not t["name"].endswith("num_batches_tracked")],
                          "text_encoder": text},
           "vae_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vae.config.items()
                          if not k.startswith("_")},
           "text_config": dict(MISTRAL3_TEXT, model_type="mistral")}
    with open(os.path.join(OUT, "flux.2-dev.json"), "w") as fh:
        json.dump(doc, fh, separators=(",", ":"))
    n = {k: len(v) for k, v in doc["components"].items()}
    params = sum(math.prod(t["shape"]) for c in doc["components"].values() for t in c)
    print("flux.2-dev", n, "tensors,", params / 1e9, "B parameters")


if __name__ == "__main__":
    main()
