#!/usr/bin/env python3
"""The LoRA training run of diffusers' examples/dreambooth/train_dreambooth_lora.py, reduced to
what one process on a CPU does with its defaults (fp32, no accelerate, batch 1, no prior
preservation, text encoder frozen, rank 4 on the UNet's attention to_q/to_k/to_v/to_out.0, AdamW
1e-4, grad clipping 1.0): load the pipeline's parts from a diffusers directory, then per step encode
the photo with the VAE, the caption with the text encoder, and train the UNet; at the end write
pytorch_lora_weights.safetensors. The counterpart of

    sidbooth train --model DIR --images IMAGES --class dog --resolution 256 --steps N --output OUT

    python scripts/bench/train_lora_diffusers.py --model DIR --images IMAGES --resolution 256 \
        --steps N --output OUT [--threads T]
"""
import argparse
import os
import time

import torch
import torch.nn.functional as F
from PIL import Image
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from transformers import CLIPTextModel, CLIPTokenizer

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--images", required=True)
p.add_argument("--resolution", type=int, default=512)
p.add_argument("--steps", type=int, default=1)
p.add_argument("--rank", type=int, default=4)
p.add_argument("--prompt", default="a photo of sks dog")
p.add_argument("--output", required=True)
p.add_argument("--threads", type=int, default=os.cpu_count())
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)

tok = CLIPTokenizer.from_pretrained(a.model, subfolder="tokenizer")
te = CLIPTextModel.from_pretrained(a.model, subfolder="text_encoder")
vae = AutoencoderKL.from_pretrained(a.model, subfolder="vae")
unet = UNet2DConditionModel.from_pretrained(a.model, subfolder="unet")
sched = DDPMScheduler.from_pretrained(a.model, subfolder="scheduler")
for m in (te, vae, unet):
    m.requires_grad_(False)
unet.add_adapter(LoraConfig(r=a.rank, lora_alpha=a.rank, init_lora_weights="gaussian",
                            target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
params = [q for q in unet.parameters() if q.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)



def tf(img):
    """Resize (shorter side, bilinear), center crop, to [-1, 1]: the script's transforms."""
    w, h = img.size
    s = a.resolution / min(w, h)
    img = img.resize((max(a.resolution, round(w * s)), max(a.resolution, round(h * s))),
                     Image.BILINEAR)
    w, h = img.size
    left, top = (w - a.resolution) // 2, (h - a.resolution) // 2
    img = img.crop((left, top, left + a.resolution, top + a.resolution))
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    x = x.reshape(a.resolution, a.resolution, 3).permute(2, 0, 1).float() / 255.0
    return x * 2.0 - 1.0


files = sorted(f for f in os.listdir(a.images) if f.lower().endswith((".jpg", ".jpeg", ".png", ".webp")))
photos = [tf(Image.open(os.path.join(a.images, f)).convert("RGB")) for f in files]
ids = tok([a.prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
          return_tensors="pt").input_ids

unet.train()
started = time.perf_counter()
ends = []
for step in range(a.steps):
    pixels = photos[step % len(photos)].unsqueeze(0)
    latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
    noise = torch.randn_like(latents)
    t = torch.randint(0, sched.config.num_train_timesteps, (1,)).long()
    noisy = sched.add_noise(latents, noise, t)
    ctx = te(ids, return_dict=False)[0]
    pred = unet(noisy, t, ctx, return_dict=False)[0]
    loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad()
    ends.append(time.perf_counter() - started)
    print(f"step {step + 1}: loss {loss.item():.4f}", flush=True)

os.makedirs(a.output, exist_ok=True)
StableDiffusionPipeline.save_lora_weights(
    a.output, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
# The summary `sidbooth train` prints, for scripts/bench/train_sd21_cpu.sh.
total = time.perf_counter() - started
if len(ends) > 1:
    per = (ends[-1] - ends[0]) / (len(ends) - 1)
    print(f"{total:.1f} s: first step {ends[0]:.1f} s, then {per:.2f} s per step, "
          f"writing {total - ends[-1]:.1f} s", flush=True)
elif ends:
    print(f"{total:.1f} s: the step {ends[0]:.1f} s, writing {total - ends[0]:.1f} s", flush=True)
