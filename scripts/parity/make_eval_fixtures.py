#!/usr/bin/env python3
"""Builds the tiny random-weight CLIP and DINO models and the reference outputs used by
services/evaluate/tests/parity_clip.rs and the measure parity test.

Run by a developer (not by CI), in a venv with torch, transformers (5.x or 4.x), safetensors,
pillow and numpy, from the repository root beside ../shared/datasets/dreambooth:

    python scripts/parity/make_eval_fixtures.py

Writes, under services/evaluate/fixtures/:

  tiny-clip/      CLIPModel directory (config.json, model.safetensors, vocab.json, merges.txt,
                  preprocessor_config.json): 2-layer towers of width 32, 32x32 images in 8x8
                  patches, projection 16, the first 3000 CLIP BPE merges (the engine's
                  tiny-tokenizer), openai's legacy token ids, quick_gelu text / gelu vision.
                  Weights are stored as float16 (both model directories), values the float32
                  reference model holds exactly.
  tiny-dino/      ViTModel directory (with pooler weights, which the evaluator ignores), 32x32
                  images in 8x8 patches, DINO's preprocessing (bilinear, ImageNet mean/std).
  photos/*.png    the parity photos, and for the first the 8-bit image that openai's real CLIP
                  preprocessing (shortest edge 224, bicubic, crop 224) feeds the model:
                  clip224-*.png.
  eval-reference.safetensors
                  clip_pixel_values [3,3,32,32], clip_image_embeds [3,16], clip_text_embeds
                  [P,16] (prompts in the metadata, one longer than 77 tokens), dino_pixel_values,
                  dino_image_embeds [3,32]; every embedding L2-normalised.
  measures/       ref-K.png (dog6) with ref-K-mask.png (white = subject; ref-1's mask is half
                  the photo's size, so it goes through the NEAREST resize), gen-K.png (dog3).
  measures-reference.safetensors
                  clip_i [3,4], dino [3,4], subject_alignment [3,4],
                  non_subject_disentanglement [3,4], text_alignment [4], and the CLIP
                  embeddings of the segments (subject_segment_embeds, non_subject_segment_embeds);
                  the metadata names the files and the prompt.

The photos are stored as PNG and both sides read the PNGs, because the `image` crate's JPEG
decoder (zune-jpeg 0.5) does not decode the DreamBooth JPEGs to Pillow's bytes: on each of the 54
photos 2% to 20% of the channel values differ (8% on average), by up to 5 levels, a difference
of decoders, not of the code under test. PNG decoding is exact on both sides.

Preprocessing is the PIL image processor (CLIPImageProcessorPil / ViTImageProcessorPil in
transformers 5, the slow CLIPImageProcessor / ViTImageProcessor in 4.x), not the torchvision
"fast" one transformers 5 picks by default.
"""
import json
import os
import shutil

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import transformers
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, ViTConfig, ViTModel

try:  # transformers 5
    from transformers import CLIPImageProcessorPil as ClipPil
    from transformers import ViTImageProcessorPil as VitPil
except ImportError:  # transformers 4: the slow processors are the PIL ones
    from transformers import CLIPImageProcessor as ClipPil
    from transformers import ViTImageProcessor as VitPil

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIX = os.path.join(ROOT, "services", "evaluate", "fixtures")
TOK = os.path.join(ROOT, "services", "engine", "fixtures", "tiny-tokenizer")
DATA = os.path.join(ROOT, "..", "shared", "datasets", "dreambooth")
CLIP_DIR = os.path.join(FIX, "tiny-clip")
DINO_DIR = os.path.join(FIX, "tiny-dino")
PHOTOS = os.path.join(FIX, "photos")
MEASURES = os.path.join(FIX, "measures")

torch.manual_seed(0)
torch.set_num_threads(max(1, os.cpu_count() or 1))

OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# The same configurations as ClipModel::tiny / DinoModel::tiny (services/evaluate/src).
CLIP_CFG = dict(
    projection_dim=16,
    text_config=dict(
        vocab_size=3002, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
        layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    ),
    vision_config=dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8, hidden_act="gelu", layer_norm_eps=1e-6,
    ),
)
CLIP_PRE = {
    "image_processor_type": "CLIPImageProcessor",
    "do_resize": True, "size": {"shortest_edge": 32}, "resample": 3,
    "do_center_crop": True, "crop_size": {"height": 32, "width": 32},
    "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "image_mean": OPENAI_MEAN, "image_std": OPENAI_STD, "do_convert_rgb": True,
}
DINO_CFG = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
    hidden_act="gelu", layer_norm_eps=1e-12, image_size=32, patch_size=8, num_channels=3,
    qkv_bias=True,
)
DINO_PRE = {
    "image_processor_type": "ViTImageProcessor",
    "do_resize": True, "size": {"height": 32, "width": 32}, "resample": 2,
    "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD,
}

PROMPTS = [
    "a photo of a dog",
    "a sks dog on the beach",
    "A   Dog, wearing a RED hat!!",
    "a photo of " + "a very fluffy and happy dog " * 15 + "in the snow",
]
MEASURE_PROMPT = "a sks dog on the beach"
IDENTIFIER = "sks"

