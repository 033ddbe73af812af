#!/usr/bin/env python3
"""Reference tensors for services/engine/tests/train_custom_diffusion.rs, on the tiny model
(services/engine/fixtures/tiny-sd), from diffusers' examples/custom_diffusion/train_custom_diffusion.py.

Run by a developer (not by CI), in the venv of make_fixtures.py, after writing the engine's
exports that part 3 loads:

    for w in key_value all; do
      cargo run --release -p sidbooth-engine --example token_method_export -- \
          --method custom_diffusion --weights $w --out services/engine/fixtures/custom_diffusion/export-$w
    done
    python scripts/parity/make_custom_diffusion_fixtures.py

1. Training steps, for `--freeze_model crossattn_kv` (our `weights: key_value`) and `crossattn`
   (`all`): the script's setup (modifier token "<sks>" initialised from "dog", a
   CustomDiffusionAttnProcessor on every attention, its weights copied from the UNet's, the
   start token's key and value detached in cross-attention) and its step on a fixed batch of an
   instance and a class example (prior preservation, weight 1): MSE on epsilon, the other
   embedding rows' gradients zeroed, gradients clipped at 1.0, AdamW (0.9, 0.999, 1e-8, weight
   decay 1e-2, constant lr) over the embedding and the processors' weights. The augmentation is
   off, so the valid region is the whole latent; the instance loss is its mean, where the
   script's `(loss * mask).sum([1, 2, 3]) / mask.sum([1, 2, 3])` with a one-channel mask is 4
   times that (see the module doc of custom_diffusion.rs). Two steps, so that the second (no
   longer a sign step of Adam) depends on the gradients.
2. The augmentation: `CustomDiffusionDataset.preprocess` (Pillow bilinear resize, placement on
   an empty square or crop, the latent-cell mask) of a fixed 32x32 photo at fixed placements.
3. Export -> loader -> sampling: each export is loaded with the processors built as the module
   doc of custom_diffusion.rs says (diffusers' `load_attn_procs` does not install them, issue
   9320) and `load_textual_inversion(dir, weight_name="<sks>.safetensors")`; 4 DDIM steps with
   guidance 7.5 from fixed latents are recorded.

Writes services/engine/fixtures/custom_diffusion/reference.safetensors.
"""
import itertools
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.loaders import AttnProcsLayers
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor, CustomDiffusionAttnProcessor2_0

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIX = os.path.join(ROOT, "services", "engine", "fixtures")
MODEL = os.path.join(FIX, "tiny-sd")
OUT = os.path.join(FIX, "custom_diffusion")

TOKEN = "<sks>"
INITIALIZER = "dog"
INSTANCE_CAPTION = "a photo of <sks> dog"
CLASS_CAPTION = "a photo of dog"
LR = 1e-3
SAMPLE_PROMPT = "a photo of <sks> dog"
# (scale, top, left) at resolution 32: smaller (two "very small"), equal, larger
PLACEMENTS = [(10, 3, 17), (19, 13, 0), (25, 2, 5), (32, 0, 0), (40, 5, 2), (44, 0, 4)]

torch.set_num_threads(max(1, os.cpu_count() or 1))


def pipeline():
    return StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None, requires_safety_checker=False)


