#!/usr/bin/env python3
"""Loads a directory written by `cargo run -p sidbooth-engine --example tiny_dir -- DIR` in
diffusers and checks that a 5-step CFG DDIM run from the same initial latents gives our latents.

    python scripts/parity/check_tiny_dir.py DIR
"""
import sys

import torch
from safetensors.torch import load_file
from diffusers import DDIMScheduler, StableDiffusionPipeline

d = sys.argv[1]
pipe = StableDiffusionPipeline.from_pretrained(d, safety_checker=None, requires_safety_checker=False)
assert isinstance(pipe.scheduler, DDIMScheduler)
pipe.set_progress_bar_config(disable=True)
init = load_file(f"{d}/ours_init_latents.safetensors")["latents"]
ours = load_file(f"{d}/ours_final_latents.safetensors")["latents"]
with torch.no_grad():
    ref = pipe(prompt="a photo of sks dog", negative_prompt="blurry", num_inference_steps=5, guidance_scale=7.5,
               height=32, width=32, latents=init, output_type="latent").images
err = (ref - ours).abs().max().item()
mag = ref.abs().max().item()
print(f"diffusers vs ours on the Rust-written tiny dir: max abs err {err:.3e} (max |ref| {mag:.3f})")
assert err <= 1e-4 + 1e-4 * mag
