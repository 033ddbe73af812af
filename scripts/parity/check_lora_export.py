#!/usr/bin/env python3
"""Checks that a LoRA exported by the engine loads in diffusers' `load_lora_weights` and gives the
engine's outputs (text encoder hidden states and UNet output at t=500).

    cargo run --release -p sidbooth-engine --example train_lora_export -- --out target/lora-export
    python scripts/parity/check_lora_export.py [--model services/engine/fixtures/tiny-sd] [--dir target/lora-export]
"""
import argparse
import os

import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
p = argparse.ArgumentParser()
p.add_argument("--model", default=os.path.join(ROOT, "services/engine/fixtures/tiny-sd"))
p.add_argument("--dir", default=os.path.join(ROOT, "target/lora-export"))
a = p.parse_args()

lora = os.path.join(a.dir, "lora.safetensors")
with safe_open(lora, "pt") as f:
    meta = f.metadata()
print("metadata:", {k: v for k, v in meta.items() if k.startswith("sidbooth.")})
ref = load_file(os.path.join(a.dir, "reference.safetensors"))
pipe = StableDiffusionPipeline.from_pretrained(a.model, safety_checker=None, requires_safety_checker=False)
with torch.no_grad():
    y_base = pipe.unet(ref["latents"], torch.tensor([500.0]), ref["context"]).sample
pipe.load_lora_weights(lora)
with torch.no_grad():
    ctx = pipe.text_encoder(ref["input_ids"])[0]
    y = pipe.unet(ref["latents"], torch.tensor([500.0]), ref["context"]).sample


def rel(x, r):
    return ((x - r).abs().max() / r.abs().max()).item()


e_ctx, e_unet = rel(ctx, ref["context"]), rel(y, ref["unet_out"])
effect = rel(y_base, ref["unet_out"])
print(f"text encoder rel max err {e_ctx:.2e}; UNet rel max err {e_unet:.2e}; LoRA effect {effect:.2e}")
assert e_ctx < 1e-4 and e_unet < 1e-4, "diffusers disagrees with the engine"
assert effect > 1e-3, "the LoRA does not change the UNet output"
print("OK: diffusers load_lora_weights reproduces the engine")
