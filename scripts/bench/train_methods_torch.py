#!/usr/bin/env python3
"""Times one training step of each method on the tiny fixture model in the PyTorch reference
stack (torch CPU): the step of diffusers' training scripts at 32x32, batch 1, one instance photo,
no prior preservation, AdamW, gradient clipping 1.0, latents encoded once.

    python scripts/bench/train_methods_torch.py [--method NAME|all] [--steps 20] [--threads N]

Prints `method <name> torch_ms_per_step <x>`, the counterpart of the engine's
`bench_methods` example (scripts/bench/train_methods.sh runs both). Per method:
  lora               peft adapters rank 4 on the UNet's to_q/to_k/to_v/to_out.0
                     (train_dreambooth_lora.py); the frozen text encoder runs under no_grad
  dreambooth         every UNet and text-encoder weight (train_dreambooth.py --train_text_encoder)
  textual_inversion  the token embedding matrix, other rows restored after the step
                     (textual_inversion.py)
  custom_diffusion   attn2.to_k / attn2.to_v and the token embedding matrix, other rows' gradients
                     zeroed (train_custom_diffusion.py; its processors' extra linears are the same
                     compute as training the projections in place)
  svdiff             svdiff-pytorch's layers on every UNet weight (train_svdiff.py; needs
                     `pip install einops && pip install --no-deps svdiff-pytorch==0.2.0`)
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MODEL = os.path.join(ROOT, "services", "engine", "fixtures", "tiny-sd")
METHODS = ["lora", "dreambooth", "textual_inversion", "custom_diffusion", "svdiff"]


def load():
    unet = UNet2DConditionModel.from_pretrained(MODEL, subfolder="unet")
    te = CLIPTextModel.from_pretrained(MODEL, subfolder="text_encoder")
    tok = CLIPTokenizer.from_pretrained(MODEL, subfolder="tokenizer")
    vae = AutoencoderKL.from_pretrained(MODEL, subfolder="vae")
    sched = DDPMScheduler.from_pretrained(MODEL, subfolder="scheduler")
    unet.requires_grad_(False)
    te.requires_grad_(False)
    vae.requires_grad_(False)
    return unet, te, tok, vae, sched


def new_token(te, tok):
    """Adds `<sks>` initialised from `dog`; returns its id."""
    tok.add_tokens(["<sks>"])
    te.resize_token_embeddings(len(tok), mean_resizing=False)
    ids = tok.convert_tokens_to_ids(["<sks>", "dog"])
    emb = te.get_input_embeddings().weight
    with torch.no_grad():
        emb[ids[0]] = emb[ids[1]]
    return ids[0]


def setup(method, unet, te, tok):
    """The trainable parameters, the optimizer, the caption, whether the text encoder needs a
    graph, and what runs after the optimizer step."""
    caption = "a photo of sks dog"
    after = lambda: None  # noqa: E731
    te_grad = False
    if method == "lora":
        from peft import LoraConfig
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        params = [p for p in unet.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
    elif method == "dreambooth":
        unet.requires_grad_(True)
        te.requires_grad_(True)
        te_grad = True
        params = list(unet.parameters()) + list(te.parameters())
        opt = torch.optim.AdamW(params, lr=2e-6)
    elif method in ("textual_inversion", "custom_diffusion"):
        token = new_token(te, tok)
        caption = "a photo of <sks> dog"
        emb = te.get_input_embeddings().weight
        emb.requires_grad_(True)
        te_grad = True
        params = [emb]
        keep = emb.detach().clone()
        others = torch.arange(len(tok)) != token
        if method == "textual_inversion":
            def after():
                with torch.no_grad():
                    emb[others] = keep[others]
            opt = torch.optim.AdamW(params, lr=2e-3)
        else:
            for name, m in unet.named_modules():
                if name.endswith("attn2.to_k") or name.endswith("attn2.to_v"):
                    m.weight.requires_grad_(True)
                    params.append(m.weight)

            def zero_other_rows():
                emb.grad[others] = 0
            opt = torch.optim.AdamW(params, lr=1e-5)
            return params, opt, caption, te_grad, after, zero_other_rows
    elif method == "svdiff":
        sys.path.insert(0, os.path.join(ROOT, "scripts", "parity"))
        threads = torch.get_num_threads()
        from make_svdiff_fixtures import to_svdiff  # noqa: E402  (it sets the thread count)
        torch.set_num_threads(threads)
        shifts = to_svdiff(unet, embeddings=False)
        one_d = [p for n, p in shifts.items() if "norm" in n]
        ids_1d = {id(p) for p in one_d}
        params = list(shifts.values())
        opt = torch.optim.AdamW(
            [{"params": [p for p in params if id(p) not in ids_1d]},
             {"params": one_d, "lr": 1e-6}], lr=1e-3)
    else:
        raise SystemExit(f"unknown method {method}")
    return params, opt, caption, te_grad, after, lambda: None


def bench(method, steps):
    torch.manual_seed(0)
    unet, te, tok, vae, sched = load()
    params, opt, caption, te_grad, after, before_step = setup(method, unet, te, tok)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    ids = tok([caption], padding="max_length", max_length=tok.model_max_length,
              truncation=True, return_tensors="pt").input_ids

    def step():
        x0 = dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(x0)
        t = torch.randint(0, sched.config.num_train_timesteps, (1,))
        noisy = sched.add_noise(x0, noise, t)
        if te_grad:
            hidden = te(ids)[0]
        else:
            with torch.no_grad():
                hidden = te(ids)[0]
        pred = unet(noisy, t, hidden).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        before_step()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        after()

    step()
    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) * 1000 / steps


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--method", default="all")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    for m in METHODS if a.method == "all" else [a.method]:
        print(f"method {m} torch_ms_per_step {bench(m, a.steps):.2f}", flush=True)


if __name__ == "__main__":
    main()