def training_steps(ref, mode):
    pipe = pipeline()
    tokenizer, text_encoder, unet = pipe.tokenizer, pipe.text_encoder, pipe.unet
    noise_scheduler = DDPMScheduler.from_pretrained(MODEL, subfolder="scheduler")

    assert tokenizer.add_tokens(TOKEN) == 1
    token_ids = tokenizer.encode([INITIALIZER], add_special_tokens=False)
    assert len(token_ids) == 1, "the script needs a one-token initializer"
    modifier_token_id = tokenizer.convert_tokens_to_ids(TOKEN)
    text_encoder.resize_token_embeddings(len(tokenizer))
    token_embeds = text_encoder.get_input_embeddings().weight.data
    token_embeds[modifier_token_id] = token_embeds[token_ids[0]]
    # the script freezes everything of the text encoder but the token embedding (transformers 5
    # has no `text_model` attribute to reach the parts by)
    text_encoder.requires_grad_(False)
    text_encoder.get_input_embeddings().weight.requires_grad_(True)
    pipe.vae.requires_grad_(False)
    unet.requires_grad_(False)

    attention_class = (
        CustomDiffusionAttnProcessor2_0 if hasattr(F, "scaled_dot_product_attention") else CustomDiffusionAttnProcessor
    )
    train_q_out = mode == "all"
    procs = {}
    st = unet.state_dict()
    for name, _ in unet.attn_processors.items():
        cross_attention_dim = None if name.endswith("attn1.processor") else unet.config.cross_attention_dim
        if name.startswith("mid_block"):
            hidden_size = unet.config.block_out_channels[-1]
        elif name.startswith("up_blocks"):
            hidden_size = list(reversed(unet.config.block_out_channels))[int(name[len("up_blocks.")])]
        else:
            hidden_size = unet.config.block_out_channels[int(name[len("down_blocks.")])]
        layer_name = name.split(".processor")[0]
        weights = {
            "to_k_custom_diffusion.weight": st[layer_name + ".to_k.weight"],
            "to_v_custom_diffusion.weight": st[layer_name + ".to_v.weight"],
        }
        if train_q_out:
            weights["to_q_custom_diffusion.weight"] = st[layer_name + ".to_q.weight"]
            weights["to_out_custom_diffusion.0.weight"] = st[layer_name + ".to_out.0.weight"]
            weights["to_out_custom_diffusion.0.bias"] = st[layer_name + ".to_out.0.bias"]
        if cross_attention_dim is not None:
            procs[name] = attention_class(
                train_kv=True,
                train_q_out=train_q_out,
                hidden_size=hidden_size,
                cross_attention_dim=cross_attention_dim,
            )
            procs[name].load_state_dict(weights)
        else:
            procs[name] = attention_class(
                train_kv=False, train_q_out=False, hidden_size=hidden_size, cross_attention_dim=None
            )
    unet.set_attn_processor(procs)
    layers = AttnProcsLayers(unet.attn_processors)
    named = {
        f"{proc}.{p}": t
        for proc, module in unet.attn_processors.items()
        for p, t in module.named_parameters()
    }
    embedding = text_encoder.get_input_embeddings().weight
    optimizer = torch.optim.AdamW(
        itertools.chain(text_encoder.get_input_embeddings().parameters(), layers.parameters()),
        lr=LR,
        betas=(0.9, 0.999),
        weight_decay=1e-2,
        eps=1e-8,
    )

    ids = lambda p: tokenizer(p, truncation=True, padding="max_length", max_length=77, return_tensors="pt").input_ids
    input_ids = torch.cat([ids(INSTANCE_CAPTION), ids(CLASS_CAPTION)], 0)
    g = torch.Generator().manual_seed(99)
    latents = torch.randn((2, 4, 16, 16), generator=g)
    noise = torch.randn((2, 4, 16, 16), generator=g)
    timesteps = torch.tensor([211, 733])
    if mode == "key_value":
        ref["input_ids"] = input_ids.to(torch.int64)
        ref["modifier_id"] = torch.tensor([modifier_token_id], dtype=torch.int64)
        ref["x0"] = latents
        ref["noise"] = noise
        ref["timesteps"] = timesteps.to(torch.int64)

    text_encoder.train()
    for step in (1, 2):
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = text_encoder(input_ids)[0]
        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
        model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
        target, target_prior = torch.chunk(noise, 2, dim=0)
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        prior_loss = F.mse_loss(model_pred_prior.float(), target_prior.float(), reduction="mean")
        loss = loss + 1.0 * prior_loss
        loss.backward()
        grads = embedding.grad
        index_grads_to_zero = torch.arange(len(tokenizer)) != modifier_token_id
        grads.data[index_grads_to_zero, :] = grads.data[index_grads_to_zero, :].fill_(0)
        torch.nn.utils.clip_grad_norm_(itertools.chain(text_encoder.parameters(), layers.parameters()), 1.0)
        ref[f"{mode}.loss_{step}"] = loss.detach().reshape(1)
        if step == 1:
            ref[f"{mode}.grad_1.token"] = embedding.grad[modifier_token_id].clone()
            for k, t in named.items():
                ref[f"{mode}.grad_1.{k}"] = t.grad.clone()
        optimizer.step()
        optimizer.zero_grad()
        print(f"{mode} step {step}: loss {loss.item():.6f}")
    ref[f"{mode}.after_2.token"] = embedding.data[modifier_token_id].clone()
    for k, t in named.items():
        ref[f"{mode}.after_2.{k}"] = t.data.clone()


