"""Single-file (original layout) twins of diffusers-layout fixtures, and single-file shape manifests of the
six real models, for the single-file loader (src/loader/single.rs, tests/single_file.rs):

    python scripts/make_single_file_fixtures.py

Writes, under tests/fixtures/single/:
- sd3-dummy/sd3_dummy.safetensors: the sd3-dummy fixture as one SAI file: the MMDiT under
  `model.diffusion_model.`, the VAE under `first_stage_model.` (LDM names), CLIP-L, CLIP-G and T5 under
  `text_encoders.{clip_l,clip_g,t5xxl}.transformer.`;
- sd35-tiny/sd35_tiny.safetensors: the sd35-tiny MMDiT alone (qk RMSNorm, MMDiT-X), no prefix;
- flux-dev-tiny/flux1-dev-tiny.safetensors + ae.safetensors: the flux-dev-tiny transformer in BFL names
  and its VAE in LDM names, as Black Forest Labs ships them;
- chroma-tiny/chroma-tiny.safetensors + ae.safetensors: the chroma-tiny transformer in the original
  Chroma names (FLUX.1's without the modulation layers, plus `distilled_guidance_layer.*`) and its VAE;
and tests/fixtures/manifests/<model>.single.json: the tensors (name, shape, dtype) a single-file copy of each
real model holds (SAI files with encoders and VAE; BFL and Chroma transformer + ae; BFL FLUX.2 transformer), from the
diffusers manifests.

The inverse mapping here (diffusers -> original names) is checked against diffusers' own converter: every
fixture file is loaded back with diffusers' `from_single_file` and must equal its twin tensor for tensor.
"""

import json
import os
import sys

import torch
import diffusers
from diffusers import AutoencoderKL, ChromaTransformer2DModel, FluxTransformer2DModel, SD3Transformer2DModel
from safetensors.torch import load_file, save_file

ROOT = os.path.join(os.path.dirname(__file__), "..")
FIX = os.path.join(ROOT, "tests", "fixtures")


def swap(t):
    shift, scale = t.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def take(sd, name):
    return sd.pop(name)


