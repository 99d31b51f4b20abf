"""Tiny GGUF models in the ComfyUI-GGUF / stable-diffusion.cpp convention, and diffusers' images from
the same files, for the GGUF loader (src/loader/gguf.rs, tests/gguf.rs):

    python scripts/make_gguf_fixtures.py

The K types quantize blocks of 256 values, so the tiny fixtures (width 32) cannot hold them: these
models are 256 wide (FLUX.1-dev: 1 double + 1 single block, 2 heads of 128; SD3.5: 2 joint blocks,
the first MMDiT-X, qk RMSNorm, 4 heads of 64), with the text encoders, tokenizers, VAE and scheduler
of the tiny fixtures (flux-dev-tiny, sd35-tiny). Writes, under tests/fixtures/gguf/<name>/:

- a diffusers-layout components folder (configs, tokenizers, text encoders, VAE; the transformer's
  config only);
- `<name>.gguf`: the transformer under its original BFL/SAI names (SD3 under `model.diffusion_model.`),
  `general.architecture` flux/sd3, every tensor that is not a 2-D weight F32 and the 2-D weights cycling through Q8_0, Q6_K,
  Q5_K, Q5_1, Q5_0, Q4_K, Q4_1, Q4_0, Q3_K, Q2_K, F16, BF16, F32 (a type whose blocks do not divide the
  row is skipped for that tensor). Q/F types are quantized from a random diffusers model with the `gguf`
  package; the `gguf` package cannot quantize the K types, so their blocks are random bytes with each
  block's f16 scales set to give weights of the model's scale (every bit pattern of the quants and
  sub-scales occurs);
- `dequant.json`: for every tensor, its type, shape and the SHA-256 of the `gguf` package's f32
  dequantization (little-endian bytes);
- `reference.safetensors` + `fixture.json` + noise: diffusers' images from the GGUF file, loaded with
  `from_single_file(..., quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32))`.
  diffusers' FLUX.1 converter assumes the real width (inner_dim = 3072); it is run here with the
  model's width substituted in its source, nothing else changed.

and tests/fixtures/gguf/t5-tiny/: sd35-tiny's T5 encoder as a GGUF T5 file in llama.cpp's names
(`token_embd`, `enc.blk.<i>.attn_q`, ..., `enc.output_norm`; `general.architecture` t5encoder, as
city96's t5-v1_1-xxl-encoder-gguf), its weights cycling through the 32-value types, with
`dequant.json` and `reference.safetensors`: diffusers' SD3 prompt embeddings (`encode_prompt`) of the
sd35-tiny prompts with that T5 (transformers' `T5EncoderModel` on the `gguf` package's
dequantization).
"""

import hashlib
import inspect
import json
import os
import shutil
import sys

import gguf
import numpy as np
import torch
import diffusers
from diffusers import (FluxPipeline, FluxTransformer2DModel, GGUFQuantizationConfig, SD3Transformer2DModel,
                       StableDiffusion3Pipeline)
from diffusers.loaders import single_file_model, single_file_utils
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from make_single_file_fixtures import flux_to_bfl, sd3_to_sai  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
FIX = os.path.join(ROOT, "tests", "fixtures")
T = gguf.GGMLQuantizationType
CYCLE = [T.Q8_0, T.Q6_K, T.Q5_K, T.Q5_1, T.Q5_0, T.Q4_K, T.Q4_1, T.Q4_0, T.Q3_K, T.Q2_K, T.F16, T.BF16, T.F32]
# Byte offsets of each K type's f16 scales (d, and dmin where it has one) inside a block.
K_SCALES = {T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}


