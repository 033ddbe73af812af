#!/usr/bin/env python3
"""Times LoRA training steps of the tiny fixture model in diffusers + peft (torch CPU): the step of
diffusers' train_dreambooth_lora.py (UNet attention to_q/to_k/to_v/to_out.0, rank 4, gaussian init,
batch 1, 32x32, AdamW, grad clipping 1.0, cached latents).

    python scripts/parity/bench_train_diffusers.py [--threads N] [--steps 20] [--rank 4]

Compare with `RAYON_NUM_THREADS=N cargo run --release -p sidbooth-engine --example bench_train --
--model tiny --steps 20 --rank 4` (same architecture, resolution, rank, optimizer).
"""
import argparse
import os
import time

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig
from transformers import CLIPTextModel, CLIPTokenizer

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
p = argparse.ArgumentParser()
p.add_argument("--threads", type=int, default=os.cpu_count())
p.add_argument("--steps", type=int, default=20)
p.add_argument("--rank", type=int, default=4)
p.add_argument("--resolution", type=int, default=32)
p.add_argument("--model", default=os.path.join(ROOT, "services/engine/fixtures/tiny-sd"))
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)

unet = UNet2DConditionModel.from_pretrained(a.model, subfolder="unet")
te = CLIPTextModel.from_pretrained(a.model, subfolder="text_encoder")
tok = CLIPTokenizer.from_pretrained(a.model, subfolder="tokenizer")
sched = DDPMScheduler.from_pretrained(a.model, subfolder="scheduler")
unet.requires_grad_(False)
te.requires_grad_(False)
unet.add_adapter(LoraConfig(r=a.rank, lora_alpha=a.rank, init_lora_weights="gaussian",
                            target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
params = [p for p in unet.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
ids = tok(["a photo of sks dog"], padding="max_length", max_length=tok.model_max_length,
          truncation=True, return_tensors="pt").input_ids
with torch.no_grad():
    ctx = te(ids)[0]
vae_factor = 2  # tiny VAE: two blocks, one downsample
h = a.resolution // vae_factor
mean = torch.randn(1, 4, h, h)
std = torch.full((1, 4, h, h), 0.1)


def step():
    x0 = (mean + std * torch.randn_like(mean)) * 0.18215
    noise = torch.randn_like(x0)
    t = torch.randint(0, sched.config.num_train_timesteps, (1,))
    noisy = sched.add_noise(x0, noise, t)
    pred = unet(noisy, t, ctx).sample
    loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad()
    return loss.item()


unet.train()
step(); step()
t0 = time.perf_counter()
for _ in range(a.steps):
    last = step()
ms = (time.perf_counter() - t0) * 1000 / a.steps
fwd = bwd = 0.0
for _ in range(a.steps):
    x0 = (mean + std * torch.randn_like(mean)) * 0.18215
    noise = torch.randn_like(x0)
    t = torch.randint(0, sched.config.num_train_timesteps, (1,))
    t1 = time.perf_counter()
    loss = F.mse_loss(unet(sched.add_noise(x0, noise, t), t, ctx).sample, noise)
    t2 = time.perf_counter()
    loss.backward()
    t3 = time.perf_counter()
    opt.zero_grad()
    fwd += t2 - t1
    bwd += t3 - t2
print(f"diffusers: forward {fwd * 1000 / a.steps:.2f} ms, backward {bwd * 1000 / a.steps:.2f} ms "
      f"(backward/forward {bwd / fwd:.2f})")
n = sum(p.numel() for p in params)
print(f"diffusers: {ms:.2f} ms per LoRA training step (tiny, {a.resolution}x{a.resolution}, rank {a.rank}, "
      f"{n} trainable, last loss {last:.4f}, threads {a.threads})")
