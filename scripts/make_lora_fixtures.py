"""LoRA files in every format mmdit reads, written in each format's real key layout for the tiny random
SD3.5 and FLUX.1-dev pipelines of tests/fixtures/, and the images diffusers makes with them loaded
through its own `load_lora_weights` (which converts kohya, XLabs and ComfyUI/BFL keys) and weighted
with `set_adapters`; for tests/lora.rs.

    pip install -r scripts/requirements.txt
    python scripts/make_sd3_fixtures.py && python scripts/make_flux_fixtures.py   # the models
    python scripts/make_lora_fixtures.py

Writes tests/fixtures/lora/: the LoRA files (`*.safetensors`), `reference.safetensors` (each run's
noise and image, and the image of the same run without LoRA) and `fixture.json` (script, versions,
seed, and every run's LoRAs and weights).

Where diffusers 0.42.1 cannot load a format on these tiny models, the file is still written in that
format and the reference comes from an equivalent file diffusers does load; fixture.json says so:
- kohya/ComfyUI FLUX.1 `single_blocks.N.linear1`: diffusers' converter hard-codes FLUX.1's real widths
  (3072 x 3 + 12288 rows), so those modules are loaded as the equivalent PEFT LoRA on to_q/to_k/to_v/
  proj_mlp (the down factor shared, the up factor's rows split), as a second adapter of equal weight.
- kohya SD3 (`lora_unet_joint_blocks_*`, as sd-scripts' lora_sd3 writes it): diffusers has no
  converter, so the reference loads the script's own PEFT conversion (fused qkv split in three, the
  last block's context modulation halves swapped, alpha / rank folded into the up factor).
"""

import json
import os
import sys

import numpy as np
import torch
import diffusers
import transformers
import peft
from diffusers import ChromaPipeline, Flux2KleinPipeline, FluxPipeline, StableDiffusion3Pipeline
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from make_sd3_fixtures import ROOT  # noqa: E402

OUT = os.path.join(ROOT, "lora")
SEED = 7


class Gen:
    """Random LoRA factors of a size that visibly changes the tiny models' images."""

    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)

    def pair(self, out_dim, in_dim, rank, strength=2.0):
        down = torch.randn(rank, in_dim, generator=self.g) / in_dim ** 0.5
        up = torch.randn(out_dim, rank, generator=self.g) * strength / rank ** 0.5
        return down, up


def hf4(name):
    """A CLIP module's name as transformers 4 (which kohya's files were made with) names it:
    under `text_model.` (transformers 5 drops that level)."""
    return name if name.startswith("text_model.") else "text_model." + name


def shape(module):
    return module.weight.shape  # (out, in)


# ---------------------------------------------------------------------------------------------
# FLUX.1 files


def flux_targets(t):
    """(diffusers name, original BFL name or None, rows in the fused original) of every linear layer
    a FLUX.1 LoRA usually touches."""
    return [n for n, m in t.named_modules() if isinstance(m, torch.nn.Linear)]


def flux_peft(t, te, gen, path):
    """diffusers' own save: PEFT names under `transformer.` / `text_encoder.`, LoraConfig metadata with
    lora_alpha != r, a rank pattern and an alpha pattern."""
    sd, names = {}, []
    for n, m in t.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        if any(s in n for s in ["attn.to_q", "attn.to_v", "attn.add_k_proj", "ff.net.2", "proj_mlp",
                                "single_transformer_blocks.1.proj_out", "norm1.linear", "x_embedder",
                                "norm_out.linear", "guidance_embedder.linear_1"]):
            r = 2 if n.endswith("proj_mlp") else 4
            d, u = gen.pair(*shape(m), r)
            sd[f"{n}.lora_A.weight"], sd[f"{n}.lora_B.weight"] = d, u
            names.append(n)
    te_sd = {}
    for n, m in te.named_modules():
        if isinstance(m, torch.nn.Linear) and ("layers.0.self_attn.q_proj" in n or "layers.1.mlp.fc1" in n):
            d, u = gen.pair(*shape(m), 4)
            te_sd[f"{n}.lora_A.weight"], te_sd[f"{n}.lora_B.weight"] = d, u
    tcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=names,
                           rank_pattern={n: 2 for n in names if n.endswith("proj_mlp")},
                           alpha_pattern={"transformer_blocks.1.attn.to_q": 2.0}).to_dict()
    tecfg = peft.LoraConfig(r=4, lora_alpha=4, target_modules=sorted({k.rsplit(".lora_", 1)[0] for k in te_sd})).to_dict()
    FluxPipeline.save_lora_weights(os.path.dirname(path), transformer_lora_layers=sd, text_encoder_lora_layers=te_sd,
                                   transformer_lora_adapter_metadata=tcfg, text_encoder_lora_adapter_metadata=tecfg,
                                   weight_name=os.path.basename(path))
    return {}


