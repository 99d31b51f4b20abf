"""diffusers' SD3 transformer under torch.profiler, op by op, for the side-by-side step profile in
docs/performance.md:  python scripts/torch_profile_sd3.py [bench-models/sd3-bench] (2 threads, f32,
batch 2 as classifier-free guidance runs it, 512x512, 77 CLIP + 256 T5 tokens)."""
import sys
import time

import torch
from diffusers import SD3Transformer2DModel

torch.set_num_threads(2)
torch.manual_seed(0)
path = (sys.argv[1] if len(sys.argv) > 1 else "bench-models/sd3-bench") + "/transformer"
m = SD3Transformer2DModel.from_pretrained(path, torch_dtype=torch.float32).eval()
cfg = m.config
x = torch.randn(2, cfg.in_channels, 64, 64)
c = torch.randn(2, 333, cfg.joint_attention_dim)
p = torch.randn(2, cfg.pooled_projection_dim)
t = torch.tensor([500.0, 500.0])
with torch.no_grad():
    for _ in range(2):
        m(hidden_states=x, encoder_hidden_states=c, pooled_projections=p, timestep=t)
    times = []
    for _ in range(5):
        s = time.perf_counter()
        m(hidden_states=x, encoder_hidden_states=c, pooled_projections=p, timestep=t)
        times.append(time.perf_counter() - s)
    print("forward s:", [round(v, 3) for v in times])
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(3):
            m(hidden_states=x, encoder_hidden_states=c, pooled_projections=p, timestep=t)
print("(three forwards; divide by 3 for one step)")
print(
    prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=30, max_shapes_column_width=70
    )
)
