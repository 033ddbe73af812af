#!/usr/bin/env bash
# SD 2.1-base-sized random weights, one 50-step CFG 512x512 image: ours (candle, CUDA, f16) and
# diffusers (torch, CUDA, f16) in the same run. Needs a CUDA toolkit for candle's kernels and a
# Python with torch + diffusers (PYTHON, default python3). ENGINE_FEATURES=cudnn uses cuDNN convolutions.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
cargo run --release -p sidbooth-engine --features "${ENGINE_FEATURES:-cuda}" --example bench_sd21 -- --steps 50
"$PYTHON" - <<'PY'
import json, time, torch
from diffusers import UNet2DConditionModel, AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
d = "services/engine/fixtures/configs/sd21-base"
cfg = lambda p: {k: v for k, v in json.load(open(f"{d}/{p}")).items() if not k.startswith("_")}
unet = UNet2DConditionModel.from_config(cfg("unet/config.json")).half().cuda()
vae = AutoencoderKL.from_config(cfg("vae/config.json")).half().cuda()
te = CLIPTextModel(CLIPTextConfig(**cfg("text_encoder/config.json"))).half().cuda()
tok = CLIPTokenizer("services/engine/fixtures/tiny-tokenizer/vocab.json", "services/engine/fixtures/tiny-tokenizer/merges.txt", pad_token="!")
sched = DDIMScheduler.from_config(cfg("scheduler/scheduler_config.json"))
pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
pipe.set_progress_bar_config(disable=True)
kw = dict(prompt="a photo of a dog", height=512, width=512, guidance_scale=7.5, output_type="np")
pipe(num_inference_steps=2, **kw); torch.cuda.synchronize()
t0 = time.perf_counter(); pipe(num_inference_steps=50, **kw); torch.cuda.synchronize()
print(f"diffusers: {time.perf_counter() - t0:.3f} s per 50-step CFG 512x512 image")
PY
