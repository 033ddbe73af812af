#!/usr/bin/env python3
"""The embedding work of one evaluation in transformers, on the CPU; the same work as
services/evaluate/examples/bench_embed.rs, for comparison.

25 prompts x 4 generated images against 5 reference photos of dog6 with their masks: CLIP image
embeddings of the 5 references, their 5 subject and 5 non-subject segments and the 100 generated
images; CLIP text embeddings of the 25 prompts; DINO embeddings of the 105 photos and images; the
cosine matrices. Preprocessing (the PIL image processors) is timed, decoding the inputs is not.
Images go through the models 32 at a time, as on the Rust side.

    python scripts/parity/bench_eval_transformers.py --threads 2 --size base

--size tiny: the tiny configs of the parity fixtures; --size base: random weights at the sizes of
openai/clip-vit-base-patch32 and facebook/dino-vits16, saved to a temporary directory and loaded
from there with from_pretrained.
"""
import argparse
import os
import shutil
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, ViTConfig, ViTModel

try:  # transformers 5
    from transformers import CLIPImageProcessorPil as ClipPil
    from transformers import ViTImageProcessorPil as VitPil
except ImportError:  # transformers 4: the slow processors are the PIL ones
    from transformers import CLIPImageProcessor as ClipPil
    from transformers import ViTImageProcessor as VitPil

import make_eval_fixtures as fx

ROOT = fx.ROOT
CONTEXTS = [
    "in the jungle", "in the snow", "on the beach", "on a cobblestone street",
    "on top of pink fabric", "on top of a wooden floor", "with a city in the background",
    "with a mountain in the background", "with a blue house in the background",
    "on top of a purple rug in a forest", "with a wheat field in the background",
    "with a tree and autumn leaves in the background", "with the Eiffel Tower in the background",
    "floating on top of water", "floating in an ocean of milk",
    "on top of green grass with sunflowers around it", "on top of a mirror",
    "on top of the sidewalk in a crowded street", "on top of a dirt road",
    "on top of a white rug", "red", "purple", "shiny", "wet", "cube shaped",
]
PER_PROMPT = 4
REFERENCES = 5
GENERATED_SIZE = 512
BATCH = 32

BASE_CLIP = dict(
    projection_dim=512,
    text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                     num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                     hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1),
    vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, image_size=224, patch_size=32,
                       hidden_act="quick_gelu"),
)
BASE_CLIP_PRE = dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                     resample=3, image_mean=fx.OPENAI_MEAN, image_std=fx.OPENAI_STD)
BASE_DINO = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                 intermediate_size=1536, hidden_act="gelu", layer_norm_eps=1e-12,
                 image_size=224, patch_size=16, qkv_bias=True)
BASE_DINO_PRE = dict(size={"height": 224, "width": 224}, resample=2,
                     image_mean=fx.IMAGENET_MEAN, image_std=fx.IMAGENET_STD)


def ellipse(w, h):
    y, x = np.mgrid[0:h, 0:w]
    dx = (x + 0.5 - 0.5 * w) / (0.3 * w)
    dy = (y + 0.5 - 0.55 * h) / (0.35 * h)
    return dx * dx + dy * dy <= 1.0


def inputs(data):
    refs = [Image.open(os.path.join(data, f"dog6/{k:02}.jpg")).convert("RGB") for k in range(REFERENCES)]
    pool = sorted(os.path.join(data, f"{s}/{k:02}.jpg") for s in ("dog3", "cat", "backpack", "vase")
                  for k in range(4))
    pool = [Image.open(p).convert("RGB").resize((GENERATED_SIZE, GENERATED_SIZE), Image.LANCZOS)
            for p in pool]
    generated = [pool[i % len(pool)] for i in range(len(CONTEXTS) * PER_PROMPT)]
    for im in refs + generated:
        im.load()
    return refs, generated


