"""Times diffusers on a model folder the way `mmdit bench` times mmdit, and writes the same JSON, so
`mmdit bench --compare diffusers.json` prints the ratio per phase.

    python scripts/bench_diffusers.py --model bench-models/sd3-bench --steps 4 --width 512 --height 512 \
        --dtype f32 --threads 2 --repeat 2 --out diffusers.json

On a GPU (`--device cuda`) each mark waits for the GPU first (torch.cuda.synchronize), as mmdit does.

Phases: text encoding (`encode_prompt`), each transformer step (timestamps from `callback_on_step_end`,
which fires after the scheduler step), VAE decode. Noise comes from torch's generator; speed does not
depend on it.
"""

import argparse
import json
import statistics
import subprocess
import time

import torch
from diffusers import DiffusionPipeline


def stat(v):
    return {"median": statistics.median(v), "min": min(v), "max": max(v)} if v else None


def status_bytes(field):
    """A size field of /proc/self/status (in kB) in bytes: VmHWM the peak, VmRSS now."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None


def peak_rss():
    return status_bytes("VmHWM")


def weight_bytes(pipe):
    """Bytes of every parameter and buffer of the pipeline's modules, at the dtype they are held in."""
    return sum(t.numel() * t.element_size()
               for m in pipe.components.values() if isinstance(m, torch.nn.Module)
               for t in list(m.parameters()) + list(m.buffers()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", default="4")
    ap.add_argument("--prompt", default="a red circle on a white background")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--max-sequence-length", type=int, default=None)
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]
    t0 = time.perf_counter()
    pipe = DiffusionPipeline.from_pretrained(a.model, torch_dtype=dtype).to(a.device)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    sync()
    load_s = time.perf_counter() - t0
    is_flux2 = type(pipe).__name__.startswith("Flux2")
    is_flux = type(pipe).__name__.startswith("Flux") and not is_flux2
    kw = {}
    if a.max_sequence_length:
        kw["max_sequence_length"] = a.max_sequence_length
    if a.guidance is not None:
        kw["guidance_scale"] = a.guidance

    def encode():
        if is_flux2:
            # FLUX.2 [klein]: Qwen3's embeddings (the bench models are step-distilled: no negative).
            pe, _ = pipe.encode_prompt(a.prompt, **({"max_sequence_length": a.max_sequence_length}
                                                   if a.max_sequence_length else {}))
            return {"prompt_embeds": pe}
        if is_flux:
            pe, ppe, _ = pipe.encode_prompt(a.prompt, None, **({"max_sequence_length": a.max_sequence_length} if a.max_sequence_length else {}))
            return {"prompt_embeds": pe, "pooled_prompt_embeds": ppe}
        cfg = (a.guidance if a.guidance is not None else 7.0) > 1
        pe, npe, ppe, nppe = pipe.encode_prompt(a.prompt, None, None, do_classifier_free_guidance=cfg,
                                                **({"max_sequence_length": a.max_sequence_length} if a.max_sequence_length else {}))
        out = {"prompt_embeds": pe, "pooled_prompt_embeds": ppe}
        if cfg:
            out.update(negative_prompt_embeds=npe, negative_pooled_prompt_embeds=nppe)
        return out

    def run(steps):
        marks = []
        t0 = time.perf_counter()
        emb = encode()
        sync()
        text = time.perf_counter() - t0

        def cb(p, i, t, kwargs):
            sync()
            marks.append(time.perf_counter())
            return kwargs

        start = time.perf_counter()
        lat = pipe(num_inference_steps=steps, width=a.width, height=a.height, output_type="latent",
                   callback_on_step_end=cb, generator=torch.Generator(a.device).manual_seed(0), **emb, **kw).images
        step_times = [b - a_ for a_, b in zip([start] + marks[:-1], marks)]
        t0 = time.perf_counter()
        if is_flux:
            lat = pipe._unpack_latents(lat, a.height, a.width, pipe.vae_scale_factor)
        if not is_flux2:
            # FLUX.2's "latent" output is already the VAE's (statistics undone, patches unfolded).
            lat = lat / pipe.vae.config.scaling_factor + (pipe.vae.config.shift_factor or 0.0)
        pipe.vae.decode(lat.to(pipe.vae.dtype), return_dict=False)
        sync()
        decode = time.perf_counter() - t0
        return text, step_times, decode

    with torch.no_grad():
        t0 = time.perf_counter()
        run(1)  # warm-up (timed apart: memory-mapped weights are read here)
        first_run_s = time.perf_counter() - t0
        held_bytes = status_bytes("VmRSS")  # between runs: no activations
        rows = []
        for steps in [int(s) for s in a.steps.split(",")]:
            texts, steps_t, denoise, decodes = [], [], [], []
            for _ in range(a.repeat):
                text, st, dec = run(steps)
                texts.append(text)
                steps_t += st
                denoise.append(sum(st))
                decodes.append(dec)
            s = stat(steps_t)
            rows.append({"sampler": "euler", "steps": steps, "nfe": steps, "text_s": stat(texts), "step_s": s,
                         "denoise_s": stat(denoise), "decode_s": stat(decodes),
                         "steps_per_s": 1.0 / s["median"], "psnr_db": None, "latent_rmse": None})
    res = {
        "engine": f"diffusers-{__import__('diffusers').__version__}+torch-{torch.__version__}",
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "device": a.device, "dtype": a.dtype, "threads": torch.get_num_threads(), "model": a.model,
        "width": a.width, "height": a.height, "reference_steps": 0, "repeat": a.repeat, "load_s": load_s,
        "first_run_s": first_run_s,
        "peak_rss_bytes": peak_rss(), "weight_bytes": weight_bytes(pipe), "held_bytes": held_bytes, "rows": rows,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if a.device == "cuda" else None,
    }
    with open(a.out, "w") as fh:
        json.dump(res, fh, indent=1)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
