#!/usr/bin/env python3
"""Loads a DreamBooth output written by the engine with diffusers, samples from it, and writes the
reference of services/engine/tests/train_dreambooth.rs.

Run by a developer (not by CI), offline, in a venv with torch, diffusers, transformers, safetensors:

    cargo nextest run -p sidbooth-engine --test train_dreambooth exported_pipeline_samples_as_in_diffusers
    python scripts/parity/check_dreambooth_export.py [--dir target/tmp/dreambooth-export]

The test writes the export (the tiny-sd fixture with every UNet and text-encoder weight moved by a
seeded 5% perturbation, the same on every machine) before it reads this script's output, so the
first run fails until this script has written it.

Checks and writes:
- `StableDiffusionPipeline.from_pretrained(dir)` loads the pipeline directory; 4 DDIM steps
  (guidance 7.5) from fixed latents with it and with the base model ->
  services/engine/fixtures/dreambooth/export_reference.safetensors;
- `StableDiffusionPipeline.from_single_file(dir/sd_checkpoint.safetensors, config=dir)` loads the
  single file into exactly the pipeline's weights and samples the same;
- diffusers' single-file converters (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
  `convert_open_clip_checkpoint` / `convert_ldm_clip_checkpoint`) read every key of the single
  file, and produce exactly the pipeline's tensors: which pipeline tensors each key becomes, in
  order, goes to services/engine/fixtures/dreambooth/single_file_keys.json.
"""
import argparse
import json
import os

import torch
from safetensors.torch import load_file, save_file

from diffusers import StableDiffusionPipeline
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIX = os.path.join(ROOT, "services", "engine", "fixtures")
OUT = os.path.join(FIX, "dreambooth")
SINGLE_FILE = "sd_checkpoint.safetensors"
SAMPLE = dict(prompt="a photo of sks dog", num_inference_steps=4, guidance_scale=7.5, height=32, width=32)
# Marked tensors: key i holds i * BASE + (0, 1, 2, ...), exact in float64.
BASE = 2**24


def text_model_name(name):
    return name if name.startswith("text_model.") else "text_model." + name


def components(pipe):
    return {
        "unet": pipe.unet.state_dict(),
        "vae": pipe.vae.state_dict(),
        "text_encoder": {text_model_name(k): v for k, v in pipe.text_encoder.state_dict().items()},
    }


def sample(pipe, init):
    with torch.no_grad():
        return pipe(latents=init.clone(), output_type="latent", **SAMPLE).images


def rel(x, r):
    return ((x - r).abs().max() / r.abs().max()).item()


def key_map(single, pipe):
    """Every single-file key -> the pipeline tensors diffusers' converters make of it, in order."""
    keys = sorted(single)
    marked = {}
    for i, k in enumerate(keys):
        n = single[k].numel()
        assert n < BASE
        marked[k] = (torch.arange(n, dtype=torch.float64) + i * BASE).reshape(single[k].shape)
    converted = {
        "unet": convert_ldm_unet_checkpoint(marked, pipe.unet.config),
        "vae": convert_ldm_vae_checkpoint(marked, pipe.vae.config),
    }
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        te = convert_open_clip_checkpoint(pipe.text_encoder, marked, prefix="cond_stage_model.model.")
    else:
        te = convert_ldm_clip_checkpoint(marked)
    converted["text_encoder"] = {text_model_name(k): v for k, v in te.items()}
    for name, sd in components(pipe).items():
        assert set(converted[name]) == set(sd), f"{name}: converted keys differ from the pipeline's"
    parts = {k: [] for k in keys}
    for comp, sd in converted.items():
        for name, t in sd.items():
            v = t.flatten()
            i, start = divmod(int(v[0].item()), BASE)
            expected = torch.arange(start, start + v.numel(), dtype=torch.float64) + i * BASE
            assert torch.equal(v, expected), f"{comp}/{name} is not one contiguous run of {keys[i]}"
            parts[keys[i]].append((start, v.numel(), f"{comp}/{name}"))
    out = {}
    for k in keys:
        runs = sorted(parts[k])
        offset = 0
        for start, n, _ in runs:
            assert start == offset, f"{k}: not read whole by the converters"
            offset += n
        assert offset == single[k].numel(), f"{k}: not read whole by the converters"
        out[k] = {"shape": list(single[k].shape), "parts": [p for _, _, p in runs]}
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dir", default=os.path.join(ROOT, "target", "tmp", "dreambooth-export"))
    p.add_argument("--model", default=os.path.join(FIX, "tiny-sd"))
    a = p.parse_args()

    pipe = StableDiffusionPipeline.from_pretrained(a.dir, local_files_only=True)
    base = StableDiffusionPipeline.from_pretrained(a.model, local_files_only=True)
    g = torch.Generator().manual_seed(11)
    init = torch.randn((1, 4, 16, 16), generator=g)
    trained = sample(pipe, init)
    base_latents = sample(base, init)
    effect = rel(base_latents, trained)
    print(f"from_pretrained: the trained weights change the 4-step latents by {effect:.2e} (relative)")
    assert effect > 1e-2, "the exported weights do not change the samples"

    single_path = os.path.join(a.dir, SINGLE_FILE)
    single = StableDiffusionPipeline.from_single_file(single_path, config=a.dir, local_files_only=True)
    ours, theirs = components(single), components(pipe)
    for name in ours:
        assert ours[name].keys() == theirs[name].keys(), name
        for k, v in ours[name].items():
            assert torch.equal(v, theirs[name][k]), f"from_single_file {name}/{k} differs"
    e = rel(sample(single, init), trained)
    print(f"from_single_file: the same weights as from_pretrained; latents rel err {e:.2e}")
    assert e < 1e-6

    keys = key_map(load_file(single_path), pipe)
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "single_file_keys.json"), "w") as f:
        json.dump(keys, f, indent=0, sort_keys=True)
        f.write("\n")
    save_file(
        {"init_latents": init, "trained_latents": trained.contiguous(), "base_latents": base_latents.contiguous()},
        os.path.join(OUT, "export_reference.safetensors"),
        metadata={"sample": json.dumps(SAMPLE), "torch": torch.__version__},
    )
    print(f"OK: {len(keys)} single-file keys; fixtures written to {OUT}")


if __name__ == "__main__":
    main()