def write_models(tmp, size):
    if size == "tiny":
        clip_cfg, dino_cfg = fx.CLIP_CFG, fx.DINO_CFG
        clip_pre = {k: v for k, v in fx.CLIP_PRE.items() if k != "image_processor_type"}
        dino_pre = {k: v for k, v in fx.DINO_PRE.items() if k != "image_processor_type"}
    else:
        clip_cfg, dino_cfg, clip_pre, dino_pre = BASE_CLIP, BASE_DINO, BASE_CLIP_PRE, BASE_DINO_PRE
    clip_dir, dino_dir = os.path.join(tmp, "clip"), os.path.join(tmp, "dino")
    CLIPModel(CLIPConfig(**clip_cfg)).save_pretrained(clip_dir)
    ClipPil(**clip_pre).save_pretrained(clip_dir)
    CLIPTokenizer(os.path.join(fx.TOK, "vocab.json"), os.path.join(fx.TOK, "merges.txt"),
                  pad_token="<|endoftext|>").save_pretrained(clip_dir)
    ViTModel(ViTConfig(**dino_cfg)).save_pretrained(dino_dir)
    VitPil(**dino_pre).save_pretrained(dino_dir)
    return clip_dir, dino_dir


def normalised(t):
    return t / t.norm(dim=-1, keepdim=True)


def features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.inference_mode()
def clip_images(model, proc, images):
    out = []
    for i in range(0, len(images), BATCH):
        pv = proc(images=images[i: i + BATCH], return_tensors="pt")["pixel_values"]
        out.append(normalised(features(model.get_image_features(pixel_values=pv))))
    return torch.cat(out)


@torch.inference_mode()
def dino_images(model, proc, images):
    out = []
    for i in range(0, len(images), BATCH):
        pv = proc(images=images[i: i + BATCH], return_tensors="pt")["pixel_values"]
        out.append(normalised(model(pixel_values=pv).last_hidden_state[:, 0]))
    return torch.cat(out)


@torch.inference_mode()
def clip_texts(model, tok, texts):
    enc = tok(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    out = model.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
    return normalised(features(out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=["tiny", "base"], default="tiny")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--data", default=fx.DATA)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    refs, generated = inputs(args.data)
    masks = [ellipse(*r.size) for r in refs]
    prompts = [f"a sks dog {c}" for c in CONTEXTS]
    tmp = tempfile.mkdtemp()
    try:
        clip_dir, dino_dir = write_models(tmp, args.size)
        phases = []

        def timed(name, f):
            t = time.perf_counter()
            out = f()
            phases.append((name, time.perf_counter() - t))
            return out

        def load():
            clip = CLIPModel.from_pretrained(clip_dir).eval()
            dino = ViTModel.from_pretrained(dino_dir, add_pooling_layer=False).eval()
            return (clip, CLIPTokenizer.from_pretrained(clip_dir), ClipPil.from_pretrained(clip_dir),
                    dino, VitPil.from_pretrained(dino_dir))

        clip, tok, clip_proc, dino, dino_proc = timed("load", load)
        work = time.perf_counter()
        subjects, others = timed("segments", lambda: (
            [fx.subject_segment(r, m) for r, m in zip(refs, masks)],
            [fx.non_subject_segment(r, m) for r, m in zip(refs, masks)],
        ))
        ci = timed("clip images (115)", lambda: clip_images(clip, clip_proc, refs + subjects + others + generated))
        te = timed("clip texts (25)", lambda: clip_texts(clip, tok, [p.replace("sks ", "") for p in prompts]))
        de = timed("dino images (105)", lambda: dino_images(dino, dino_proc, refs + generated))

        def cosines():
            r = REFERENCES
            ref_e, subj, other, gen = ci[:r], ci[r:2 * r], ci[2 * r:3 * r], ci[3 * r:]
            clip_i = fx.cos_matrix(ref_e, gen)
            subject = fx.cos_matrix(subj, gen)
            non_subject = 1 - fx.cos_matrix(other, gen)
            dino_m = fx.cos_matrix(de[:r], de[r:])
            text = (normalised(gen) * normalised(te).repeat_interleave(PER_PROMPT, 0)).sum(-1)
            return float(sum(m.double().sum() for m in (clip_i, subject, non_subject, dino_m, text)))

        checksum = timed("cosines", cosines)
        total = time.perf_counter() - work
    finally:
        shutil.rmtree(tmp)
    print(f"transformers ({args.size} config, {torch.get_num_threads()} threads, checksum {checksum:.4f})")
    for name, s in phases:
        print(f"  {name:<20} {s:8.3f} s")
    print(f"  {'total':<20} {total:8.3f} s (without load)")


if __name__ == "__main__":
    main()
