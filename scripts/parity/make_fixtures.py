#!/usr/bin/env python3
"""Builds the tiny random-weight diffusers model and the reference outputs used by
services/engine/tests/parity.rs.

Run by a developer (not by CI), in a venv with torch, diffusers, transformers, peft, safetensors:

    python scripts/parity/make_fixtures.py

Writes
  services/engine/fixtures/tiny-sd/                 diffusers model directory (fp32)
  services/engine/fixtures/tiny-sd-lora/pytorch_lora_weights.safetensors   (diffusers/peft LoRA)
  services/engine/fixtures/reference.safetensors    reference tensors (fp32)

The tiny model is SD 2.x-like: linear-projection transformers, a per-block head list, a gelu
text tower, scaled_linear DDIM with steps_offset 1 and set_alpha_to_one False. The tokenizer is
the first 3000 entries of the real CLIP BPE vocabulary (fixtures/tiny-tokenizer).
"""
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
import transformers.integrations.peft as _tf_peft

# transformers 5 asks for a peft newer than the one the package index offers; the LoRA layer code
# used here (LoraConfig / inject / state dict) is unchanged between them.
_tf_peft.check_peft_version = lambda *a, **k: None

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIX = os.path.join(ROOT, "services", "engine", "fixtures")
TOK = os.path.join(FIX, "tiny-tokenizer")
OUT = os.path.join(FIX, "tiny-sd")
LORA_DIR = os.path.join(FIX, "tiny-sd-lora")

torch.manual_seed(0)
torch.set_num_threads(max(1, os.cpu_count() or 1))


