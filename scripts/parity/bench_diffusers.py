#!/usr/bin/env python3
"""Times one 50-step CFG sample of the tiny fixture model in diffusers (torch CPU).

    python scripts/parity/bench_diffusers.py [--threads N] [--steps 50] [--images 1]

Compare with `RAYON_NUM_THREADS=N cargo run --release -p sidbooth-engine --example bench --
--model services/engine/fixtures/tiny-sd` (same model, size, steps, guidance).
"""
import argparse
import os
import time

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
p = argparse.ArgumentParser()
p.add_argument("--threads", type=int, default=os.cpu_count())
p.add_argument("--steps", type=int, default=50)
p.add_argument("--images", type=int, default=1)
p.add_argument("--model", default=os.path.join(ROOT, "services/engine/fixtures/tiny-sd"))
a = p.parse_args()
torch.set_num_threads(a.threads)
pipe = StableDiffusionPipeline.from_pretrained(a.model, safety_checker=None, requires_safety_checker=False)
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
kw = dict(prompt="a photo of sks dog", guidance_scale=7.5, num_images_per_prompt=a.images,
          generator=torch.Generator().manual_seed(0))
with torch.inference_mode():
    pipe(num_inference_steps=2, **kw)
    t0 = time.perf_counter()
    out = pipe(num_inference_steps=a.steps, **kw)
    secs = time.perf_counter() - t0
print(f"diffusers: {secs:.3f} s for {a.steps} steps, cfg 7.5, {a.images} image(s) of {out.images[0].size} (threads: {a.threads})")
