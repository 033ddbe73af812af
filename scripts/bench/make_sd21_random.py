#!/usr/bin/env python3
"""Writes a diffusers directory of Stable Diffusion 2.1-base-sized random weights (seed 0):
the configs of services/engine/fixtures/configs/sd21-base, the real CLIP tokenizer files, fp32
safetensors. For CPU benchmarks of whole commands (`sidbooth train --model DIR`) at the real
model's size without downloading it. About 5.2 GB.

    python scripts/bench/make_sd21_random.py OUT_DIR [--tokenizer DIR]
"""
import argparse
import json
import os
import shutil

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONFIG = os.path.join(ROOT, "services/engine/fixtures/configs/sd21-base")

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--tokenizer", default=os.path.join(ROOT, "..", "shared/reference/clip-tokenizer"))
a = p.parse_args()


def cfg(path):
    with open(os.path.join(CONFIG, path)) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


torch.manual_seed(0)
os.makedirs(a.out, exist_ok=True)
UNet2DConditionModel.from_config(cfg("unet/config.json")).save_pretrained(os.path.join(a.out, "unet"))
AutoencoderKL.from_config(cfg("vae/config.json")).save_pretrained(os.path.join(a.out, "vae"))
CLIPTextModel(CLIPTextConfig(**cfg("text_encoder/config.json"))).save_pretrained(
    os.path.join(a.out, "text_encoder"))
DDIMScheduler.from_config(cfg("scheduler/scheduler_config.json")).save_pretrained(
    os.path.join(a.out, "scheduler"))
tok = os.path.join(a.out, "tokenizer")
os.makedirs(tok, exist_ok=True)
for f in ("vocab.json", "merges.txt"):
    shutil.copy(os.path.join(a.tokenizer, f), tok)
shutil.copy(os.path.join(CONFIG, "tokenizer/tokenizer_config.json"), tok)
index = json.load(open(os.path.join(CONFIG, "model_index.json")))
for k in ("feature_extractor", "safety_checker"):
    index.pop(k, None)
index["scheduler"] = ["diffusers", "DDIMScheduler"]
with open(os.path.join(a.out, "model_index.json"), "w") as f:
    json.dump(index, f, indent=2)
print(f"wrote {a.out}")