def preprocess(image, scale, top, left, size=32, mask_size=16):
    """`CustomDiffusionDataset.preprocess` with the offsets given instead of drawn."""
    outer, inner = size, scale
    factor = size // mask_size
    if scale > size:
        outer, inner = scale, size
    assert 0 <= top <= outer - inner and 0 <= left <= outer - inner
    image = image.resize((scale, scale), resample=Image.BILINEAR)
    image = np.array(image).astype(np.uint8)
    image = (image / 127.5 - 1.0).astype(np.float32)
    instance_image = np.zeros((size, size, 3), dtype=np.float32)
    mask = np.zeros((size // factor, size // factor))
    if scale > size:
        instance_image = image[top : top + inner, left : left + inner, :]
        mask = np.ones((size // factor, size // factor))
    else:
        instance_image[top : top + inner, left : left + inner, :] = image
        mask[top // factor + 1 : (top + scale) // factor - 1, left // factor + 1 : (left + scale) // factor - 1] = 1.0
    return instance_image, mask


def augmentation(ref):
    rng = np.random.default_rng(5)
    photo = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    ref["aug_photo"] = torch.from_numpy(photo.astype(np.float32))
    for i, (scale, top, left) in enumerate(PLACEMENTS):
        pixels, mask = preprocess(Image.fromarray(photo), scale, top, left)
        ref[f"aug_{i}.placement"] = torch.tensor([scale, top, left], dtype=torch.int64)
        ref[f"aug_{i}.pixels"] = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
        ref[f"aug_{i}.mask"] = torch.from_numpy(mask.astype(np.float32))


def load_custom_diffusion(pipe, out):
    """The loader of the module doc of custom_diffusion.rs."""
    weights = load_file(f"{out}/pytorch_custom_diffusion_weights.safetensors")
    procs = {}
    for name, proc in pipe.unet.attn_processors.items():
        mine = {k[len(name) + 1 :]: v for k, v in weights.items() if k.startswith(name + ".")}
        if not mine:
            procs[name] = proc
            continue
        k = mine["to_k_custom_diffusion.weight"]
        procs[name] = CustomDiffusionAttnProcessor(
            train_kv=True,
            train_q_out="to_q_custom_diffusion.weight" in mine,
            hidden_size=k.shape[0],
            cross_attention_dim=k.shape[1],
        )
        procs[name].load_state_dict(mine)
        procs[name].to(pipe.device)
    pipe.unet.set_attn_processor(procs)
    pipe.load_textual_inversion(out, weight_name=f"{TOKEN}.safetensors")
    return sum(isinstance(p, CustomDiffusionAttnProcessor) for p in pipe.unet.attn_processors.values())


def sampling(ref):
    g = torch.Generator().manual_seed(31)
    init = torch.randn((1, 4, 16, 16), generator=g)
    ref["sample_init_latents"] = init
    kw = dict(num_inference_steps=4, guidance_scale=7.5, height=32, width=32, output_type="latent")
    with torch.no_grad():
        base = pipeline()(SAMPLE_PROMPT, latents=init.clone(), **kw).images
    for mode in ("key_value", "all"):
        pipe = pipeline()
        n = load_custom_diffusion(pipe, os.path.join(OUT, f"export-{mode}"))
        assert n == 7, f"{n} Custom Diffusion processors installed"
        with torch.no_grad():
            tuned = pipe(SAMPLE_PROMPT, latents=init.clone(), **kw).images
        ref[f"sample_latents.{mode}"] = tuned
        effect = (tuned - base).abs().max().item()
        print(f"{mode}: max |with weights - base| {effect:.3e}")
        assert effect > 1e-3, "the weights do not change the samples"


def main():
    ref = {}
    for mode in ("key_value", "all"):
        training_steps(ref, mode)
    augmentation(ref)
    sampling(ref)
    os.makedirs(OUT, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(OUT, "reference.safetensors"))
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
    print(f"fixtures/custom_diffusion: {total / 1e3:.1f} kB")


if __name__ == "__main__":
    sys.exit(main())