# (subject/file, output width, output height): non-square sizes exercise the shortest-edge rule
# and the crop offsets.
PARITY_PHOTOS = [("backpack/00.jpg", 90, 126), ("cat/00.jpg", 120, 96), ("vase/02.jpg", 97, 97)]
REFS = [("dog6/00.jpg", 112, 112), ("dog6/01.jpg", 96, 112), ("dog6/02.jpg", 112, 100)]
GENERATED = [f"dog3/0{k}.jpg" for k in range(4)]


def perturb_(module, seed):
    """Random norm scales/biases so a swapped or dropped affine parameter shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in module.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def save_half(model, path):
    """Saves `model` (a loadable directory) with its weights stored as float16, halving the
    fixture. The weights are rounded to float16 first, so the float32 model that computes the
    references holds exactly what the loader reads back."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    model.save_pretrained(path, safe_serialization=True)
    weights = os.path.join(path, "model.safetensors")
    half = {k: v.half().contiguous() for k, v in load_file(weights).items()}
    save_file(half, weights, metadata={"format": "pt"})


def fresh_dir(path):
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def photo(rel, w, h):
    """A DreamBooth photo centre-cropped to the aspect of (w, h) and resized with Lanczos."""
    im = Image.open(os.path.join(DATA, rel)).convert("RGB")
    W, H = im.size
    if W * h > H * w:
        cw, ch = H * w // h, H
    else:
        cw, ch = W, W * h // w
    left, top = (W - cw) // 2, (H - ch) // 2
    return im.crop((left, top, left + cw, top + ch)).resize((w, h), Image.LANCZOS)


def save_png(im, path):
    im.save(path, optimize=True)
    return Image.open(path)  # read back what the Rust side reads


def normalised(t):
    return t / t.norm(dim=-1, keepdim=True)


def features(out):
    """get_*_features returns a tensor in transformers 4 and an output object in 5."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def build_clip():
    fresh_dir(CLIP_DIR)
    model = CLIPModel(CLIPConfig(**CLIP_CFG)).eval()
    perturb_(model, 1)
    save_half(model, CLIP_DIR)
    write_json(os.path.join(CLIP_DIR, "preprocessor_config.json"), CLIP_PRE)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(TOK, f), os.path.join(CLIP_DIR, f))
    tok = CLIPTokenizer(
        os.path.join(CLIP_DIR, "vocab.json"), os.path.join(CLIP_DIR, "merges.txt"),
        pad_token="<|endoftext|>", model_max_length=77,
    )
    return model, tok, ClipPil.from_pretrained(CLIP_DIR)


def build_dino():
    fresh_dir(DINO_DIR)
    model = ViTModel(ViTConfig(**DINO_CFG), add_pooling_layer=True).eval()
    perturb_(model, 2)
    save_half(model, DINO_DIR)
    write_json(os.path.join(DINO_DIR, "preprocessor_config.json"), DINO_PRE)
    return model, VitPil.from_pretrained(DINO_DIR)


@torch.no_grad()
def clip_images(model, proc, images):
    pv = proc(images=images, return_tensors="pt")["pixel_values"]
    return pv, normalised(features(model.get_image_features(pixel_values=pv)))


@torch.no_grad()
def clip_texts(model, tok, texts):
    max_len = model.config.text_config.max_position_embeddings
    enc = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    out = model.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
    return normalised(features(out))


@torch.no_grad()
def dino_images(model, proc, images):
    pv = proc(images=images, return_tensors="pt")["pixel_values"]
    return pv, normalised(model(pixel_values=pv).last_hidden_state[:, 0])


def subject_mask(mask, size):
    """White (> 127) = subject; a mask of another size is resized to the photo's with NEAREST."""
    mask = mask.convert("L")
    if mask.size != size:
        mask = mask.resize(size, Image.NEAREST)
    return np.asarray(mask) > 127


