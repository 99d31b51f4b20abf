"""Step-cache fixtures (tests/cache.rs): diffusers' pipelines on the tiny SD3.5 and FLUX.1 [dev]
fixtures with each cache on, the calls each cache computed, and the images.

- fbcache: diffusers' FirstBlockCache (`apply_first_block_cache`), its decision wrapped to add our
  two rules: the first WARMUP calls and the last call always compute.
- taylorseer: diffusers' TaylorSeerCache in lite mode (the model's output predicted), with
  `disable_cache_before_step` = WARMUP, `disable_cache_after_step` = the last call and float32
  factors.
- teacache: diffusers has none; TeaCache4FLUX's algorithm (ali-vilab/TeaCache) is written here on
  diffusers' blocks: the first block's modulated input decides, every block is skipped together and
  their residual reused; the rescaling polynomial is TeaCache's FLUX.1 fit for FLUX.1, the identity
  for SD3.

SD3's pipeline sets no cache context, so its transformer call is wrapped in one; SD3's last block
returns no context, so for first-block cache it hands its input context back (nothing reads it).

    pip install -r scripts/requirements.txt
    python scripts/make_cache_fixtures.py
"""

import json
import os
import sys
from collections import defaultdict

import numpy as np
import torch
import diffusers
import transformers
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig, apply_first_block_cache, apply_taylorseer_cache
from diffusers.hooks.hooks import CacheContext, _set_cache_context
from diffusers.hooks.first_block_cache import FBCHeadBlockHook
from diffusers.hooks.taylorseer_cache import TaylorSeerCacheHook
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from make_sd3_fixtures import PROMPTS, ROOT, SEED  # noqa: E402

OUT = os.path.join(ROOT, "cache")
TEACACHE_FLUX = [4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01]

# What the current run records: per cache context, whether each call computed (every block).
LOG = defaultdict(list)
RUN = {}


def patch_fbcache():
    orig = FBCHeadBlockHook._should_compute_remaining_blocks

    def decide(self, residual):
        name = self.state_manager.context.name
        i = len(LOG[name])
        st = self.state_manager.get_state()
        if st.head_block_residual is not None:
            prev = st.head_block_residual
            rel = ((residual - prev).abs().mean() / prev.abs().mean()).item()
            # A decision this close to the threshold would not be reproducible across engines.
            assert abs(rel - self.threshold) > 2e-3, (rel, self.threshold)
        c = orig(self, residual) or i < RUN["warmup"] or i == RUN["calls"] - 1
        LOG[name].append(bool(c))
        return c

    FBCHeadBlockHook._should_compute_remaining_blocks = decide


def patch_taylorseer():
    orig = TaylorSeerCacheHook.new_forward

    def new_forward(self, module, *args, **kwargs):
        out = orig(self, module, *args, **kwargs)
        if module is RUN.get("proj_out"):
            st = self.state_manager.get_state()
            LOG[self.state_manager.context.name].append(bool(st.last_update_step == st.current_step))
        return out

    TaylorSeerCacheHook.new_forward = new_forward