def perturb_(module, seed):
    """Random norm scales/biases so a swapped or dropped affine parameter shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


UNET_CFG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(16, 32, 32),
    layers_per_block=1,
    attention_head_dim=(2, 4, 4),
    cross_attention_dim=32,
    norm_num_groups=8,
    use_linear_projection=True,
)
TEXT_CFG = dict(
    vocab_size=3002,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    pad_token_id=1,
    bos_token_id=3000,
    eos_token_id=3001,
    projection_dim=32,
)
VAE_CFG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(16, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
)
SCHED_CFG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="leading",
)


def main():
    unet = UNet2DConditionModel(**UNET_CFG)
    perturb_(unet, 1)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CFG))
    perturb_(text_encoder, 2)
    vae = AutoencoderKL(**VAE_CFG)
    perturb_(vae, 3)
    scheduler = DDIMScheduler(**SCHED_CFG)
    tokenizer = CLIPTokenizer(
        os.path.join(TOK, "vocab.json"), os.path.join(TOK, "merges.txt"), pad_token="!", model_max_length=77
    )
    for m in (unet, text_encoder, vae):
        m.eval()

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    pipe.save_pretrained(OUT, safe_serialization=True)

    ref = {}
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        prompts = ["a photo of sks dog", "a red car on a beach"]
        ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        ref["te_ids"] = ids.to(torch.int64)
        hidden = text_encoder(ids)[0]
        ref["te_hidden"] = hidden

        lat = torch.randn((2, 4, 16, 16), generator=g)
        ref["unet_latents"] = lat
        ref["unet_timesteps"] = torch.tensor([37.0, 801.0])
        ref["unet_out"] = unet(lat, ref["unet_timesteps"], encoder_hidden_states=hidden).sample
        ref["unet_out_t500"] = unet(lat, torch.tensor(500.0), encoder_hidden_states=hidden).sample

        z = torch.randn((1, 4, 16, 16), generator=g)
        ref["vae_latents"] = z
        ref["vae_decoded"] = vae.decode(z).sample
        img = torch.rand((1, 3, 32, 32), generator=g) * 2 - 1
        ref["vae_image"] = img
        dist = vae.encode(img).latent_dist
        ref["vae_enc_mean"] = dist.mean
        ref["vae_enc_std"] = dist.std

        init = torch.randn((1, 4, 16, 16), generator=g)
        ref["ddim_init_latents"] = init
        kw = dict(
            prompt="a photo of sks dog",
            negative_prompt="blurry",
            num_inference_steps=10,
            guidance_scale=7.5,
            height=32,
            width=32,
            latents=init.clone(),
        )
        ref["ddim_latents"] = pipe(output_type="latent", **kw).images
        ref["ddim_image"] = torch.from_numpy(pipe(output_type="np", **kw).images).permute(0, 3, 1, 2).contiguous()
        ts = DDIMScheduler(**SCHED_CFG)
        ts.set_timesteps(10)
        ref["ddim_timesteps"] = ts.timesteps.to(torch.int64)
        ref["alphas_cumprod"] = ts.alphas_cumprod.to(torch.float32)

    # LoRA on UNet attention q/k/v/out and text-encoder attention, rank 4, alpha 8 (scale 2)
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    ucfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    tcfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    torch.manual_seed(77)
    unet.add_adapter(ucfg)
    text_encoder.add_adapter(tcfg)
    with torch.no_grad():
        ids = ref["te_ids"]
        hidden_l = text_encoder(ids)[0]
        out_l = unet(ref["unet_latents"], ref["unet_timesteps"], encoder_hidden_states=hidden_l).sample
    if os.path.exists(LORA_DIR):
        shutil.rmtree(LORA_DIR)

    def meta(cfg):
        d = cfg.to_dict()
        return {k: (sorted(v) if isinstance(v, set) else v) for k, v in d.items() if k in ("r", "lora_alpha", "target_modules")}

    StableDiffusionPipeline.save_lora_weights(
        LORA_DIR,
        unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(text_encoder),
        unet_lora_adapter_metadata=meta(ucfg),
        text_encoder_lora_adapter_metadata=meta(tcfg),
        safe_serialization=True,
    )

    # the same file loads in diffusers and reproduces the in-memory outputs
    fresh = StableDiffusionPipeline.from_pretrained(OUT, safety_checker=None, requires_safety_checker=False)
    fresh.load_lora_weights(LORA_DIR)
    with torch.no_grad():
        h2 = fresh.text_encoder(ids)[0]
        o2 = fresh.unet(ref["unet_latents"], ref["unet_timesteps"], encoder_hidden_states=h2).sample
    err_h = (h2 - hidden_l).abs().max().item()
    err_o = (o2 - out_l).abs().max().item()
    print(f"LoRA reload in diffusers: max |dh| {err_h:.3e}, max |dout| {err_o:.3e}")
    assert err_h < 1e-5 and err_o < 1e-4, "saved LoRA does not reload in diffusers"
    ref["lora_te_hidden"] = hidden_l
    ref["lora_unet_out"] = out_l

    # SD 1.x-style parts: conv proj_in/proj_out, one head count for all blocks, quick_gelu text tower
    torch.manual_seed(15)
    unet15 = UNet2DConditionModel(
        sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        attention_head_dim=2,
        cross_attention_dim=8,
        norm_num_groups=4,
        use_linear_projection=False,
    )
    perturb_(unet15, 4)
    te15 = CLIPTextModel(CLIPTextConfig(**dict(TEXT_CFG, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                                               num_attention_heads=2, hidden_act="quick_gelu", projection_dim=8)))
    perturb_(te15, 5)
    sd15 = os.path.join(FIX, "tiny-sd15")
    if os.path.exists(sd15):
        shutil.rmtree(sd15)
    unet15.save_pretrained(os.path.join(sd15, "unet"), safe_serialization=True)
    te15.save_pretrained(os.path.join(sd15, "text_encoder"), safe_serialization=True)
    with torch.no_grad():
        h15 = te15(ref["te_ids"])[0]
        ref["sd15_te_hidden"] = h15
        lat15 = torch.randn((2, 4, 8, 8), generator=g)
        ref["sd15_latents"] = lat15
        ref["sd15_unet_out"] = unet15(lat15, torch.tensor([3.0, 999.0]), encoder_hidden_states=h15).sample

    ref = {k: v.contiguous() for k, v in ref.items()}
    save_file(ref, os.path.join(FIX, "reference.safetensors"))
    total = 0
    for d, _, fs in os.walk(FIX):
        for f in fs:
            total += os.path.getsize(os.path.join(d, f))
    print(f"fixtures: {total / 1e6:.2f} MB")
    print("alphas_cumprod[0], [999]:", ref["alphas_cumprod"][0].item(), ref["alphas_cumprod"][999].item())
    print("ddim timesteps:", ref["ddim_timesteps"].tolist())


if __name__ == "__main__":
    sys.exit(main())
