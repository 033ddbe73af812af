#!/usr/bin/env python3
"""Builds the tiny random-weight SAM and the reference outputs used by
services/evaluate/tests/parity_sam.rs.

Run by a developer (not by CI), in a venv with torch, torchvision, segment-anything, safetensors
and pillow:

    python scripts/parity/make_sam_fixtures.py

Writes
  services/evaluate/fixtures/tiny-sam/model.safetensors  the model's state dict, facebookresearch
                                                         key layout (fp32)
  services/evaluate/fixtures/tiny-sam/config.json        its sizes, in sidbooth's SamConfig format
  services/evaluate/fixtures/sam-photo.png               the photo the references are computed on
  services/evaluate/fixtures/sam-reference-mask.png      SamPredictor.predict's mask for box 0
  services/evaluate/fixtures/sam-reference.safetensors   reference tensors (fp32 unless noted)

The photo is shared/datasets/dreambooth/dog6/00.jpg cropped to PHOTO_CROP (portrait, so the
model input is padded on the right), stored as a PNG: the `image` crate decodes that JPEG
differently from Pillow's libjpeg (94% of the bytes equal, others up to 4 levels apart), and the
parity of the preprocessing needs the same pixels on both sides.

The model is built from segment-anything's own classes with the sizes of SamConfig::tiny():
64-pixel input, 8-pixel patches, windows of 3 over the 8x8 grid (padded to 9x9), one global
block. Norm scales and biases, the absolute position embedding and the relative-position tables
are random (the library initialises them to 1, 0 and 0), and two of the tables have lengths other
than 2 * size - 1, so get_rel_pos interpolates them as it would for a checkpoint trained at
another size.
"""
import json
import os
import sys
from functools import partial

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.modeling.image_encoder import get_rel_pos
from segment_anything.utils.amg import build_point_grid, calculate_stability_score
from torchvision.ops import nms

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIX = os.path.join(ROOT, "services", "evaluate", "fixtures")
OUT = os.path.join(FIX, "tiny-sam")
PHOTO = os.path.join(ROOT, "..", "shared", "datasets", "dreambooth", "dog6", "00.jpg")
PHOTO_CROP = (10, 140, 501, 720)  # left, top, right, bottom: 491 x 580

# Box prompts in the cropped photo's pixels (XYXY): the dog, and its head.
BOXES = [[18.5, 20.0, 465.25, 572.0], [50.0, 20.5, 410.0, 290.75]]

# The automatic mask generator reference: a 4x4 grid in batches of 5, thresholds for this random
# model that keep 8 of its 48 masks, each in a gap of the predicted IoUs (0.293 | 0.304) and
# stability scores (0.451 | 0.470), before box NMS.
AMG = dict(points_per_side=4, points_per_batch=5, pred_iou_thresh=0.3, stability_score_thresh=0.46,
           stability_score_offset=0.1)

CFG = dict(
    image_size=64,
    vit_patch_size=8,
    encoder_embed_dim=32,
    encoder_depth=2,
    encoder_num_heads=2,
    encoder_mlp_ratio=4.0,
    encoder_global_attn_indexes=[1],
    window_size=3,
    prompt_embed_dim=32,
    decoder_depth=2,
    decoder_mlp_dim=64,
    decoder_num_heads=2,
    decoder_attention_downsample_rate=2,
    num_multimask_outputs=3,
    iou_head_depth=3,
    iou_head_hidden_dim=32,
    pixel_mean=[123.675, 116.28, 103.53],
    pixel_std=[58.395, 57.12, 57.375],
)

torch.manual_seed(0)


def build(cfg):
    """segment-anything's _build_sam with every size taken from cfg."""
    grid = cfg["image_size"] // cfg["vit_patch_size"]
    d = cfg["prompt_embed_dim"]
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=cfg["encoder_depth"],
            embed_dim=cfg["encoder_embed_dim"],
            img_size=cfg["image_size"],
            mlp_ratio=cfg["encoder_mlp_ratio"],
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=cfg["encoder_num_heads"],
            patch_size=cfg["vit_patch_size"],
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=cfg["encoder_global_attn_indexes"],
            window_size=cfg["window_size"],
            out_chans=d,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=d,
            image_embedding_size=(grid, grid),
            input_image_size=(cfg["image_size"], cfg["image_size"]),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=cfg["num_multimask_outputs"],
            transformer=TwoWayTransformer(
                depth=cfg["decoder_depth"],
                embedding_dim=d,
                mlp_dim=cfg["decoder_mlp_dim"],
                num_heads=cfg["decoder_num_heads"],
                attention_downsample_rate=cfg["decoder_attention_downsample_rate"],
            ),
            transformer_dim=d,
            iou_head_depth=cfg["iou_head_depth"],
            iou_head_hidden_dim=cfg["iou_head_hidden_dim"],
        ),
        pixel_mean=cfg["pixel_mean"],
        pixel_std=cfg["pixel_std"],
    )


