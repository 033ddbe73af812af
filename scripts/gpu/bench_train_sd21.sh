#!/usr/bin/env bash
# SD 2.1-base-sized random weights, LoRA training step at 512x512, batch 1 (UNet attention
# q/k/v/out, rank 4, AdamW, grad clipping): milliseconds per step and peak GPU memory, ours
# (candle, CUDA, f16 base weights, f32 LoRA parameters) and diffusers + peft (torch, CUDA, f16
# base weights, f32 LoRA parameters, as train_dreambooth_lora.py with --mixed_precision fp16) in the
# same run. Needs a CUDA toolkit for candle's kernels and a Python with torch + diffusers + peft
# (PYTHON, default python3).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
STEPS=${STEPS:-20}
cargo build --release -p sidbooth-engine --features cuda --example bench_train
# Peak memory of our process from nvidia-smi (candle has no allocator statistics).
LOG=$(mktemp)
./target/release/examples/bench_train --model sd21 --steps "$STEPS" --dtype "${DTYPE:-f16}" &
PID=$!
PEAK=0
while kill -0 "$PID" 2>/dev/null; do
  USED=$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits | awk -F', ' -v p="$PID" '$1==p {print $2}')
  if [ -n "${USED:-}" ] && [ "$USED" -gt "$PEAK" ]; then PEAK=$USED; fi
  sleep 0.2
done
wait "$PID"
echo "ours: peak GPU memory ${PEAK} MiB (nvidia-smi, whole process)"
rm -f "$LOG"
STEPS=$STEPS "$PYTHON" - <<'PY'
import json, os, time, torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel, DDPMScheduler
from peft import LoraConfig
d = "services/engine/fixtures/configs/sd21-base"
cfg = lambda p: {k: v for k, v in json.load(open(f"{d}/{p}")).items() if not k.startswith("_")}
unet = UNet2DConditionModel.from_config(cfg("unet/config.json")).half().cuda()
unet.requires_grad_(False)
unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
for p in unet.parameters():
    if p.requires_grad:
        p.data = p.data.float()
params = [p for p in unet.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
sched = DDPMScheduler.from_config(cfg("scheduler/scheduler_config.json"))
ctx = torch.randn(1, 77, 1024, device="cuda", dtype=torch.float16)
mean = torch.randn(1, 4, 64, 64, device="cuda")
scaler = torch.amp.GradScaler("cuda")
def step():
    x0 = (mean + 0.1 * torch.randn_like(mean)) * 0.18215
    noise = torch.randn_like(x0)
    t = torch.randint(0, 1000, (1,), device="cuda")
    noisy = sched.add_noise(x0, noise, t)
    with torch.autocast("cuda", dtype=torch.float16):
        pred = unet(noisy.half(), t, ctx).sample
    loss = F.mse_loss(pred.float(), noise.float())
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    scaler.step(opt); scaler.update(); opt.zero_grad()
unet.train(); step(); step(); torch.cuda.synchronize()
torch.cuda.reset_peak_memory_stats()
n = int(os.environ["STEPS"])
t0 = time.perf_counter()
for _ in range(n):
    step()
torch.cuda.synchronize()
print(f"diffusers: {(time.perf_counter() - t0) * 1000 / n:.1f} ms per LoRA training step (sd21-base, 512x512, rank 4); "
      f"peak allocated {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
PY