class TeaCache:
    """TeaCache4FLUX's decision and residual reuse, on a diffusers transformer's blocks."""

    def __init__(self, model, threshold, warmup, calls, coefficients):
        self.model, self.threshold, self.warmup, self.calls = model, threshold, warmup, calls
        self.poly = np.poly1d(coefficients)
        self.state = {}
        self.blocks = list(model.transformer_blocks) + list(getattr(model, "single_transformer_blocks", []))
        self.saved = []
        for k, b in enumerate(self.blocks):
            self.saved.append(b.forward)
            b.forward = self.wrap(b.forward, k == 0, k == len(self.blocks) - 1)

    def remove(self):
        for b, f in zip(self.blocks, self.saved):
            b.forward = f

    def wrap(self, forward, first, last):
        def f(*args, **kw):
            name = RUN["context"]
            st = self.state.setdefault(name, dict(acc=0.0, prev=None, residual=None, n=0))
            hs, ehs = kw["hidden_states"], kw["encoder_hidden_states"]
            if first:
                i = st["n"]
                st["n"] += 1
                m = self.model.transformer_blocks[0].norm1(hs, emb=kw["temb"])[0]
                if i < self.warmup or i == self.calls - 1 or st["prev"] is None or st["residual"] is None:
                    compute = True
                else:
                    rel = ((m - st["prev"]).abs().mean() / st["prev"].abs().mean()).item()
                    st["acc"] += self.poly(rel)
                    assert abs(st["acc"] - self.threshold) > 2e-3, (st["acc"], self.threshold)
                    compute = st["acc"] >= self.threshold
                if compute:
                    st["acc"] = 0.0
                st["prev"] = m
                st["compute"] = compute
                st["img0"] = hs
                LOG[name].append(bool(compute))
            if not st["compute"]:
                out = st["img0"] + st["residual"] if last else hs
                return ehs, out
            enc, out = forward(*args, **kw)
            if last:
                st["residual"] = out - st["img0"]
            return enc, out

        return f


def with_context(pipe, name):
    """Sets a cache context around the transformer's calls (SD3's pipeline and model set none)."""
    fwd = pipe.transformer.forward

    def forward(*a, **k):
        RUN["context"] = name
        _set_cache_context(pipe.transformer, CacheContext(name))
        try:
            return fwd(*a, **k)
        finally:
            _set_cache_context(pipe.transformer, None)

    pipe.transformer.forward = forward


def sd3_last_block_keeps_context(pipe):
    last = pipe.transformer.transformer_blocks[-1]
    fwd = last.forward

    def forward(*a, **k):
        enc, out = fwd(*a, **k)
        return (k["encoder_hidden_states"] if enc is None else enc), out

    last.forward = forward


def parse(spec):
    name, *nums = spec.split(":")
    if name == "fbcache":
        return name, dict(threshold=float(nums[0]), warmup=int(nums[1]) if len(nums) > 1 else 1)
    if name == "teacache":
        return name, dict(threshold=float(nums[0]), warmup=int(nums[1]) if len(nums) > 1 else 1)
    return name, dict(order=int(nums[0]), interval=int(nums[1]), warmup=int(nums[2]) if len(nums) > 2 else 3)


def run(pipe, family, run_cfg, noise, max_seq):
    name, p = parse(run_cfg["cache"])
    calls = run_cfg["steps"]
    LOG.clear()
    RUN.clear()
    RUN.update(warmup=p["warmup"], calls=calls, proj_out=pipe.transformer.proj_out, context="cond")
    tea = None
    if name == "fbcache":
        apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=p["threshold"]))
    elif name == "taylorseer":
        apply_taylorseer_cache(pipe.transformer, TaylorSeerCacheConfig(
            cache_interval=p["interval"], disable_cache_before_step=p["warmup"],
            disable_cache_after_step=calls - 1, max_order=p["order"], taylor_factors_dtype=torch.float32,
            use_lite_mode=True,
        ))
    else:
        coeff = TEACACHE_FLUX if family == "flux" else [1.0, 0.0]
        tea = TeaCache(pipe.transformer, p["threshold"], p["warmup"], calls, coeff)
    kw = dict(prompt=run_cfg["prompt"], num_inference_steps=calls, guidance_scale=run_cfg["guidance"],
              height=run_cfg["height"], width=run_cfg["width"], max_sequence_length=max_seq, output_type="pil")
    if family == "flux":
        c = noise.shape[1]
        kw["latents"] = pipe._pack_latents(noise, 1, c, noise.shape[2], noise.shape[3])
        if "negative_prompt" in run_cfg:
            kw.update(negative_prompt=run_cfg["negative_prompt"], true_cfg_scale=run_cfg["true_cfg"])
    else:
        kw["latents"] = noise
        kw["negative_prompt"] = run_cfg.get("negative_prompt")
    # diffusers' Flux pipeline sets the cache context itself; TeaCache here reads RUN["context"].
    if family == "flux" and tea is not None:
        tfwd = pipe.transformer.forward
        count = [0]

        def forward(*a, **k):
            RUN["context"] = "cond" if count[0] % (2 if "negative_prompt" in run_cfg else 1) == 0 else "uncond"
            count[0] += 1
            return tfwd(*a, **k)

        pipe.transformer.forward = forward
    img = pipe(**kw).images[0]
    computed = {k: v for k, v in LOG.items()}
    return torch.from_numpy(np.array(img).copy()), computed