def bfl_modules(t):
    """(BFL name, (out, in)) of the FLUX.1 layers, from the diffusers model's shapes."""
    cfg = t.config
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    mods = []
    for i in range(cfg.num_layers):
        b = t.transformer_blocks[i]
        mods += [(f"double_blocks.{i}.img_attn.qkv", (3 * dim, dim)),
                 (f"double_blocks.{i}.img_attn.proj", (dim, dim)),
                 (f"double_blocks.{i}.txt_attn.qkv", (3 * dim, dim)),
                 (f"double_blocks.{i}.txt_attn.proj", (dim, dim)),
                 (f"double_blocks.{i}.img_mlp.0", shape(b.ff.net[0].proj)),
                 (f"double_blocks.{i}.img_mlp.2", shape(b.ff.net[2])),
                 (f"double_blocks.{i}.txt_mlp.0", shape(b.ff_context.net[0].proj)),
                 (f"double_blocks.{i}.txt_mlp.2", shape(b.ff_context.net[2])),
                 (f"double_blocks.{i}.img_mod.lin", shape(b.norm1.linear)),
                 (f"double_blocks.{i}.txt_mod.lin", shape(b.norm1_context.linear))]
    for i in range(cfg.num_single_layers):
        b = t.single_transformer_blocks[i]
        mlp = b.proj_mlp.weight.shape[0]
        mods += [(f"single_blocks.{i}.linear1", (3 * dim + mlp, dim)),
                 (f"single_blocks.{i}.linear2", shape(b.proj_out)),
                 (f"single_blocks.{i}.modulation.lin", shape(b.norm.linear))]
    tt = t.time_text_embed
    mods += [("img_in", shape(t.x_embedder)), ("txt_in", shape(t.context_embedder)),
             ("time_in.in_layer", shape(tt.timestep_embedder.linear_1)),
             ("time_in.out_layer", shape(tt.timestep_embedder.linear_2)),
             ("vector_in.in_layer", shape(tt.text_embedder.linear_1)),
             ("guidance_in.out_layer", shape(tt.guidance_embedder.linear_2)),
             ("final_layer.linear", shape(t.proj_out)),
             ("final_layer.adaLN_modulation.1", shape(t.norm_out.linear))]
    return mods, dim


TOP = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear",
}


def as_peft(name, d, u, s, dim):
    """The PEFT equivalent of one BFL-named module diffusers' converter cannot take at this size or
    drops (single blocks' linear1, the top-level layers): down shared, up rows split, scale folded."""
    sd = {}
    if name.endswith("linear1"):
        i = int(name.split(".")[1])
        mlp = u.shape[0] - 3 * dim
        parts = [(f"single_transformer_blocks.{i}.attn.to_q", 0, dim), (f"single_transformer_blocks.{i}.attn.to_k", dim, dim),
                 (f"single_transformer_blocks.{i}.attn.to_v", 2 * dim, dim), (f"single_transformer_blocks.{i}.proj_mlp", 3 * dim, mlp)]
    else:
        if name == "final_layer.adaLN_modulation.1":
            h = u.shape[0] // 2
            u = torch.cat([u[h:], u[:h]])
        parts = [(TOP[name], 0, u.shape[0])]
    for p, start, n in parts:
        sd[f"transformer.{p}.lora_A.weight"] = d
        sd[f"transformer.{p}.lora_B.weight"] = (u[start:start + n] * s).contiguous()
    return sd


def split_for_diffusers(sd, prefix, dim, te_prefix=None):
    """(what diffusers 0.42.1 loads from the file as it is, the PEFT equivalent of the rest): its FLUX.1
    converter takes the double blocks and the single blocks' linear2 / modulation, but asserts
    FLUX.1's real widths for linear1, and drops the top-level layers and the kohya CLIP-L modules
    silently (the latter after re-initialising CLIP's weights)."""
    loadable, side = {}, {}
    modules = sorted({k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in sd})
    for m in modules:
        keys = {k: v for k, v in sd.items() if k.startswith(m + ".")}
        down = next(v for k, v in keys.items() if k.endswith(("lora_down.weight", "lora_A.weight")))
        up = next(v for k, v in keys.items() if k.endswith(("lora_up.weight", "lora_B.weight")))
        alpha = next((v for k, v in keys.items() if k.endswith(".alpha")), None)
        s = alpha.item() / down.shape[0] if alpha is not None else 1.0
        if te_prefix and m.startswith(te_prefix):
            n = "text_encoder." + m[len(te_prefix):].replace("_", ".").replace("text.model.", "") \
                .replace("self.attn", "self_attn").replace("q.proj", "q_proj").replace("k.proj", "k_proj") \
                .replace("v.proj", "v_proj").replace("out.proj", "out_proj")
            side[f"{n}.lora_A.weight"], side[f"{n}.lora_B.weight"] = down, (up * s).contiguous()
            continue
        bfl = m[len(prefix):]
        if prefix == "lora_unet_":
            bfl = BFL_OF_KOHYA[bfl]
        if bfl.endswith("linear1") or bfl in TOP:
            side.update(as_peft(bfl, down, up, s, dim))
        else:
            loadable.update(keys)
    return loadable, side


BFL_OF_KOHYA = {}


