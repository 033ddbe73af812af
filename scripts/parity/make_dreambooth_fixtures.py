#!/usr/bin/env python3
"""One training step of diffusers' examples/dreambooth/train_dreambooth.py (full fine-tuning of
the UNet and the text encoder, prior preservation) on the tiny model, the reference of
services/engine/tests/train_dreambooth.rs.

Run by a developer (not by CI), in a venv with torch, diffusers, transformers, safetensors:

    python scripts/parity/make_dreambooth_fixtures.py

The batch is fixed: two latents (one instance example, then one class example, as the script's
collate_fn orders them), their noise, timesteps and captions. The step is the script's loop body
(`--train_text_encoder --with_prior_preservation --prior_loss_weight 1`, no SNR weighting, no
text-encoder attention mask) followed by `clip_grad_norm_(unet + text encoder, 1.0)` and one
`torch.optim.AdamW` step (betas 0.9/0.999, eps 1e-8, weight decay 1e-2; lr 1e-3 instead of the
script's 5e-6, so that one step moves the weights by far more than the comparison's tolerance).

Writes services/engine/fixtures/dreambooth/train_step.safetensors: the batch, the losses, the
global gradient norm, and for every trained tensor (named `unet.<diffusers name>` /
`text_encoder.text_model.<transformers name>`) its gradient norm and, at SAMPLES positions spread
over it, its gradient and its value after the step (the whole model would be 2 MB).
"""
import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIX = os.path.join(ROOT, "services", "engine", "fixtures")
MODEL = os.path.join(FIX, "tiny-sd")
OUT = os.path.join(FIX, "dreambooth")

LR = 1e-3
PRIOR_LOSS_WEIGHT = 1.0
MAX_GRAD_NORM = 1.0
SAMPLES = 24
CAPTIONS = ["a photo of sks dog on a red sofa", "a photo of dog"]
TIMESTEPS = [417, 88]


def sample_positions(n):
    """Flat indices k * n // SAMPLES (all of them for small tensors); the Rust test uses the same."""
    k = min(n, SAMPLES)
    return torch.tensor([i * n // k for i in range(k)], dtype=torch.int64)


def text_model_name(name):
    # transformers 5 names CLIPTextModel's parameters without the `text_model.` of earlier versions
    return name if name.startswith("text_model.") else "text_model." + name


def main():
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tokenizer = CLIPTokenizer.from_pretrained(MODEL, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(MODEL, subfolder="text_encoder")
    unet = UNet2DConditionModel.from_pretrained(MODEL, subfolder="unet")
    noise_scheduler = DDPMScheduler.from_pretrained(MODEL, subfolder="scheduler")
    unet.train()
    text_encoder.train()

    g = torch.Generator().manual_seed(7)
    model_input = torch.randn((2, 4, 8, 8), generator=g)
    noise = torch.randn((2, 4, 8, 8), generator=g)
    timesteps = torch.tensor(TIMESTEPS, dtype=torch.int64)
    input_ids = tokenizer(
        CAPTIONS, truncation=True, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids

    # train_dreambooth.py's loop body
    noisy_model_input = noise_scheduler.add_noise(model_input, noise, timesteps)
    encoder_hidden_states = text_encoder(input_ids)[0]
    model_pred = unet(noisy_model_input, timesteps, encoder_hidden_states).sample
    target = noise
    model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
    target, target_prior = torch.chunk(target, 2, dim=0)
    prior_loss = F.mse_loss(model_pred_prior.float(), target_prior.float(), reduction="mean")
    instance_loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    loss = instance_loss + PRIOR_LOSS_WEIGHT * prior_loss
    loss.backward()

    named = [("unet." + n, p) for n, p in unet.named_parameters()]
    named += [("text_encoder." + text_model_name(n), p) for n, p in text_encoder.named_parameters()]
    ref = {
        "x0": model_input,
        "noise": noise,
        "timesteps": timesteps,
        "loss": loss.detach().double().reshape(1),
        "instance_loss": instance_loss.detach().double().reshape(1),
        "prior_loss": prior_loss.detach().double().reshape(1),
    }
    for name, p in named:
        idx = sample_positions(p.numel())
        ref["grad_norm." + name] = p.grad.double().norm().reshape(1)
        ref["grad." + name] = p.grad.flatten()[idx].clone()
    params = [p for _, p in named]
    ref["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM).double().reshape(1)
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    optimizer.step()
    with torch.no_grad():
        for name, p in named:
            ref["after." + name] = p.flatten()[sample_positions(p.numel())].clone()

    os.makedirs(OUT, exist_ok=True)
    meta = {
        "captions": json.dumps(CAPTIONS),
        "lr": str(LR),
        "prior_loss_weight": str(PRIOR_LOSS_WEIGHT),
        "samples": str(SAMPLES),
        "torch": torch.__version__,
    }
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(OUT, "train_step.safetensors"), metadata=meta)
    print(
        f"loss {loss.item():.6f} (instance {instance_loss.item():.6f}, prior {prior_loss.item():.6f}), "
        f"grad norm {ref['grad_norm'].item():.4f}, {len(named)} tensors"
    )


if __name__ == "__main__":
    main()