RUNS = [
    # (fixture, family, settings)
    ("sd35-tiny", "sd3", dict(prompt=PROMPTS[0], negative_prompt="blurry", steps=10, guidance=7.0, height=48, width=32)),
    ("flux-dev-tiny", "flux", dict(prompt=PROMPTS[0], steps=10, guidance=3.5, height=32, width=48)),
    ("flux-dev-tiny", "flux", dict(prompt=PROMPTS[0], negative_prompt="blurry", true_cfg=2.5, steps=8, guidance=5.0,
                                   height=32, width=32)),
]
# Thresholds where the tiny random models skip some calls and compute others (their residuals
# change by 0.2-0.6 between steps, far more than a trained model's).
CACHES = {
    "sd3": ["fbcache:0.3", "fbcache:0.35:2", "teacache:0.15", "taylorseer:1:2", "taylorseer:2:3:2"],
    "flux": ["fbcache:0.36", "fbcache:0.405:3", "teacache:0.3", "taylorseer:1:3", "taylorseer:2:2:3"],
}


def main():
    torch.set_grad_enabled(False)
    patch_fbcache()
    patch_taylorseer()
    os.makedirs(OUT, exist_ok=True)
    tensors = {}
    meta = {
        "generator": "scripts/make_cache_fixtures.py",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "seed": SEED,
        "runs": [],
    }
    g = torch.Generator().manual_seed(SEED + 11)
    k = 0
    for r_i, (fixture, family, cfg) in enumerate(RUNS):
        path = os.path.join(ROOT, fixture)
        cls = FluxPipeline if family == "flux" else StableDiffusion3Pipeline
        max_seq = json.load(open(os.path.join(path, "fixture.json")))["max_sequence_length"]
        noise = None
        for spec in CACHES[family] if "negative_prompt" not in cfg or family == "sd3" else CACHES[family][:3:2] + CACHES[family][3:4]:
            # A fresh pipeline per run: the hooks stay on the modules.
            pipe = cls.from_pretrained(path)
            pipe.set_progress_bar_config(disable=True)
            if family == "sd3":
                with_context(pipe, "cond_uncond")
                sd3_last_block_keeps_context(pipe)
            if noise is None:
                f = pipe.vae_scale_factor
                c = pipe.transformer.config.in_channels // (4 if family == "flux" else 1)
                noise = torch.randn((1, c, cfg["height"] // f, cfg["width"] // f), generator=g)
                tensors[f"noise.{r_i}"] = noise
            img, computed = run(pipe, family, dict(cfg, cache=spec), noise, max_seq)
            tensors[f"run.{k}.image"] = img
            branches = ["cond", "uncond"] if family == "flux" else ["cond_uncond"]
            meta["runs"].append(dict(cfg, model=fixture, cache=spec, noise=f"noise.{r_i}", max_sequence_length=max_seq,
                                     computed=[computed.get(b, []) for b in branches if b in computed]))
            print(fixture, spec, {b: "".join("C" if x else "-" for x in v) for b, v in computed.items()})
            k += 1
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "reference.safetensors"))
    with open(os.path.join(OUT, "fixture.json"), "w") as fh:
        json.dump(meta, fh, indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main()