def flux_kohya(t, gen, path, te=None):
    """sd-scripts' FLUX.1 layout: `lora_unet_<BFL name with _>` lora_down/lora_up/alpha (alpha on some
    modules only), and `lora_te1_` CLIP-L modules."""
    mods, dim = bfl_modules(t)
    sd = {}
    for k, (name, (o, i)) in enumerate(mods):
        r = 4 if k % 3 else 8
        d, u = gen.pair(o, i, r)
        key = "lora_unet_" + name.replace(".", "_")
        BFL_OF_KOHYA[name.replace(".", "_")] = name
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = d, u
        if k % 2 == 0:
            sd[f"{key}.alpha"] = torch.tensor(float(r) / 2)
    if te is not None:
        for n, m in te.named_modules():
            if isinstance(m, torch.nn.Linear) and ("layers.0.self_attn.v_proj" in n or "layers.2.mlp.fc2" in n):
                d, u = gen.pair(*shape(m), 4)
                key = "lora_te1_" + hf4(n).replace(".", "_")
                sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = d, u
                sd[f"{key}.alpha"] = torch.tensor(2.0)
    save_file(sd, path)
    return split_for_diffusers(sd, "lora_unet_", dim, te_prefix="lora_te1_")


def flux_comfy(t, gen, path, path_ab):
    """ComfyUI's layout of BFL names: `diffusion_model.<name>.lora_down/lora_up/alpha`; the same factors
    as `lora_A`/`lora_B` in a second file (as other trainers write BFL names)."""
    mods, dim = bfl_modules(t)
    sd, ab = {}, {}
    for k, (name, (o, i)) in enumerate(mods):
        if k % 2:
            continue
        d, u = gen.pair(o, i, 4)
        key = "diffusion_model." + name
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = d, u
        sd[f"{key}.alpha"] = torch.tensor(8.0)
        ab[f"{key}.lora_A.weight"], ab[f"{key}.lora_B.weight"], ab[f"{key}.alpha"] = d, u, torch.tensor(8.0)
    save_file(sd, path)
    save_file(ab, path_ab)
    return split_for_diffusers(sd, "diffusion_model.", dim)


def flux_xlabs(t, gen, path):
    """XLabs' layout: `double_blocks.N.processor.{qkv,proj}_lora{1,2}.{down,up}.weight`,
    `single_blocks.N.processor.{qkv,proj}_lora.*`; no alpha."""
    cfg = t.config
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    sd = {}
    for i in range(cfg.num_layers):
        for p, (o, n) in [("qkv_lora1", (3 * dim, dim)), ("proj_lora1", (dim, dim)),
                          ("qkv_lora2", (3 * dim, dim)), ("proj_lora2", (dim, dim))]:
            d, u = gen.pair(o, n, 4)
            sd[f"double_blocks.{i}.processor.{p}.down.weight"], sd[f"double_blocks.{i}.processor.{p}.up.weight"] = d, u
    for i in range(cfg.num_single_layers):
        for p, (o, n) in [("qkv_lora", (3 * dim, dim)), ("proj_lora", shape(t.single_transformer_blocks[i].proj_out))]:
            d, u = gen.pair(o, n, 4)
            sd[f"single_blocks.{i}.processor.{p}.down.weight"], sd[f"single_blocks.{i}.processor.{p}.up.weight"] = d, u
    save_file(sd, path)
    return {}


def flux_kohya_diffusers(t, te, gen, path):
    """kohya's diffusers-names flavour (diffusers' "mixture"): `lora_transformer_<diffusers name with _>`
    and `lora_te1_` lora_down/lora_up, alpha on every module. diffusers takes the transformer part
    from the file; its `lora_te1_` part comes out under transformers 4's `text_model.` names, which
    transformers 5's CLIP lacks, so that part is loaded as the equivalent PEFT modules."""
    sd, side = {}, {}
    for n, m in t.named_modules():
        if isinstance(m, torch.nn.Linear) and ".attn." in n and not n.endswith("norm"):
            d, u = gen.pair(*shape(m), 4, strength=4.0)
            key = "lora_transformer_" + n.replace(".", "_")
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = d, u
            sd[f"{key}.alpha"] = torch.tensor(2.0)
    for n, m in te.named_modules():
        if isinstance(m, torch.nn.Linear) and "layers.3.self_attn.k_proj" in n:
            d, u = gen.pair(*shape(m), 4)
            key = "lora_te1_" + hf4(n).replace(".", "_")
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = d, u
            sd[f"{key}.alpha"] = torch.tensor(8.0)
            side[f"text_encoder.{n}.lora_A.weight"], side[f"text_encoder.{n}.lora_B.weight"] = d, u * 2.0
    save_file(sd, path)
    return {k: v for k, v in sd.items() if not k.startswith("lora_te1_")}, side


def flux_aitoolkit(t, gen, path):
    """AI-toolkit's layout: PEFT names under `transformer.`, no alpha, no metadata (scale 1)."""
    sd = {}
    for n, m in t.named_modules():
        if isinstance(m, torch.nn.Linear) and n.startswith("single_transformer_blocks") and ("attn.to_k" in n or "proj_out" in n):
            d, u = gen.pair(*shape(m), 8)
            sd[f"transformer.{n}.lora_A.weight"], sd[f"transformer.{n}.lora_B.weight"] = d, u
    save_file(sd, path, metadata={"format": "pt", "software": "ai-toolkit"})
    return {}


# ---------------------------------------------------------------------------------------------
# SD3 files


