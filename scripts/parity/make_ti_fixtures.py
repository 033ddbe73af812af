#!/usr/bin/env python3
"""Reference tensors for services/engine/tests/train_textual_inversion.rs, on the tiny model
(services/engine/fixtures/tiny-sd), from diffusers' examples/textual_inversion/textual_inversion.py.

Run by a developer (not by CI), in the venv of make_fixtures.py, after writing the engine's
export that part 2 loads:

    cargo run --release -p sidbooth-engine --example token_method_export -- \
        --method textual_inversion --out services/engine/fixtures/textual_inversion/export
    python scripts/parity/make_ti_fixtures.py

1. Training steps. The script's setup (placeholder tokens "<sks>", "<sks>_1" added to the
   tokenizer, the embedding resized, both rows initialised from "dog") and its step on a fixed
   batch (latents, noise, timestep, caption): MSE on epsilon, AdamW (0.9, 0.999, 1e-8, weight
   decay 1e-2, constant lr) over the embedding matrix, every other row restored after the step.
   The script does not clip gradients; our trainer clips the global norm of its parameters (the
   new rows) at 1.0, so the other rows' gradients are zeroed and the new rows' clipped before
   each step here, which changes nothing the script computes for the new rows but the scale.
   Two steps, so that the second (no longer a sign step of Adam) depends on the gradients.
2. Export -> loader -> sampling. The engine's export is loaded with
   `pipe.load_textual_inversion(dir)` (and its A1111 file `<sks>.safetensors` with
   `token="<sks>"`); 4 DDIM steps with guidance 7.5 from fixed latents, prompt
   "a photo of <sks> dog", are recorded.

Writes services/engine/fixtures/textual_inversion/reference.safetensors.
"""
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from diffusers import DDPMScheduler, StableDiffusionPipeline

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIX = os.path.join(ROOT, "services", "engine", "fixtures")
MODEL = os.path.join(FIX, "tiny-sd")
OUT = os.path.join(FIX, "textual_inversion")
EXPORT = os.path.join(OUT, "export")

TOKEN = "<sks>"
NUM_VECTORS = 2
INITIALIZER = "dog"
CAPTION = "a photo of <sks> dog"
LR = 1e-2
SAMPLE_PROMPT = "a photo of <sks> dog"

torch.set_num_threads(max(1, os.cpu_count() or 1))


def pipeline():
    return StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None, requires_safety_checker=False)


def training_steps(ref):
    pipe = pipeline()
    tokenizer, text_encoder, unet = pipe.tokenizer, pipe.text_encoder, pipe.unet
    noise_scheduler = DDPMScheduler.from_pretrained(MODEL, subfolder="scheduler")

    # textual_inversion.py: add the placeholder tokens, resize, initialise from the initializer
    placeholder_tokens = [TOKEN] + [f"{TOKEN}_{i}" for i in range(1, NUM_VECTORS)]
    assert tokenizer.add_tokens(placeholder_tokens) == NUM_VECTORS
    token_ids = tokenizer.encode(INITIALIZER, add_special_tokens=False)
    assert len(token_ids) == 1, "the script needs a one-token initializer"
    placeholder_token_ids = tokenizer.convert_tokens_to_ids(placeholder_tokens)
    text_encoder.resize_token_embeddings(len(tokenizer))
    token_embeds = text_encoder.get_input_embeddings().weight.data
    with torch.no_grad():
        for token_id in placeholder_token_ids:
            token_embeds[token_id] = token_embeds[token_ids[0]].clone()
    unet.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    # the script freezes the encoder, the final norm and the position embedding (transformers 5
    # has no `text_model` attribute to reach them by)
    text_encoder.requires_grad_(False)
    embedding = text_encoder.get_input_embeddings().weight
    embedding.requires_grad_(True)
    orig_embeds_params = embedding.data.clone()
    optimizer = torch.optim.AdamW(
        text_encoder.get_input_embeddings().parameters(), lr=LR, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8
    )

    # the dataset's caption: the placeholder string holds every vector's token
    prompt = CAPTION.replace(TOKEN, " ".join(placeholder_tokens))
    input_ids = tokenizer(prompt, padding="max_length", truncation=True, max_length=77, return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(2024)
    latents = torch.randn((1, 4, 16, 16), generator=g)
    noise = torch.randn((1, 4, 16, 16), generator=g)
    timesteps = torch.tensor([417])
    ref["input_ids"] = input_ids.to(torch.int64)
    ref["placeholder_ids"] = torch.tensor(placeholder_token_ids, dtype=torch.int64)
    ref["x0"] = latents
    ref["noise"] = noise
    ref["timesteps"] = timesteps.to(torch.int64)
    ref["rows_init"] = embedding.data[placeholder_token_ids].clone()

    new_rows = torch.zeros(len(tokenizer), dtype=torch.bool)
    new_rows[placeholder_token_ids] = True
    text_encoder.train()
    for step in (1, 2):
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = text_encoder(input_ids)[0]
        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        loss.backward()
        ref[f"loss_{step}"] = loss.detach().reshape(1)
        ref[f"grad_{step}"] = embedding.grad[placeholder_token_ids].clone()
        embedding.grad[~new_rows] = 0
        torch.nn.utils.clip_grad_norm_([embedding], 1.0)
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            text_encoder.get_input_embeddings().weight[~new_rows] = orig_embeds_params[~new_rows]
        ref[f"rows_{step}"] = embedding.data[placeholder_token_ids].clone()
        print(f"step {step}: loss {loss.item():.6f}")


def sampling(ref):
    g = torch.Generator().manual_seed(77)
    init = torch.randn((1, 4, 16, 16), generator=g)
    ref["sample_init_latents"] = init
    kw = dict(num_inference_steps=4, guidance_scale=7.5, height=32, width=32, output_type="latent")

    pipe = pipeline()
    with torch.no_grad():
        base = pipe(SAMPLE_PROMPT, latents=init.clone(), **kw).images
    pipe.load_textual_inversion(EXPORT)
    with torch.no_grad():
        tuned = pipe(SAMPLE_PROMPT, latents=init.clone(), **kw).images
    ref["sample_latents"] = tuned
    learned = load_file(os.path.join(EXPORT, "learned_embeds.safetensors"))[TOKEN]
    rows = pipe.text_encoder.get_input_embeddings().weight.data[
        pipe.tokenizer.convert_tokens_to_ids([TOKEN] + [f"{TOKEN}_{i}" for i in range(1, NUM_VECTORS)])
    ]
    assert torch.equal(rows, learned), "load_textual_inversion did not install the exported rows"
    effect = (tuned - base).abs().max().item()
    print(f"sampling: max |with embedding - base| {effect:.3e}")
    assert effect > 1e-3, "the learned embedding does not change the samples"

    # the A1111 layout: one tensor `emb_params`, the token given by the caller (A1111 takes the
    # file name)
    a1111 = pipeline()
    a1111.load_textual_inversion(os.path.join(EXPORT, f"{TOKEN}.safetensors"), token=TOKEN)
    with torch.no_grad():
        again = a1111(SAMPLE_PROMPT, latents=init.clone(), **kw).images
    assert torch.equal(again, tuned), "the A1111 file does not hold the same embedding"


def main():
    ref = {}
    training_steps(ref)
    sampling(ref)
    os.makedirs(OUT, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(OUT, "reference.safetensors"))
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
    print(f"fixtures/textual_inversion: {total / 1e3:.1f} kB")


if __name__ == "__main__":
    sys.exit(main())