def sd3_to_sai(sd, num_layers):
    sd, out = dict(sd), {}
    ren = {
        "pos_embed.pos_embed": "pos_embed", "pos_embed.proj": "x_embedder.proj",
        "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
        "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
        "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
        "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
        "context_embedder": "context_embedder", "proj_out": "final_layer.linear",
    }
    blk = {
        "attn.to_out.0": "x_block.attn.proj", "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
        "attn2.to_out.0": "x_block.attn2.proj", "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k",
        "norm1.linear": "x_block.adaLN_modulation.1", "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
        "attn.to_add_out": "context_block.attn.proj", "attn.norm_added_q": "context_block.attn.ln_q",
        "attn.norm_added_k": "context_block.attn.ln_k", "ff_context.net.0.proj": "context_block.mlp.fc1",
        "ff_context.net.2": "context_block.mlp.fc2",
    }
    for p in ("weight", "bias"):
        k = f"norm_out.linear.{p}"
        if k in sd:
            out[f"final_layer.adaLN_modulation.1.{p}"] = swap(take(sd, k))
        for i in range(num_layers):
            b = f"transformer_blocks.{i}."
            for fused, parts in [("x_block.attn.qkv", ["attn.to_q", "attn.to_k", "attn.to_v"]),
                                 ("x_block.attn2.qkv", ["attn2.to_q", "attn2.to_k", "attn2.to_v"]),
                                 ("context_block.attn.qkv", ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"])]:
                if f"{b}{parts[0]}.{p}" in sd:
                    out[f"joint_blocks.{i}.{fused}.{p}"] = torch.cat([take(sd, f"{b}{q}.{p}") for q in parts], 0)
            k = f"{b}norm1_context.linear.{p}"
            if k in sd:
                t = take(sd, k)
                out[f"joint_blocks.{i}.context_block.adaLN_modulation.1.{p}"] = swap(t) if i == num_layers - 1 else t
    for k in list(sd):
        if k in ren:
            out[ren[k]] = take(sd, k)
            continue
        stem, p = k.rsplit(".", 1)
        if stem in ren:
            out[f"{ren[stem]}.{p}"] = take(sd, k)
        elif stem.startswith("distilled_guidance_layer.layers."):
            i, rest = stem[len("distilled_guidance_layer.layers."):].split(".", 1)
            out[f"distilled_guidance_layer.layers.{i}.{apx[rest]}.{p}"] = take(sd, k)
        elif stem.startswith("distilled_guidance_layer.norms."):
            out[f"{stem}.scale"] = take(sd, k)
        elif stem.startswith("transformer_blocks."):
            _, i, rest = stem.split(".", 2)
            out[f"joint_blocks.{i}.{blk[rest]}.{p}"] = take(sd, k)
    assert not sd, f"unmapped SD3 tensors: {sorted(sd)[:5]}"
    return out


def flux_to_bfl(sd, num_layers, num_single):
    sd, out = dict(sd), {}
    ren = {
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear",
        # Chroma's approximator
        "distilled_guidance_layer.in_proj": "distilled_guidance_layer.in_proj",
        "distilled_guidance_layer.out_proj": "distilled_guidance_layer.out_proj",
    }
    apx = {"linear_1": "in_layer", "linear_2": "out_layer"}
    dbl = {
        "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin", "attn.to_out.0": "img_attn.proj",
        "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
        "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
    }
    dbl_norm = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
    sgl = {"proj_out": "linear2", "norm.linear": "modulation.lin"}
    sgl_norm = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
    for p in ("weight", "bias"):
        k = f"norm_out.linear.{p}"
        if k in sd:
            out[f"final_layer.adaLN_modulation.1.{p}"] = swap(take(sd, k))
        for i in range(num_layers):
            b = f"transformer_blocks.{i}."
            for fused, parts in [("img_attn.qkv", ["attn.to_q", "attn.to_k", "attn.to_v"]),
                                 ("txt_attn.qkv", ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"])]:
                if f"{b}{parts[0]}.{p}" in sd:
                    out[f"double_blocks.{i}.{fused}.{p}"] = torch.cat([take(sd, f"{b}{q}.{p}") for q in parts], 0)
        for i in range(num_single):
            b = f"single_transformer_blocks.{i}."
            parts = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
            if f"{b}attn.to_q.{p}" in sd:
                out[f"single_blocks.{i}.linear1.{p}"] = torch.cat([take(sd, f"{b}{q}.{p}") for q in parts], 0)
    for k in list(sd):
        stem, p = k.rsplit(".", 1)
        if stem in ren:
            out[f"{ren[stem]}.{p}"] = take(sd, k)
        elif stem.startswith("distilled_guidance_layer.layers."):
            i, rest = stem[len("distilled_guidance_layer.layers."):].split(".", 1)
            out[f"distilled_guidance_layer.layers.{i}.{apx[rest]}.{p}"] = take(sd, k)
        elif stem.startswith("distilled_guidance_layer.norms."):
            out[f"{stem}.scale"] = take(sd, k)
        elif stem.startswith("transformer_blocks."):
            _, i, rest = stem.split(".", 2)
            if rest in dbl_norm:
                out[f"double_blocks.{i}.{dbl_norm[rest]}.scale"] = take(sd, k)
            else:
                out[f"double_blocks.{i}.{dbl[rest]}.{p}"] = take(sd, k)
        elif stem.startswith("single_transformer_blocks."):
            _, i, rest = stem.split(".", 2)
            if rest in sgl_norm:
                out[f"single_blocks.{i}.{sgl_norm[rest]}.scale"] = take(sd, k)
            else:
                out[f"single_blocks.{i}.{sgl[rest]}.{p}"] = take(sd, k)
    assert not sd, f"unmapped Flux tensors: {sorted(sd)[:5]}"
    return out


def flux2_to_bfl(sd):
    """diffusers FLUX.2 transformer names -> BFL's (the inverse of diffusers' FLUX.2 converter): q/k/v
    fused per stream, the final modulation's halves swapped, single blocks' fused projections as
    they are."""
    sd, out = dict(sd), {}
    top = {"x_embedder": "img_in", "context_embedder": "txt_in",
           "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
           "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
           "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
           "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
           "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
           "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
           "single_stream_modulation.linear": "single_stream_modulation.lin", "proj_out": "final_layer.linear"}
    dbl = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "ff.linear_in": "img_mlp.0",
           "ff.linear_out": "img_mlp.2", "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2"}
    dbl_norm = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
    sgl = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
    sgl_norm = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
    if "norm_out.linear.weight" in sd:
        out["final_layer.adaLN_modulation.1.weight"] = swap(take(sd, "norm_out.linear.weight"))
    for k in [k for k in sd if k.startswith("transformer_blocks.") and ".attn.to_q." in k]:
        b, p = k.split(".attn.to_q.")
        i = b.split(".")[1]
        for fused, parts in [("img_attn.qkv", ["attn.to_q", "attn.to_k", "attn.to_v"]),
                             ("txt_attn.qkv", ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"])]:
            out[f"double_blocks.{i}.{fused}.{p}"] = torch.cat([take(sd, f"{b}.{q}.{p}") for q in parts], 0)
    for k in list(sd):
        stem, p = k.rsplit(".", 1)
        if stem in top:
            out[f"{top[stem]}.{p}"] = take(sd, k)
        elif stem.startswith("transformer_blocks."):
            _, i, rest = stem.split(".", 2)
            if rest in dbl_norm:
                out[f"double_blocks.{i}.{dbl_norm[rest]}.scale"] = take(sd, k)
            else:
                out[f"double_blocks.{i}.{dbl[rest]}.{p}"] = take(sd, k)
        elif stem.startswith("single_transformer_blocks."):
            _, i, rest = stem.split(".", 2)
            if rest in sgl_norm:
                out[f"single_blocks.{i}.{sgl_norm[rest]}.scale"] = take(sd, k)
            else:
                out[f"single_blocks.{i}.{sgl[rest]}.{p}"] = take(sd, k)
    assert not sd, f"unmapped FLUX.2 tensors: {sorted(sd)[:5]}"
    return out


def check_flux2_at_real_width(tmp):
    """A FLUX.2 [klein] 4B-width transformer (1 double + 1 single block) through flux2_to_bfl and back
    through diffusers' from_single_file must be unchanged."""
    from diffusers import Flux2Transformer2DModel
    cfg = dict(num_layers=1, num_single_layers=1, num_attention_heads=24, joint_attention_dim=7680,
               guidance_embeds=True)
    model = Flux2Transformer2DModel(**cfg)
    sd = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    d = os.path.join(tmp, "flux2")
    os.makedirs(os.path.join(d, "transformer"), exist_ok=True)
    model.save_config(os.path.join(d, "transformer"))
    path = os.path.join(d, "flux2-check.safetensors")
    save_file(contiguous(flux2_to_bfl(sd)), path)
    back = Flux2Transformer2DModel.from_single_file(path, config=d, subfolder="transformer", local_files_only=True,
                                                    torch_dtype=torch.bfloat16)
    check_same("FLUX.2-width transformer (1+1 blocks)", back.state_dict(), sd)
    os.remove(path)


def vae_to_ldm(sd):
    sd, out = dict(sd), {}
    levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("decoder.up_blocks."))
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for k in list(sd):
        t = take(sd, k)
        if k.startswith(("quant_conv.", "post_quant_conv.")):
            out[k] = t
            continue
        side, r = k.split(".", 1)
        if r.startswith("conv_norm_out."):
            r = "norm_out." + r[len("conv_norm_out."):]
        elif r.startswith("mid_block.resnets."):
            j, rest = r[len("mid_block.resnets."):].split(".", 1)
            r = f"mid.block_{int(j) + 1}.{rest}"
        elif r.startswith("mid_block.attentions.0."):
            rest = r[len("mid_block.attentions.0."):]
            stem, p = rest.rsplit(".", 1)
            if stem != "group_norm" and p == "weight":
                t = t.reshape(*t.shape, 1, 1)
            r = f"mid.attn_1.{attn[stem]}.{p}"
        elif r.startswith(("down_blocks.", "up_blocks.")):
            kind, i, what, rest = r.split(".", 3)
            i = int(i)
            lvl, name = ("down", i) if kind == "down_blocks" else ("up", levels - 1 - i)
            if what == "resnets":
                j, rest = rest.split(".", 1)
                rest = rest.replace("conv_shortcut.", "nin_shortcut.")
                r = f"{lvl}.{name}.block.{j}.{rest}"
            elif what in ("downsamplers", "upsamplers"):
                r = f"{lvl}.{name}.{'downsample' if lvl == 'down' else 'upsample'}.{rest[2:]}"
            else:
                raise KeyError(k)
        elif not r.startswith(("conv_in.", "conv_out.")):
            raise KeyError(k)
        out[f"{side}.{r}"] = t
    return out


def prefixed(d, prefix):
    return {prefix + k: v for k, v in d.items()}


def contiguous(d):
    return {k: v.contiguous() for k, v in d.items()}


def load_component(folder, comp):
    d = os.path.join(folder, comp)
    sd = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            sd.update(load_file(os.path.join(d, f)))
    return sd


def check_same(what, a, b):
    assert set(a) == set(b), f"{what}: names differ: {sorted(set(a) ^ set(b))[:6]}"
    for k in a:
        assert torch.equal(a[k].float(), b[k].float()), f"{what}: {k} differs"
    print(f"{what}: {len(a)} tensors equal to diffusers' from_single_file")


def sd3_file(twin, out_path, prefix, with_vae_and_encoders):
    folder = os.path.join(FIX, twin)
    cfg = json.load(open(os.path.join(folder, "transformer", "config.json")))
    tr = load_component(folder, "transformer")
    state = prefixed(sd3_to_sai(tr, cfg["num_layers"]), prefix)
    if with_vae_and_encoders:
        state.update(prefixed(vae_to_ldm(load_component(folder, "vae")), "first_stage_model."))
        for comp, name in [("text_encoder", "clip_l"), ("text_encoder_2", "clip_g"), ("text_encoder_3", "t5xxl")]:
            if os.path.isdir(os.path.join(folder, comp)):
                state.update(prefixed(load_component(folder, comp), f"text_encoders.{name}.transformer."))
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    save_file(contiguous(state), out_path)
    back = SD3Transformer2DModel.from_single_file(out_path, config=folder, subfolder="transformer",
                                                  local_files_only=True, torch_dtype=torch.float32)
    check_same(f"{twin} transformer", back.state_dict(), tr)
    if with_vae_and_encoders:
        vae = AutoencoderKL.from_single_file(out_path, config=folder, subfolder="vae", local_files_only=True,
                                             torch_dtype=torch.float32)
        check_same(f"{twin} vae", vae.state_dict(), load_component(folder, "vae"))


def flux_files(twin, out_dir, name):
    folder = os.path.join(FIX, twin)
    cfg = json.load(open(os.path.join(folder, "transformer", "config.json")))
    tr = load_component(folder, "transformer")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    save_file(contiguous(flux_to_bfl(tr, cfg["num_layers"], cfg["num_single_layers"])), path)
    ae = os.path.join(out_dir, "ae.safetensors")
    vae_sd = load_component(folder, "vae")
    save_file(contiguous(vae_to_ldm(vae_sd)), ae)
    # diffusers' Flux converter assumes the real width (3072, MLP ratio 4): the mapping is checked at
    # that width instead (check_flux_at_real_width).
    vae = AutoencoderKL.from_single_file(ae, config=folder, subfolder="vae", local_files_only=True,
                                         torch_dtype=torch.float32)
    check_same(f"{twin} vae", vae.state_dict(), vae_sd)


def check_flux_at_real_width(tmp):
    """A random FLUX.1-dev-width transformer (1 double + 1 single block) through flux_to_bfl and back
    through diffusers' from_single_file must be unchanged."""
    cfg = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
               num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
               axes_dims_rope=[16, 56, 56])
    model = FluxTransformer2DModel(**cfg)
    sd = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    os.makedirs(os.path.join(tmp, "transformer"), exist_ok=True)
    model.save_config(os.path.join(tmp, "transformer"))
    path = os.path.join(tmp, "flux1-check.safetensors")
    save_file(contiguous(flux_to_bfl(sd, 1, 1)), path)
    back = FluxTransformer2DModel.from_single_file(path, config=tmp, subfolder="transformer", local_files_only=True,
                                                   torch_dtype=torch.bfloat16)
    check_same("FLUX.1-width transformer (1+1 blocks)", back.state_dict(), sd)
    os.remove(path)


def check_chroma_at_real_width(tmp):
    """The same for a Chroma-width transformer (1 double + 1 single block, 1 approximator layer)."""
    cfg = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
               num_attention_heads=24, joint_attention_dim=4096, axes_dims_rope=[16, 56, 56],
               approximator_num_channels=64, approximator_hidden_dim=5120, approximator_layers=1)
    model = ChromaTransformer2DModel(**cfg)
    sd = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    d = os.path.join(tmp, "chroma")
    os.makedirs(os.path.join(d, "transformer"), exist_ok=True)
    model.save_config(os.path.join(d, "transformer"))
    path = os.path.join(d, "chroma-check.safetensors")
    save_file(contiguous(flux_to_bfl(sd, 1, 1)), path)
    back = ChromaTransformer2DModel.from_single_file(path, config=d, subfolder="transformer", local_files_only=True,
                                                     torch_dtype=torch.bfloat16)
    check_same("Chroma-width transformer (1+1 blocks)", back.state_dict(), sd)
    os.remove(path)


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
NAMES = {v: k for k, v in DTYPES.items()}


def meta(tensors):
    return {t["name"]: torch.empty(t["shape"], dtype=DTYPES[t["dtype"]], device="meta") for t in tensors}


def listing(d):
    return [{"name": k, "shape": list(v.shape), "dtype": NAMES[v.dtype]} for k, v in sorted(d.items())]


def single_manifest(path):
    m = json.load(open(path))
    comps = {c: meta(t) for c, t in m["components"].items()}
    cfg = m["transformer_config"]
    out = {"generator": "scripts/make_single_file_fixtures.py", "from": os.path.basename(path),
           "diffusers": diffusers.__version__, "torch": torch.__version__, "model": m["model"], "family": m["family"]}
    if m["family"] == "sd3":
        f = prefixed(sd3_to_sai(comps["transformer"], cfg["num_layers"]), "model.diffusion_model.")
        f.update(prefixed(vae_to_ldm(comps["vae"]), "first_stage_model."))
        clip_l = dict(comps["text_encoder"])
        clip_l.pop("text_projection.weight")  # SAI files carry none; the loader uses the identity
        f.update(prefixed(clip_l, "text_encoders.clip_l.transformer."))
        f.update(prefixed(comps["text_encoder_2"], "text_encoders.clip_g.transformer."))
        f.update(prefixed(comps["text_encoder_3"], "text_encoders.t5xxl.transformer."))
        out["file"] = listing(f)
    elif m["family"] in ("flux2-klein", "flux2-dev"):
        # BFL ships FLUX.2's transformer alone (the VAE and Qwen3 come from --components).
        out["file"] = listing(flux2_to_bfl(comps["transformer"]))
    else:
        out["file"] = listing(flux_to_bfl(comps["transformer"], cfg["num_layers"], cfg["num_single_layers"]))
        out["ae"] = listing(vae_to_ldm(comps["vae"]))
    dst = path.replace(".json", ".single.json")
    with open(dst, "w") as fh:
        json.dump(out, fh, separators=(",", ":"))
    print("wrote", os.path.relpath(dst, ROOT), len(out["file"]), "tensors")


def main():
    torch.manual_seed(0)
    single = os.path.join(FIX, "single")
    sd3_file("sd3-dummy", os.path.join(single, "sd3-dummy", "sd3_dummy.safetensors"), "model.diffusion_model.", True)
    sd3_file("sd35-tiny", os.path.join(single, "sd35-tiny", "sd35_tiny.safetensors"), "", False)
    flux_files("flux-dev-tiny", os.path.join(single, "flux-dev-tiny"), "flux1-dev-tiny.safetensors")
    flux_files("chroma-tiny", os.path.join(single, "chroma-tiny"), "chroma-tiny.safetensors")
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        check_flux_at_real_width(tmp)
        check_chroma_at_real_width(tmp)
        check_flux2_at_real_width(tmp)
    with open(os.path.join(single, "fixture.json"), "w") as fh:
        json.dump({"generator": "scripts/make_single_file_fixtures.py", "torch": torch.__version__,
                   "diffusers": diffusers.__version__, "seed": 0,
                   "twins": {"sd3-dummy": "sd3-dummy", "sd35-tiny": "sd35-tiny", "flux-dev-tiny": "flux-dev-tiny",
                             "chroma-tiny": "chroma-tiny"}},
                  fh, indent=1)
    mdir = os.path.join(FIX, "manifests")
    for f in sorted(os.listdir(mdir)):
        if f.endswith(".json") and not f.endswith((".single.json", ".transformer.json")):
            single_manifest(os.path.join(mdir, f))


if __name__ == "__main__":
    sys.exit(main())