def randomise_(sam, seed):
    """Random norm parameters, position embedding and relative-position tables, so a swapped,
    dropped or misplaced one shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    enc = sam.image_encoder
    head_dim = CFG["encoder_embed_dim"] // CFG["encoder_num_heads"]
    with torch.no_grad():
        for name, p in sam.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        enc.pos_embed.copy_(0.5 * torch.randn(enc.pos_embed.shape, generator=g))
        # tables of other lengths than the grid needs: 7 rows for a window of 3 (5 needed),
        # 11 rows for the 8x8 global grid (15 needed)
        enc.blocks[0].attn.rel_pos_h = torch.nn.Parameter(torch.zeros(7, head_dim))
        enc.blocks[1].attn.rel_pos_w = torch.nn.Parameter(torch.zeros(11, head_dim))
        for blk in enc.blocks:
            for p in (blk.attn.rel_pos_h, blk.attn.rel_pos_w):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
        # logits of a few units and IoU predictions around 0.5, as a trained SAM has them, so
        # the generator's thresholds keep some masks and drop others
        dec = sam.mask_decoder
        for mlp in dec.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(30.0)
        dec.iou_prediction_head.layers[-1].bias.add_(0.6)


def main():
    sam = build(CFG)
    randomise_(sam, 1)
    sam.eval()
    os.makedirs(OUT, exist_ok=True)
    state = {k: v.contiguous() for k, v in sam.state_dict().items()}
    save_file(state, os.path.join(OUT, "model.safetensors"))
    with open(os.path.join(OUT, "config.json"), "w") as f:
        json.dump(CFG, f, indent=2)
        f.write("\n")

    photo = np.array(Image.open(PHOTO).convert("RGB").crop(PHOTO_CROP))
    Image.fromarray(photo).save(os.path.join(FIX, "sam-photo.png"), optimize=True)
    # the stored PNG gives back the same pixels
    assert (np.array(Image.open(os.path.join(FIX, "sam-photo.png"))) == photo).all()

    ref = {}
    predictor = SamPredictor(sam)
    predictor.set_image(photo)
    resized = predictor.transform.apply_image(photo)
    x = torch.as_tensor(resized).permute(2, 0, 1).contiguous()[None]
    ref["input"] = sam.preprocess(x.float())
    ref["input_size"] = torch.tensor(predictor.input_size, dtype=torch.int64)
    ref["embedding"] = predictor.features
    ref["boxes"] = torch.tensor(BOXES, dtype=torch.float32)
    for multimask, tag in ((True, "multi"), (False, "single")):
        lows, ious = [], []
        for box in BOXES:
            _, iou, low = predictor.predict(box=np.array(box, dtype=np.float32), multimask_output=multimask)
            lows.append(torch.from_numpy(low))
            ious.append(torch.from_numpy(iou))
        ref[f"low_res_{tag}"] = torch.stack(lows)
        ref[f"iou_{tag}"] = torch.stack(ious)
    masks, _, _ = predictor.predict(box=np.array(BOXES[0], dtype=np.float32), multimask_output=False)
    mask = masks[0].astype(np.uint8) * 255
    Image.fromarray(mask).save(os.path.join(FIX, "sam-reference-mask.png"), optimize=True)
    print(f"box 0 mask: {mask.mean() / 255:.3f} of the photo")

    # point prompts as the automatic mask generator makes them (float64 positions, padding point)
    pts = build_point_grid(2) * np.array(photo.shape[:2])[None, ::-1]
    tp = torch.as_tensor(predictor.transform.apply_coords(pts, photo.shape[:2]))
    with torch.no_grad():
        _, iou, low = predictor.predict_torch(tp[:, None, :], torch.ones(len(pts), 1, dtype=torch.int), multimask_output=True)
    ref["points"] = torch.from_numpy(pts)
    ref["low_res_points"] = low
    ref["iou_points"] = iou

    # the random model's masks all cover most of the photo, so their boxes nearly coincide: box
    # NMS at 0.7 keeps one, at 1.0 (nothing suppressed) all that pass the thresholds
    for nms_thresh, tag in ((1.0, "amg"), (0.7, "amg_nms")):
        anns = SamAutomaticMaskGenerator(sam, box_nms_thresh=nms_thresh, **AMG).generate(photo)
        print(f"automatic mask generator, box NMS {nms_thresh}: {len(anns)} masks kept")
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        ref[f"{tag}_boxes"] = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        ref[f"{tag}_iou"] = torch.tensor([a["predicted_iou"] for a in anns], dtype=torch.float32)
        ref[f"{tag}_stability"] = torch.tensor([a["stability_score"] for a in anns], dtype=torch.float32)
        ref[f"{tag}_area"] = torch.tensor([a["area"] for a in anns], dtype=torch.int64)
    assert len(ref["amg_iou"]) > len(ref["amg_nms_iou"]) > 0

    # helpers on their own
    g = torch.Generator().manual_seed(5)
    ref["grid_16"] = torch.from_numpy(build_point_grid(16))
    table = torch.randn(7, 4, generator=g)
    ref["rel_pos_table"] = table
    ref["rel_pos_3_3"] = get_rel_pos(3, 3, table)
    ref["rel_pos_2_4"] = get_rel_pos(2, 4, table)
    low = torch.randn(1, 1, 32, 32, generator=g)
    ref["post_low"] = low
    with torch.no_grad():
        ref["post_out"] = sam.postprocess_masks(low, (64, 54), (150, 127))
    logits = 2 * torch.randn(3, 40, 50, generator=g)
    ref["stability_logits"] = logits
    ref["stability"] = calculate_stability_score(logits, 0.0, 1.0)
    xy = torch.rand(40, 2, generator=g) * 50
    wh = torch.rand(40, 2, generator=g) * 30
    ref["nms_boxes"] = torch.cat([xy, xy + wh], dim=1)
    ref["nms_scores"] = torch.rand(40, generator=g)
    ref["nms_keep"] = nms(ref["nms_boxes"], ref["nms_scores"], 0.3)

    ref = {k: v.contiguous() for k, v in ref.items()}
    save_file(ref, os.path.join(FIX, "sam-reference.safetensors"))
    for name in ("tiny-sam/model.safetensors", "sam-photo.png", "sam-reference-mask.png", "sam-reference.safetensors"):
        print(f"{name}: {os.path.getsize(os.path.join(FIX, name)) / 1e3:.0f} kB")
    print("iou multi:", ref["iou_multi"].tolist())
    print("iou single:", ref["iou_single"].tolist())


if __name__ == "__main__":
    sys.exit(main())
