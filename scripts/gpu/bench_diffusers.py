#!/usr/bin/env python3
"""diffusers side of the GPU benchmark (issue 3): SD 2.1-base-sized random weights, built from the
configs in services/engine/fixtures/configs/sd21-base (nothing is downloaded), on one CUDA device.

- seconds per 50-step DDIM CFG 7.5 image at 512x512 (StableDiffusionPipeline, fp16; median of
  --repeats after a 2-step warm-up; text encoding, 50 UNet passes at batch 2, VAE decode and the
  copy to numpy, as our `generate`);
- milliseconds per LoRA training step: the step of diffusers' train_dreambooth_lora.py with
  --mixed_precision fp16 (frozen fp16 UNet, peft LoRA r=4 alpha=4 gaussian init on
  to_q/to_k/to_v/to_out.0 kept in fp32, autocast, GradScaler, AdamW, grad clipping 1.0, batch 1,
  cached VAE latents and prompt embedding), median of --train-steps after --train-warmup;
- peak memory of training: torch.cuda.max_memory_allocated / max_memory_reserved, and the device
  memory in use (cudaMemGetInfo, sampled every millisecond on a thread during extra steps run after
  the timed ones, as our gpu_bench does).

    python3 scripts/gpu/bench_diffusers.py [--device cuda] [--dtype fp16|bf16|fp32] [--steps 50]
        [--repeats 3] [--resolution 512] [--train-steps 10] [--train-warmup 3] [--mem-steps 2]
        [--rank 4] [--no-scaler] [--skip-sample] [--skip-train] [--json FILE]

CPU smoke test: --device cpu --dtype fp32 --resolution 64 --steps 2 --repeats 1 --train-steps 1
"""
import argparse
import json
import os
import statistics
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
GIB = float(1 << 30)


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=os.path.join(ROOT, "services/engine/fixtures/configs/sd21-base"))
    p.add_argument("--tokenizer", default=os.path.join(ROOT, "services/engine/fixtures/tiny-tokenizer"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default=None, choices=["fp16", "bf16", "fp32"])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--train-steps", type=int, default=10)
    p.add_argument("--train-warmup", type=int, default=3)
    p.add_argument("--mem-steps", type=int, default=2)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--no-scaler", action="store_true", help="fp16 training without GradScaler")
    p.add_argument("--skip-sample", action="store_true")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if a.dtype is None:
        a.dtype = "fp16" if a.device.startswith("cuda") else "fp32"
    return a


def cfg(path):
    with open(path) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


def dump(a, res):
    """Writes what is known so far, so that a run stopped in the next phase still leaves it."""
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class MemSampler:
    """Device memory in use (total - free, cudaMemGetInfo) sampled every millisecond."""

    def __init__(self, dev):
        self.dev, self.peak, self.stop = dev, 0, threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            free, total = torch.cuda.mem_get_info(self.dev)
            self.peak = max(self.peak, total - free)
            time.sleep(0.001)

    def __enter__(self):
        self.t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.t.join()


def main():
    a = parse()
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    dev = torch.device(a.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    cuda = dev.type == "cuda"
    res = {"device": torch.cuda.get_device_name(dev) if cuda else "cpu", "dtype": a.dtype, "resolution": a.resolution}
    import diffusers
    import transformers

    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
          f"device {res['device']}, dtype {a.dtype}")
    mem_context = None
    if cuda:
        torch.cuda.init()
        torch.zeros(1, device=dev)
        free, total = torch.cuda.mem_get_info(dev)
        mem_context = total - free
        print(f"device memory in use before the models: {mem_context / GIB:.2f} GiB of {total / GIB:.2f} GiB")

    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(dev):
        unet = UNet2DConditionModel.from_config(cfg(f"{a.config}/unet/config.json"))
        vae = AutoencoderKL.from_config(cfg(f"{a.config}/vae/config.json"))
        te = CLIPTextModel(CLIPTextConfig(**cfg(f"{a.config}/text_encoder/config.json")))
    unet, vae, te = (m.to(dtype).eval() for m in (unet, vae, te))
    sync(dev)
    print(f"built random SD 2.1-base-sized weights in {time.perf_counter() - t0:.1f} s "
          f"(unet {sum(p.numel() for p in unet.parameters()) / 1e6:.0f}M, "
          f"text encoder {sum(p.numel() for p in te.parameters()) / 1e6:.0f}M, "
          f"vae {sum(p.numel() for p in vae.parameters()) / 1e6:.0f}M params)")
    tok = CLIPTokenizer(f"{a.tokenizer}/vocab.json", f"{a.tokenizer}/merges.txt", pad_token="!", model_max_length=77)

    if not a.skip_sample:
        sched = DDIMScheduler.from_config(cfg(f"{a.config}/scheduler/scheduler_config.json"))
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        kw = dict(prompt="a photo of a dog", height=a.resolution, width=a.resolution, guidance_scale=7.5,
                  output_type="np")
        with torch.inference_mode():
            t = time.perf_counter()
            pipe(num_inference_steps=2, generator=torch.Generator(dev).manual_seed(0), **kw)
            sync(dev)
            print(f"sampling warm-up (2 steps) {time.perf_counter() - t:.2f} s")
            times = []
            for i in range(max(1, a.repeats)):
                t = time.perf_counter()
                out = pipe(num_inference_steps=a.steps, generator=torch.Generator(dev).manual_seed(i), **kw)
                sync(dev)
                times.append(time.perf_counter() - t)
                print(f"  image {i}: {times[-1]:.3f} s {tuple(out.images.shape)}")
        med = statistics.median(times)
        print(f"diffusers: {med:.3f} s per {a.steps}-step CFG {a.resolution}x{a.resolution} image (median of {len(times)})")
        res["sample_s_per_image"] = round(med, 4)
        res["sample_steps"] = a.steps
        dump(a, res)
        del pipe

    if not a.skip_train:
        from peft import LoraConfig

        if cuda:
            torch.cuda.empty_cache()
        noise_sched = DDPMScheduler.from_config(cfg(f"{a.config}/scheduler/scheduler_config.json"))
        unet.requires_grad_(False)
        te.requires_grad_(False)
        vae.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=a.rank, lora_alpha=a.rank, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        params = [p for p in unet.parameters() if p.requires_grad]
        for p in params:  # diffusers' cast_training_params: trainable LoRA weights in fp32
            p.data = p.data.float()
        n_params = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        use_autocast = dtype != torch.float32
        scaler = torch.amp.GradScaler(dev.type) if (dtype == torch.float16 and not a.no_scaler) else None
        # Cached latent distribution of one training photo and the prompt embedding (as ours).
        with torch.no_grad():
            x = torch.linspace(-1, 1, a.resolution, device=dev)
            img = torch.stack([x[None, :].expand(a.resolution, -1), x[:, None].expand(-1, a.resolution),
                               torch.zeros(a.resolution, a.resolution, device=dev)])[None].to(dtype)
            dist = vae.encode(img).latent_dist
            mean, std = dist.mean.float(), dist.std.float()
            ids = tok(["a photo of sks dog"], padding="max_length", max_length=tok.model_max_length,
                      truncation=True, return_tensors="pt").input_ids.to(dev)
            ctx = te(ids)[0]
        sf = vae.config.scaling_factor
        alphas = noise_sched.alphas_cumprod.to(dev)
        unet.train()

        def step():
            x0 = (mean + std * torch.randn_like(mean)) * sf
            noise = torch.randn_like(x0)
            t = torch.randint(0, noise_sched.config.num_train_timesteps, (1,), device=dev)
            ac = alphas[t].view(-1, 1, 1, 1)
            noisy = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
            with torch.autocast(dev.type, dtype=dtype, enabled=use_autocast):
                pred = unet(noisy.to(dtype), t, ctx).sample
            loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()

        t = time.perf_counter()
        for _ in range(a.train_warmup):
            step()
        sync(dev)
        print(f"training warm-up ({a.train_warmup} steps) {time.perf_counter() - t:.2f} s")
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        times, last = [], float("nan")
        t_all = time.perf_counter()
        for _ in range(max(1, a.train_steps)):
            t = time.perf_counter()
            last = step()
            sync(dev)
            times.append((time.perf_counter() - t) * 1000)
        mean_ms = (time.perf_counter() - t_all) * 1000 / len(times)
        med = statistics.median(times)
        print(f"diffusers: {med:.1f} ms per LoRA training step (median of {len(times)}, mean {mean_ms:.1f}; "
              f"{a.resolution}x{a.resolution}, batch 1, rank {a.rank}, {n_params} trainable, "
              f"{'autocast ' + a.dtype if use_autocast else 'fp32'}{' + GradScaler' if scaler else ''}, last loss {last:.4f})")
        res["train_ms_per_step"] = round(med, 2)
        res["train_trainable_params"] = n_params
        res["train_last_loss"] = last
        if cuda:
            alloc = torch.cuda.max_memory_allocated(dev)
            reserved = torch.cuda.max_memory_reserved(dev)
            peak = None
            if a.mem_steps > 0:
                with MemSampler(dev) as s:
                    for _ in range(a.mem_steps):
                        step()
                    sync(dev)
                peak = s.peak
            print(f"diffusers: peak memory while training: max_memory_allocated {alloc / GIB:.2f} GiB, "
                  f"max_memory_reserved {reserved / GIB:.2f} GiB"
                  + (f", device memory in use {peak / GIB:.2f} GiB (cudaMemGetInfo; "
                     f"{(peak - mem_context) / GIB:.2f} GiB above the {mem_context / GIB:.2f} GiB before the models)"
                     if peak is not None else ""))
            res["train_max_allocated_gib"] = round(alloc / GIB, 3)
            res["train_max_reserved_gib"] = round(reserved / GIB, 3)
            if peak is not None:
                res["train_peak_device_gib"] = round(peak / GIB, 3)
                res["train_peak_above_context_gib"] = round((peak - mem_context) / GIB, 3)

    dump(a, res)


if __name__ == "__main__":
    main()