def sd3_peft(t, te, te2, gen, path):
    sd, names = {}, []
    for n, m in t.named_modules():
        if isinstance(m, torch.nn.Linear) and any(s in n for s in ["attn.to_k", "attn.add_q_proj", "attn2.to_v",
                                                                  "ff_context.net.0.proj", "norm1_context.linear",
                                                                  "attn.to_add_out", "proj_out", "context_embedder"]):
            d, u = gen.pair(*shape(m), 4)
            sd[f"{n}.lora_A.weight"], sd[f"{n}.lora_B.weight"] = d, u
            names.append(n)
    te_sd, te2_sd = {}, {}
    for model, out in [(te, te_sd), (te2, te2_sd)]:
        for n, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and ("layers.0.self_attn.k_proj" in n or "layers.1.mlp.fc2" in n):
                d, u = gen.pair(*shape(m), 4)
                out[f"{n}.lora_A.weight"], out[f"{n}.lora_B.weight"] = d, u
    tcfg = peft.LoraConfig(r=4, lora_alpha=2, target_modules=names).to_dict()
    # (diffusers needs every component's config once one has it.)
    tecfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=sorted({k.rsplit(".lora_", 1)[0] for k in te_sd})).to_dict()
    StableDiffusion3Pipeline.save_lora_weights(os.path.dirname(path), transformer_lora_layers=sd,
                                               text_encoder_lora_layers=te_sd, text_encoder_2_lora_layers=te2_sd,
                                               transformer_lora_adapter_metadata=tcfg,
                                               text_encoder_lora_adapter_metadata=tecfg,
                                               text_encoder_2_lora_adapter_metadata=tecfg,
                                               weight_name=os.path.basename(path))
    return {}


def sd3_kohya(t, te, gen, path):
    """sd-scripts' SD3 layout (networks/lora_sd3.py): `lora_unet_<SAI name with _>`, alpha; `lora_te1_`
    CLIP-L. Returns the equivalent PEFT state dict for diffusers, which has no converter."""
    cfg = t.config
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    last = cfg.num_layers - 1
    sd, conv = {}, {}

    def add(sai, diffusers_parts, o, i, r, alpha, swap=False):
        d, u = gen.pair(o, i, r)
        key = "lora_unet_" + sai.replace(".", "_")
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"], sd[f"{key}.alpha"] = d, u, torch.tensor(alpha)
        s = alpha / r
        if swap:
            h = u.shape[0] // 2
            u = torch.cat([u[h:], u[:h]])
        start = 0
        for name, rows in diffusers_parts:
            conv[f"transformer.{name}.lora_A.weight"] = d
            conv[f"transformer.{name}.lora_B.weight"] = (u[start:start + rows] * s).contiguous()
            start += rows

    for i in range(cfg.num_layers):
        b = t.transformer_blocks[i]
        j = f"joint_blocks.{i}"
        add(f"{j}.x_block.attn.qkv", [(f"transformer_blocks.{i}.attn.to_{x}", dim) for x in "qkv"], 3 * dim, dim, 4, 2.0)
        add(f"{j}.x_block.attn.proj", [(f"transformer_blocks.{i}.attn.to_out.0", dim)], dim, dim, 4, 4.0)
        add(f"{j}.x_block.mlp.fc1", [(f"transformer_blocks.{i}.ff.net.0.proj", shape(b.ff.net[0].proj)[0])],
            *shape(b.ff.net[0].proj), 8, 4.0)
        add(f"{j}.x_block.adaLN_modulation.1", [(f"transformer_blocks.{i}.norm1.linear", shape(b.norm1.linear)[0])],
            *shape(b.norm1.linear), 4, 4.0)
        add(f"{j}.context_block.attn.qkv", [(f"transformer_blocks.{i}.attn.add_{x}_proj", dim) for x in "qkv"],
            3 * dim, dim, 4, 4.0)
        add(f"{j}.context_block.adaLN_modulation.1",
            [(f"transformer_blocks.{i}.norm1_context.linear", shape(b.norm1_context.linear)[0])],
            *shape(b.norm1_context.linear), 4, 4.0, swap=(i == last))
        if b.attn2 is not None:
            add(f"{j}.x_block.attn2.qkv", [(f"transformer_blocks.{i}.attn2.to_{x}", dim) for x in "qkv"],
                3 * dim, dim, 4, 4.0)
    add("final_layer.linear", [("proj_out", shape(t.proj_out)[0])], *shape(t.proj_out), 4, 4.0)
    add("final_layer.adaLN_modulation.1", [("norm_out.linear", shape(t.norm_out.linear)[0])],
        *shape(t.norm_out.linear), 4, 4.0, swap=True)
    add("context_embedder", [("context_embedder", shape(t.context_embedder)[0])], *shape(t.context_embedder), 4, 4.0)
    for n, m in te.named_modules():
        if isinstance(m, torch.nn.Linear) and "layers.1.self_attn.out_proj" in n:
            d, u = gen.pair(*shape(m), 4)
            key = "lora_te1_" + hf4(n).replace(".", "_")
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"], sd[f"{key}.alpha"] = d, u, torch.tensor(4.0)
            conv[f"text_encoder.{n}.lora_A.weight"], conv[f"text_encoder.{n}.lora_B.weight"] = d, u
    save_file(sd, path)
    return conv


# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Chroma files: FLUX.1's names without the modulation layers, plus the approximator


def chroma_modules(t):
    """(original name, diffusers parts [(name, first row, rows)], (out, in)) of Chroma's linear layers."""
    cfg = t.config
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    mods = []
    for i in range(cfg.num_layers):
        b, p = t.transformer_blocks[i], f"transformer_blocks.{i}."
        qkv = lambda names: [(p + n, k * dim, dim) for k, n in enumerate(names)]  # noqa: E731
        mods += [(f"double_blocks.{i}.img_attn.qkv", qkv(["attn.to_q", "attn.to_k", "attn.to_v"]), (3 * dim, dim)),
                 (f"double_blocks.{i}.txt_attn.qkv", qkv(["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]),
                  (3 * dim, dim)),
                 (f"double_blocks.{i}.img_attn.proj", [(p + "attn.to_out.0", 0, dim)], (dim, dim)),
                 (f"double_blocks.{i}.txt_mlp.0", [(p + "ff_context.net.0.proj", 0, shape(b.ff_context.net[0].proj)[0])],
                  shape(b.ff_context.net[0].proj))]
    for i in range(cfg.num_single_layers):
        b, p = t.single_transformer_blocks[i], f"single_transformer_blocks.{i}."
        mlp = b.proj_mlp.weight.shape[0]
        mods += [(f"single_blocks.{i}.linear1", [(p + "attn.to_q", 0, dim), (p + "attn.to_k", dim, dim),
                                                  (p + "attn.to_v", 2 * dim, dim), (p + "proj_mlp", 3 * dim, mlp)],
                  (3 * dim + mlp, dim)),
                 (f"single_blocks.{i}.linear2", [(p + "proj_out", 0, dim)], shape(b.proj_out))]
    dg = t.distilled_guidance_layer
    for i, layer in enumerate(dg.layers):
        mods += [(f"distilled_guidance_layer.layers.{i}.in_layer",
                  [(f"distilled_guidance_layer.layers.{i}.linear_1", 0, shape(layer.linear_1)[0])], shape(layer.linear_1))]
    mods += [("distilled_guidance_layer.out_proj", [("distilled_guidance_layer.out_proj", 0, dim)], shape(dg.out_proj)),
             ("img_in", [("x_embedder", 0, dim)], shape(t.x_embedder)),
             ("final_layer.linear", [("proj_out", 0, shape(t.proj_out)[0])], shape(t.proj_out))]
    return mods


def chroma_comfy(t, gen, path):
    """ComfyUI's layout of Chroma's names (`diffusion_model.<name>.lora_down/lora_up/alpha`); diffusers
    loads the PEFT equivalent (down shared, up rows split, alpha / rank folded into up)."""
    sd, peft_sd = {}, {}
    for name, parts, (o, i) in chroma_modules(t):
        r = 4
        d, u = gen.pair(o, i, r)
        key = "diffusion_model." + name
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = d, u
        sd[f"{key}.alpha"] = torch.tensor(2.0)
        for n, start, rows in parts:
            peft_sd[f"transformer.{n}.lora_A.weight"] = d
            peft_sd[f"transformer.{n}.lora_B.weight"] = (u[start:start + rows] * (2.0 / r)).contiguous()
    save_file(sd, path)
    return peft_sd


def chroma_peft(t, gen, path):
    """diffusers' names under `transformer.` (lora_A / lora_B, no alpha), the approximator included."""
    sd = {}
    for n, m in t.named_modules():
        if isinstance(m, torch.nn.Linear) and any(s in n for s in ["attn.to_k", "attn.add_v_proj", "ff.net.0.proj",
                                                                    "proj_out", "distilled_guidance_layer.in_proj",
                                                                    "context_embedder"]):
            d, u = gen.pair(*shape(m), 4)
            sd[f"transformer.{n}.lora_A.weight"], sd[f"transformer.{n}.lora_B.weight"] = d, u
    save_file(sd, path)


# ---------------------------------------------------------------------------------------------
# FLUX.2 files


def flux2_modules(t):
    """(BFL name, diffusers parts [(name, first row, rows)], (out, in)) of FLUX.2 layers a LoRA touches."""
    cfg = t.config
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    mods = []
    for i in range(cfg.num_layers):
        b, p = t.transformer_blocks[i], f"transformer_blocks.{i}."
        mods += [(f"double_blocks.{i}.img_attn.qkv", [(p + n, k * dim, dim) for k, n in
                                                     enumerate(["attn.to_q", "attn.to_k", "attn.to_v"])], (3 * dim, dim)),
                 (f"double_blocks.{i}.txt_attn.proj", [(p + "attn.to_add_out", 0, dim)], (dim, dim)),
                 (f"double_blocks.{i}.img_mlp.0", [(p + "ff.linear_in", 0, shape(b.ff.linear_in)[0])],
                  shape(b.ff.linear_in))]
    for i in range(cfg.num_single_layers):
        b = t.single_transformer_blocks[i]
        p = f"single_transformer_blocks.{i}."
        mods += [(f"single_blocks.{i}.linear1", [(p + "attn.to_qkv_mlp_proj", 0, shape(b.attn.to_qkv_mlp_proj)[0])],
                  shape(b.attn.to_qkv_mlp_proj)),
                 (f"single_blocks.{i}.linear2", [(p + "attn.to_out", 0, dim)], shape(b.attn.to_out))]
    mods += [("double_stream_modulation_img.lin", [("double_stream_modulation_img.linear", 0, 6 * dim)],
              shape(t.double_stream_modulation_img.linear)),
             ("txt_in", [("context_embedder", 0, dim)], shape(t.context_embedder))]
    return mods


def flux2_comfy(t, gen, path):
    """ComfyUI's layout of BFL's FLUX.2 names; diffusers loads the PEFT equivalent."""
    sd, peft_sd = {}, {}
    for name, parts, (o, i) in flux2_modules(t):
        d, u = gen.pair(o, i, 4)
        key = "diffusion_model." + name
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = d, u
        sd[f"{key}.alpha"] = torch.tensor(4.0)
        for n, start, rows in parts:
            peft_sd[f"transformer.{n}.lora_A.weight"] = d
            peft_sd[f"transformer.{n}.lora_B.weight"] = u[start:start + rows].contiguous()
    save_file(sd, path)
    return peft_sd


def flux2_peft(t, gen, path):
    """diffusers' names under `transformer.` (lora_A / lora_B): SwiGLU, fused single-block and shared
    modulation layers included."""
    sd = {}
    for n, m in t.named_modules():
        if isinstance(m, torch.nn.Linear) and any(s in n for s in ["attn.to_v", "add_k_proj", "ff_context.linear_out",
                                                                    "to_qkv_mlp_proj", "single_stream_modulation",
                                                                    "x_embedder"]):
            d, u = gen.pair(*shape(m), 4)
            sd[f"transformer.{n}.lora_A.weight"], sd[f"transformer.{n}.lora_B.weight"] = d, u
    save_file(sd, path)


# ---------------------------------------------------------------------------------------------
# DoRA (PEFT's `use_dora`, as diffusers' training scripts' --use_dora save it)


def dora_modules(model, keep, gen, rank, alpha, prefix=""):
    """LoRA factors and a DoRA magnitude (`lora_magnitude_vector`) for the Linear layers of `model`
    whose names contain one of `keep`: the magnitude is each row's norm of `W + alpha / rank * up @ down`
    (PEFT's initial value) times a random factor, as training moves it."""
    sd, names = {}, []
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and any(s in n for s in keep):
            d, u = gen.pair(*shape(m), rank)
            norm = torch.linalg.norm(m.weight.detach() + alpha / rank * (u @ d), dim=1)
            factor = torch.exp(0.4 * torch.randn(norm.shape, generator=gen.g))
            sd[f"{prefix}{n}.lora_A.weight"], sd[f"{prefix}{n}.lora_B.weight"] = d, u
            sd[f"{prefix}{n}.lora_magnitude_vector"] = norm * factor
            names.append(n)
    return sd, names


def flux_dora(t, gen, path):
    """A DoRA LoRA of FLUX.1's transformer in diffusers' names, with its LoraConfig. (No text-encoder
    part: diffusers 0.42.1 with transformers 5 does not load a CLIP's `lora_magnitude_vector` (it
    expects `.weight` after the adapter name) and runs it as a plain LoRA; mmdit applies it.)"""
    sd, names = dora_modules(t, ["attn.to_q", "attn.to_k", "attn.to_add_out", "ff.net.0.proj", "proj_mlp",
                                 "single_transformer_blocks.0.proj_out", "norm1_context.linear"], gen, 4, 8.0)
    tcfg = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=names).to_dict()
    FluxPipeline.save_lora_weights(os.path.dirname(path), transformer_lora_layers=sd,
                                   transformer_lora_adapter_metadata=tcfg, weight_name=os.path.basename(path))


def sd3_dora(t, gen, path):
    """A DoRA LoRA of SD3.5's transformer in diffusers' names, with its LoraConfig (no text-encoder
    part, as flux_dora)."""
    sd, names = dora_modules(t, ["attn.to_v", "attn.add_k_proj", "ff.net.2", "norm1.linear", "proj_out"], gen, 4, 2.0)
    tcfg = peft.LoraConfig(r=4, lora_alpha=2, use_dora=True, target_modules=names).to_dict()
    StableDiffusion3Pipeline.save_lora_weights(os.path.dirname(path), transformer_lora_layers=sd,
                                               transformer_lora_adapter_metadata=tcfg,
                                               weight_name=os.path.basename(path))


RUNS = [
    # (model, [(file, weight)], steps, width, height, guidance, prompt)
    ("flux-dev-tiny", [("flux_peft.safetensors", 1.0)], 3, 32, 32, 3.5, "a red circle on a white background"),
    ("flux-dev-tiny", [("flux_kohya.safetensors", 1.0)], 3, 40, 24, 3.5, "a blue square"),
    ("flux-dev-tiny", [("flux_comfy.safetensors", 0.8)], 3, 32, 32, 3.5, "a red circle on a white background"),
    ("flux-dev-tiny", [("flux_xlabs.safetensors", 1.0)], 3, 32, 32, 3.5, "a green circle"),
    ("flux-dev-tiny", [("flux_aitoolkit.safetensors", 1.2)], 3, 32, 32, 3.5, "a green circle"),
    ("flux-dev-tiny", [("flux_kohya_diffusers.safetensors", 1.0)], 3, 24, 40, 3.5, "a blue square"),
    ("flux-dev-tiny", [("flux_peft.safetensors", 0.7), ("flux_kohya.safetensors", -0.3)], 3, 32, 32, 3.5,
     "a red circle on a white background"),
    ("sd35-tiny", [("sd3_peft.safetensors", 1.0)], 3, 32, 32, 5.0, "a red circle on a white background"),
    ("sd35-tiny", [("sd3_kohya.safetensors", 0.9)], 3, 48, 32, 5.0, "a blue square"),
    ("sd35-tiny", [("sd3_peft.safetensors", 0.7), ("sd3_kohya.safetensors", -0.3)], 3, 32, 32, 5.0, "a green circle"),
    ("chroma-tiny", [("chroma_peft.safetensors", 1.0)], 3, 40, 24, 4.0, "a red circle on a white background"),
    ("chroma-tiny", [("chroma_comfy.safetensors", 0.8)], 3, 32, 32, 4.0, "a blue square"),
    ("flux2-klein-tiny", [("flux2_peft.safetensors", 1.0)], 3, 32, 48, 4.0, "a red circle on a white background"),
    ("flux2-klein-tiny", [("flux2_comfy.safetensors", 0.9)], 3, 32, 32, 4.0, "a blue square"),
    # DoRA: alone, after a plain LoRA on the same layers (PEFT rescales the rows of the weight with the
    # LoRA's term), and on SD3.5.
    ("flux-dev-tiny", [("flux_dora.safetensors", 1.0)], 3, 32, 32, 3.5, "a red circle on a white background"),
    ("flux-dev-tiny", [("flux_peft.safetensors", 0.6), ("flux_dora.safetensors", 0.8)], 3, 32, 40, 3.5,
     "a blue square"),
    ("sd35-tiny", [("sd3_dora.safetensors", 0.9)], 3, 32, 32, 5.0, "a red circle on a white background"),
]

NOTES = {
    "flux_kohya.safetensors": "diffusers loads the double blocks and single linear2/modulation from the file; single_blocks.*.linear1 (its converter asserts FLUX.1's real widths), the top-level layers and lora_te1_ (which it drops) as the equivalent PEFT LoRA, a second adapter of equal weight",
    "flux_comfy.safetensors": "as flux_kohya: linear1 and the top-level layers as the equivalent PEFT LoRA",
    "flux_kohya_diffusers.safetensors": "diffusers loads the lora_transformer_ part from the file; the lora_te1_ part (named for transformers 4's text_model. level, which transformers 5's CLIP lacks) as the equivalent PEFT modules",
    "sd3_kohya.safetensors": "diffusers has no kohya SD3 converter: the reference loads the script's PEFT conversion of it",
    "chroma_comfy.safetensors": "diffusers' converters assume FLUX.1's widths and layers: the reference loads the script's PEFT conversion of it",
    "chroma-tiny": "Chroma runs pass the T5 attention mask as booleans (see scripts/make_chroma_fixtures.py)",
    "flux2_comfy.safetensors": "the reference loads the script's PEFT conversion of it (down shared, up rows split, alpha / rank folded)",
    "flux_dora.safetensors": "PEFT DoRA (lora_magnitude_vector), transformer only: diffusers 0.42.1 with transformers 5 does not load a text encoder's magnitudes",
    "sd3_dora.safetensors": "as flux_dora.safetensors",
}


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(SEED)
    pipes = {
        "flux-dev-tiny": FluxPipeline.from_pretrained(os.path.join(ROOT, "flux-dev-tiny")),
        "sd35-tiny": StableDiffusion3Pipeline.from_pretrained(os.path.join(ROOT, "sd35-tiny")),
    }
    fp, sp = pipes["flux-dev-tiny"], pipes["sd35-tiny"]
    gen = Gen(SEED)
    f = lambda n: os.path.join(OUT, n)  # noqa: E731
    # What diffusers loads for each file: (the file or a converted state dict, a side adapter).
    loads = {}
    flux_peft(fp.transformer, fp.text_encoder, gen, f("flux_peft.safetensors"))
    loads["flux_peft.safetensors"] = (f("flux_peft.safetensors"), None)
    main_sd, side = flux_kohya(fp.transformer, gen, f("flux_kohya.safetensors"), te=fp.text_encoder)
    loads["flux_kohya.safetensors"] = (main_sd, side)
    main_sd, side = flux_comfy(fp.transformer, gen, f("flux_comfy.safetensors"), f("flux_comfy_ab.safetensors"))
    loads["flux_comfy.safetensors"] = (main_sd, side)
    flux_xlabs(fp.transformer, gen, f("flux_xlabs.safetensors"))
    loads["flux_xlabs.safetensors"] = (f("flux_xlabs.safetensors"), None)
    flux_aitoolkit(fp.transformer, gen, f("flux_aitoolkit.safetensors"))
    loads["flux_aitoolkit.safetensors"] = (f("flux_aitoolkit.safetensors"), None)
    loads["flux_kohya_diffusers.safetensors"] = flux_kohya_diffusers(
        fp.transformer, fp.text_encoder, gen, f("flux_kohya_diffusers.safetensors"))
    sd3_peft(sp.transformer, sp.text_encoder, sp.text_encoder_2, gen, f("sd3_peft.safetensors"))
    loads["sd3_peft.safetensors"] = (f("sd3_peft.safetensors"), None)
    conv = sd3_kohya(sp.transformer, sp.text_encoder, gen, f("sd3_kohya.safetensors"))
    loads["sd3_kohya.safetensors"] = (conv, None)
    cp = ChromaPipeline.from_pretrained(os.path.join(ROOT, "chroma-tiny"))
    chroma_peft(cp.transformer, gen, f("chroma_peft.safetensors"))
    loads["chroma_peft.safetensors"] = (f("chroma_peft.safetensors"), None)
    loads["chroma_comfy.safetensors"] = (chroma_comfy(cp.transformer, gen, f("chroma_comfy.safetensors")), None)
    kp = Flux2KleinPipeline.from_pretrained(os.path.join(ROOT, "flux2-klein-tiny"))
    flux2_peft(kp.transformer, gen, f("flux2_peft.safetensors"))
    loads["flux2_peft.safetensors"] = (f("flux2_peft.safetensors"), None)
    loads["flux2_comfy.safetensors"] = (flux2_comfy(kp.transformer, gen, f("flux2_comfy.safetensors")), None)
    # (Their own generator, so that the files above stay as they were.)
    dgen = Gen(SEED + 1000)
    flux_dora(fp.transformer, dgen, f("flux_dora.safetensors"))
    loads["flux_dora.safetensors"] = (f("flux_dora.safetensors"), None)
    sd3_dora(sp.transformer, dgen, f("sd3_dora.safetensors"))
    loads["sd3_dora.safetensors"] = (f("sd3_dora.safetensors"), None)

    meta = {
        "generator": "scripts/make_lora_fixtures.py",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "seed": SEED,
        "notes": NOTES,
        "runs": [],
    }
    tensors = {}
    for k, (model, loras, steps, w, h, guidance, prompt) in enumerate(RUNS):
        # A fresh pipeline per run: nothing a LoRA load did to the last one carries over.
        cls = {"flux": FluxPipeline, "sd35": StableDiffusion3Pipeline, "chroma": ChromaPipeline,
               "flux2": Flux2KleinPipeline}[model.split("-")[0]]
        pipe = cls.from_pretrained(os.path.join(ROOT, model))
        names, weights = [], []
        for j, (file, weight) in enumerate(loras):
            src, side = loads[file]
            name = f"a{j}"
            pipe.load_lora_weights(dict(src) if isinstance(src, dict) else src, adapter_name=name)
            names.append(name)
            weights.append(weight)
            if side:
                pipe.load_lora_weights(dict(side), adapter_name=f"{name}_side")
                names.append(f"{name}_side")
                weights.append(weight)
        pipe.set_adapters(names, adapter_weights=weights)
        c = pipe.transformer.config.in_channels
        c = c // 4 if model.startswith(("flux-", "chroma")) else c
        vsf = pipe.vae_scale_factor * (2 if model.startswith("flux2") else 1)
        noise = randn_tensor((1, c, h // vsf, w // vsf), generator=torch.Generator().manual_seed(SEED + k),
                             dtype=torch.float32)
        kwargs = dict(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance, width=w, height=h,
                      max_sequence_length=16, output_type="pil")
        if model.startswith("chroma"):
            # The mask as booleans (scripts/make_chroma_fixtures.py).
            pe, pm = pipe._get_t5_prompt_embeds(prompt=prompt, max_sequence_length=16, device="cpu")
            ne, nm = pipe._get_t5_prompt_embeds(prompt="", max_sequence_length=16, device="cpu")
            del kwargs["prompt"]
            kwargs.update(prompt_embeds=pe, prompt_attention_mask=pm.bool(), negative_prompt_embeds=ne,
                          negative_prompt_attention_mask=nm.bool())
        gen_k = lambda: torch.Generator().manual_seed(SEED + k)  # noqa: E731
        img = pipe(**kwargs, generator=gen_k()).images[0]
        pipe = cls.from_pretrained(os.path.join(ROOT, model))
        base = pipe(**kwargs, generator=gen_k()).images[0]
        tensors[f"run.{k}.noise"] = noise
        tensors[f"run.{k}.image"] = torch.from_numpy(np.array(img).copy())
        tensors[f"run.{k}.base"] = torch.from_numpy(np.array(base).copy())
        effect = int(np.abs(np.array(img).astype(int) - np.array(base).astype(int)).max())
        meta["runs"].append(dict(model=model, loras=[dict(file=f_, weight=wt) for f_, wt in loras], steps=steps,
                                 width=w, height=h, guidance=guidance, prompt=prompt, max_sequence_length=16,
                                 effect=effect))
        print(f"run {k} ({model}, {[l[0] for l in loras]}): the LoRA moves pixels by up to {effect}/255")
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "reference.safetensors"))
    with open(os.path.join(OUT, "fixture.json"), "w") as fh:
        json.dump(meta, fh, indent=1)


if __name__ == "__main__":
    main()