def subject_segment(im, m):
    """Pixels outside the mask black, cropped to the mask's box, centred on a black square."""
    a = np.asarray(im).copy()
    a[~m] = 0
    ys, xs = np.nonzero(m)
    crop = a[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    h, w = crop.shape[:2]
    side = max(w, h)
    sq = np.zeros((side, side, 3), np.uint8)
    oy, ox = (side - h) // 2, (side - w) // 2
    sq[oy: oy + h, ox: ox + w] = crop
    return Image.fromarray(sq)


def non_subject_segment(im, m):
    a = np.asarray(im).copy()
    a[m] = 0
    return Image.fromarray(a)


def ellipse_mask(w, h, cx, cy, rx, ry):
    """An off-centre ellipse with a soft edge, so the > 127 threshold decides the border."""
    y, x = np.mgrid[0:h, 0:w]
    r = np.sqrt(((x + 0.5 - cx) / rx) ** 2 + ((y + 0.5 - cy) / ry) ** 2)
    return Image.fromarray(np.clip(255 * (1.5 - r) * 2, 0, 255).astype(np.uint8), "L")


def cos_matrix(a, b):
    return normalised(a) @ normalised(b).T


def main():
    assert os.path.isdir(DATA), f"no DreamBooth photos at {DATA}"
    clip, tok, clip_proc = build_clip()
    dino, dino_proc = build_dino()
    print("transformers", transformers.__version__, "processors", type(clip_proc).__name__,
          type(dino_proc).__name__)

    fresh_dir(PHOTOS)
    photos = []
    for rel, w, h in PARITY_PHOTOS:
        name = rel.replace("/", "-").replace(".jpg", ".png")
        photos.append(save_png(photo(rel, w, h), os.path.join(PHOTOS, name)))
    clip_pv, clip_emb = clip_images(clip, clip_proc, photos)
    dino_pv, dino_emb = dino_images(dino, dino_proc, photos)
    text_emb = clip_texts(clip, tok, PROMPTS)
    assert len(tok(PROMPTS[-1]).input_ids) > 77, "the long prompt must exceed 77 tokens"

    # openai's real preprocessing at 224, without rescale/normalise: the 8-bit model input.
    openai = ClipPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                     resample=3, do_rescale=False, do_normalize=False)
    pv = openai(images=[photos[0]], return_tensors="np")["pixel_values"][0]
    u8 = np.rint(pv).astype(np.uint8).transpose(1, 2, 0)
    assert np.array_equal(u8.astype(np.float32).transpose(2, 0, 1), pv)
    name = os.path.basename(photos[0].filename)
    Image.fromarray(u8).save(os.path.join(PHOTOS, f"clip224-{name}"), optimize=True)

    save_file(
        {
            "clip_pixel_values": clip_pv.contiguous(),
            "clip_image_embeds": clip_emb.contiguous(),
            "clip_text_embeds": text_emb.contiguous(),
            "dino_pixel_values": dino_pv.contiguous(),
            "dino_image_embeds": dino_emb.contiguous(),
        },
        os.path.join(FIX, "eval-reference.safetensors"),
        metadata={
            "photos": json.dumps([os.path.basename(p.filename) for p in photos]),
            "prompts": json.dumps(PROMPTS),
            "transformers": transformers.__version__,
        },
    )

    fresh_dir(MEASURES)
    refs, masks = [], []
    for k, (rel, w, h) in enumerate(REFS):
        refs.append(save_png(photo(rel, w, h), os.path.join(MEASURES, f"ref-{k}.png")))
        mw, mh = (w // 2, h // 2) if k == 1 else (w, h)
        m = ellipse_mask(mw, mh, mw * (0.45 + 0.05 * k), mh * 0.55, mw * 0.3, mh * (0.25 + 0.05 * k))
        masks.append(save_png(m, os.path.join(MEASURES, f"ref-{k}-mask.png")))
    gens = [save_png(photo(rel, 80, 80), os.path.join(MEASURES, f"gen-{k}.png"))
            for k, rel in enumerate(GENERATED)]
    bools = [subject_mask(m, r.size) for m, r in zip(masks, refs)]
    subjects = [subject_segment(r, m) for r, m in zip(refs, bools)]
    others = [non_subject_segment(r, m) for r, m in zip(refs, bools)]

    _, ref_clip = clip_images(clip, clip_proc, refs)
    _, gen_clip = clip_images(clip, clip_proc, gens)
    _, subj_clip = clip_images(clip, clip_proc, subjects)
    _, other_clip = clip_images(clip, clip_proc, others)
    _, ref_dino = dino_images(dino, dino_proc, refs)
    _, gen_dino = dino_images(dino, dino_proc, gens)
    plain = " ".join(w for w in MEASURE_PROMPT.split() if w != IDENTIFIER)
    prompt_clip = clip_texts(clip, tok, [plain])
    save_file(
        {
            "clip_i": cos_matrix(ref_clip, gen_clip).contiguous(),
            "dino": cos_matrix(ref_dino, gen_dino).contiguous(),
            "subject_alignment": cos_matrix(subj_clip, gen_clip).contiguous(),
            "non_subject_disentanglement": (1 - cos_matrix(other_clip, gen_clip)).contiguous(),
            "text_alignment": cos_matrix(gen_clip, prompt_clip)[:, 0].contiguous(),
            "subject_segment_embeds": subj_clip.contiguous(),
            "non_subject_segment_embeds": other_clip.contiguous(),
        },
        os.path.join(FIX, "measures-reference.safetensors"),
        metadata={
            "references": json.dumps([f"ref-{k}.png" for k in range(len(refs))]),
            "masks": json.dumps([f"ref-{k}-mask.png" for k in range(len(refs))]),
            "generated": json.dumps([f"gen-{k}.png" for k in range(len(gens))]),
            "prompt": MEASURE_PROMPT,
            "identifier": IDENTIFIER,
            "text_prompt": plain,
            "subject_segment_sizes": json.dumps([s.size for s in subjects]),
        },
    )

    total = 0
    for dirpath, _, files in os.walk(FIX):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    print(f"wrote {FIX} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