def k_blocks(rows, cols, t, rng, std):
    """Random blocks of type t for a [rows, cols] weight, scaled so the weights' std is about std."""
    bs, ts = gguf.GGML_QUANT_SIZES[t]
    nb = rows * cols // bs
    raw = rng.integers(0, 256, (nb, ts), dtype=np.uint8)
    jitter = rng.uniform(0.5, 1.5, nb)

    def set_scales(c):
        for off in K_SCALES[t]:
            raw[:, off:off + 2] = (c * jitter).astype(np.float16).view(np.uint8).reshape(nb, 2)

    set_scales(1.0)
    v = gguf.quants.dequantize(raw.reshape(rows, -1), t)
    set_scales(std / float(v.std()))
    return raw.reshape(rows, cols // bs * ts)


def write_gguf(path, arch, state, rng):
    w = gguf.GGUFWriter(path, arch=arch)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    i = 0
    types = {}
    for name in sorted(state):
        x = state[name].float().numpy()
        if x.ndim != 2:
            t = T.F32
        else:
            cols = x.shape[-1]
            for j in range(len(CYCLE)):
                t = CYCLE[(i + j) % len(CYCLE)]
                if cols % gguf.GGML_QUANT_SIZES[t][0] == 0:
                    break
            i += 1
        if t in K_SCALES:
            data = k_blocks(int(np.prod(x.shape[:-1])), x.shape[-1], t, rng, float(x.std()))
            data = data.reshape(*x.shape[:-1], -1)
        else:
            data = gguf.quants.quantize(x, t)
        w.add_tensor(name, data, raw_dtype=t)
        types[name] = t.name
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return types


def dequant_listing(path):
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        v = gguf.quants.dequantize(t.data, t.tensor_type).astype("<f4")
        out[t.name] = {"type": t.tensor_type.name, "shape": [int(d) for d in reversed(t.shape)],
                       "sha256": hashlib.sha256(v.tobytes()).hexdigest()}
    return out


def components(src, dst, tcfg):
    if os.path.isdir(dst):
        shutil.rmtree(dst)
    shutil.copytree(os.path.join(FIX, src), dst,
                    ignore=shutil.ignore_patterns("reference.safetensors", "fixture.json", "noise_*", "transformer"))
    os.makedirs(os.path.join(dst, "transformer"))
    with open(os.path.join(dst, "transformer", "config.json"), "w") as fh:
        json.dump(tcfg, fh, indent=1)


def flux_width_converter(width):
    """diffusers' FLUX.1 converter with the model's width in place of 3072."""
    src = inspect.getsource(single_file_utils.convert_flux_transformer_checkpoint_to_diffusers)
    assert "inner_dim = 3072" in src
    ns = dict(single_file_utils.__dict__)
    exec(src.replace("inner_dim = 3072", f"inner_dim = {width}"), ns)
    fn = ns["convert_flux_transformer_checkpoint_to_diffusers"]
    single_file_model.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"]["checkpoint_mapping_fn"] = fn


def run_images(pipe, out, runs, max_seq, packed, meta):
    g = torch.Generator().manual_seed(0)
    tensors = {}
    c = pipe.vae.config.latent_channels
    f = pipe.vae_scale_factor
    for k, r in enumerate(runs):
        noise = torch.randn((1, c, r["height"] // f, r["width"] // f), generator=g)
        save_file({"noise": noise.contiguous()}, os.path.join(out, f"noise_{k}.safetensors"))
        lat = pipe._pack_latents(noise, 1, c, noise.shape[2], noise.shape[3]) if packed else noise
        kw = {}
        if "negative_prompt" in r:
            kw["negative_prompt"] = r["negative_prompt"]
        if "true_cfg" in r:
            kw["true_cfg_scale"] = r["true_cfg"]
        img = pipe(prompt=r["prompt"], num_inference_steps=r["steps"], guidance_scale=r["guidance"],
                   height=r["height"], width=r["width"], latents=lat, max_sequence_length=max_seq,
                   output_type="pil", **kw).images[0]
        tensors[f"run.{k}.image"] = torch.from_numpy(np.array(img).copy())
        meta["runs"].append(dict(r, noise=f"noise_{k}.safetensors"))
    save_file(tensors, os.path.join(out, "reference.safetensors"))
    with open(os.path.join(out, "fixture.json"), "w") as fh:
        json.dump(meta, fh, indent=1)


def make(name, src, tcfg, model_cls, pipe_cls, to_original, prefix, arch, runs, max_seq):
    out = os.path.join(FIX, "gguf", name)
    components(src, out, tcfg)
    torch.manual_seed(0)
    model = model_cls.from_config({k: v for k, v in tcfg.items() if not k.startswith("_")})
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    state = {prefix + k: v for k, v in to_original(sd, tcfg).items()}
    path = os.path.join(out, f"{name}.gguf")
    types = write_gguf(path, arch, state, np.random.default_rng(0))
    with open(os.path.join(out, "dequant.json"), "w") as fh:
        json.dump(dequant_listing(path), fh, indent=0)
    q = model_cls.from_single_file(path, config=out, subfolder="transformer", local_files_only=True,
                                   quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
                                   torch_dtype=torch.float32)
    pipe = pipe_cls.from_pretrained(out, transformer=q, torch_dtype=torch.float32, local_files_only=True)
    meta = {"generator": "scripts/make_gguf_fixtures.py", "torch": torch.__version__,
            "diffusers": diffusers.__version__, "gguf": "0.19.0", "seed": 0, "max_sequence_length": max_seq,
            "types": sorted(set(types.values())), "runs": []}
    run_images(pipe, out, runs, max_seq, pipe_cls is FluxPipeline, meta)
    print(f"wrote tests/fixtures/gguf/{name}: {len(types)} tensors, {os.path.getsize(path)} bytes,",
          ", ".join(f"{t} x{list(types.values()).count(t)}" for t in meta["types"]))


T5_BLOCK = [("layer.0.SelfAttention.q.", "attn_q."), ("layer.0.SelfAttention.k.", "attn_k."),
            ("layer.0.SelfAttention.v.", "attn_v."), ("layer.0.SelfAttention.o.", "attn_o."),
            ("layer.0.SelfAttention.relative_attention_bias.", "attn_rel_b."), ("layer.0.layer_norm.", "attn_norm."),
            ("layer.1.DenseReluDense.wi_0.", "ffn_gate."), ("layer.1.DenseReluDense.wi_1.", "ffn_up."),
            ("layer.1.DenseReluDense.wo.", "ffn_down."), ("layer.1.layer_norm.", "ffn_norm.")]


def t5_llama_name(k):
    if k.startswith("shared."):
        return "token_embd." + k[len("shared."):]
    if k.startswith("encoder.final_layer_norm."):
        return "enc.output_norm." + k[len("encoder.final_layer_norm."):]
    _, _, i, rest = k.split(".", 3)
    for hf, ll in T5_BLOCK:
        if rest.startswith(hf):
            return f"enc.blk.{i}.{ll}{rest[len(hf):]}"
    raise KeyError(k)


def t5_fixture():
    from safetensors.torch import load_file
    from transformers import T5EncoderModel
    src = os.path.join(FIX, "sd35-tiny")
    out = os.path.join(FIX, "gguf", "t5-tiny")
    os.makedirs(out, exist_ok=True)
    sd = load_file(os.path.join(src, "text_encoder_3", "model.safetensors"))
    sd = {k: v for k, v in sd.items() if k != "encoder.embed_tokens.weight"}
    state = {t5_llama_name(k): v for k, v in sd.items()}
    path = os.path.join(out, "t5-tiny.gguf")
    cycle = [T.Q8_0, T.Q5_1, T.Q5_0, T.Q4_1, T.Q4_0, T.F16, T.BF16]
    w = gguf.GGUFWriter(path, arch="t5encoder")
    types = {}
    for i, name in enumerate(sorted(state)):
        x = state[name].float().numpy()
        t = T.F32
        if x.ndim == 2 and "attn_rel_b" not in name:
            for j in range(len(cycle)):
                t = cycle[(i + j) % len(cycle)]
                if x.shape[-1] % gguf.GGML_QUANT_SIZES[t][0] == 0:
                    break
        w.add_tensor(name, gguf.quants.quantize(x, t), raw_dtype=t)
        types[name] = t.name
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    listing = dequant_listing(path)
    with open(os.path.join(out, "dequant.json"), "w") as fh:
        json.dump(listing, fh, indent=0)
    hf = {k: None for k in sd}
    deq = {}
    for t in gguf.GGUFReader(path).tensors:
        deq[t.name] = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
    for k in hf:
        hf[k] = deq[t5_llama_name(k)].reshape(sd[k].shape)
    t5 = T5EncoderModel.from_pretrained(os.path.join(src, "text_encoder_3"), torch_dtype=torch.float32)
    missing, unexpected = t5.load_state_dict(hf, strict=False)
    assert not [m for m in missing if m != "encoder.embed_tokens.weight"] and not unexpected, (missing, unexpected)
    pipe = StableDiffusion3Pipeline.from_pretrained(src, text_encoder_3=t5, torch_dtype=torch.float32,
                                                    local_files_only=True)
    meta = json.load(open(os.path.join(src, "fixture.json")))
    tensors = {}
    for i, p in enumerate(meta["prompts"]):
        emb, _, pooled, _ = pipe.encode_prompt(p, p, p, do_classifier_free_guidance=False,
                                               max_sequence_length=meta["max_sequence_length"])
        tensors[f"text.{i}.context"] = emb.contiguous()
        tensors[f"text.{i}.pooled"] = pooled.contiguous()
    save_file(tensors, os.path.join(out, "reference.safetensors"))
    with open(os.path.join(out, "fixture.json"), "w") as fh:
        json.dump({"generator": "scripts/make_gguf_fixtures.py", "torch": torch.__version__,
                   "diffusers": diffusers.__version__, "gguf": "0.19.0", "components": "sd35-tiny",
                   "max_sequence_length": meta["max_sequence_length"], "prompts": meta["prompts"],
                   "types": sorted(set(types.values()))}, fh, indent=1)
    print(f"wrote tests/fixtures/gguf/t5-tiny: {len(types)} tensors,", sorted(set(types.values())))


def main():
    torch.set_grad_enabled(False)
    t5_fixture()
    flux = {"_class_name": "FluxTransformer2DModel", "_diffusers_version": diffusers.__version__,
            "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56], "guidance_embeds": True,
            "in_channels": 16, "joint_attention_dim": 32, "num_attention_heads": 2, "num_layers": 1,
            "num_single_layers": 1, "out_channels": None, "patch_size": 1, "pooled_projection_dim": 32}
    flux_width_converter(256)
    make("flux-dev-256", "flux-dev-tiny", flux, FluxTransformer2DModel, FluxPipeline,
         lambda sd, c: flux_to_bfl(sd, c["num_layers"], c["num_single_layers"]), "", "flux",
         [{"prompt": "a red circle on a white background", "steps": 3, "guidance": 3.5, "height": 32, "width": 32},
          {"prompt": "a cat", "negative_prompt": "blurry", "true_cfg": 2.0, "steps": 2, "guidance": 4.0,
           "height": 40, "width": 24}], 24)
    sd35 = {"_class_name": "SD3Transformer2DModel", "_diffusers_version": diffusers.__version__,
            "attention_head_dim": 64, "caption_projection_dim": 256, "dual_attention_layers": [0],
            "in_channels": 16, "joint_attention_dim": 64, "num_attention_heads": 4, "num_layers": 2,
            "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 64, "pos_embed_max_size": 16,
            "qk_norm": "rms_norm", "sample_size": 16}
    make("sd35-256", "sd35-tiny", sd35, SD3Transformer2DModel, StableDiffusion3Pipeline,
         lambda sd, c: sd3_to_sai(sd, c["num_layers"]), "model.diffusion_model.", "sd3",
         [{"prompt": "a red circle on a white background", "negative_prompt": "blurry", "steps": 3,
           "guidance": 7.0, "height": 48, "width": 32}], 32)


if __name__ == "__main__":
    sys.exit(main())
