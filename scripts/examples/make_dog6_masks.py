#!/usr/bin/env python3
"""Subject masks for examples/dog6, by colour keying against the studio background.

The three dog6 photos are taken against one seamless orange backdrop, so the subject is every
pixel whose colour is not the backdrop's: the backdrop colour is the median (in HSV, after a
light blur) of the image border, and a pixel is "backdrop" when its hue is within HUE of it and
it is at least as saturated and bright as the backdrop less SAT and VAL (the dog's tan fur has
the same hue but is duller and darker). The subject is the largest connected region of the
rest, holes filled (the green leaf at the edge of 00.jpg is a separate region and dropped). Run once by a
developer (numpy and pillow; e.g. the parity venv):

    python scripts/examples/make_dog6_masks.py

writes examples/dog6/masks/NN.png (white = subject), which `sidbooth dev --demo` uploads with
the photos so the demo report has the mask-based measures.
"""
import os
from collections import deque

import numpy as np
from PIL import Image, ImageFilter

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DIR = os.path.join(ROOT, "examples", "dog6")
HUE, SAT, VAL = 12.0, 35.0, 30.0


def largest_component(mask):
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    best = None
    for y0 in range(h):
        for x0 in range(w):
            if not mask[y0, x0] or seen[y0, x0]:
                continue
            queue, pixels = deque([(y0, x0)]), []
            seen[y0, x0] = True
            while queue:
                y, x = queue.popleft()
                pixels.append((y, x))
                for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
            if best is None or len(pixels) > len(best):
                best = pixels
    out = np.zeros_like(mask, dtype=bool)
    for y, x in best or []:
        out[y, x] = True
    return out


def fill_holes(mask):
    # Background = what the border reaches through non-subject pixels; the rest is subject.
    outside = largest_component_from_border(~mask)
    return ~outside


def largest_component_from_border(free):
    h, w = free.shape
    seen = np.zeros_like(free, dtype=bool)
    queue = deque()
    for y in range(h):
        for x in (0, w - 1):
            if free[y, x] and not seen[y, x]:
                seen[y, x] = True
                queue.append((y, x))
    for x in range(w):
        for y in (0, h - 1):
            if free[y, x] and not seen[y, x]:
                seen[y, x] = True
                queue.append((y, x))
    while queue:
        y, x = queue.popleft()
        for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            ny, nx = y + dy, x + dx
            if 0 <= ny < h and 0 <= nx < w and free[ny, nx] and not seen[ny, nx]:
                seen[ny, nx] = True
                queue.append((ny, nx))
    return seen


def mask_of(path):
    photo = Image.open(path).convert("RGB")
    # Work at a quarter of the size (fast, and smooths JPEG noise), then scale back.
    small = photo.resize((photo.width // 4, photo.height // 4), Image.BILINEAR)
    small = small.filter(ImageFilter.GaussianBlur(1))
    hsv = np.asarray(small.convert("HSV")).astype(np.float32)
    border = np.concatenate([hsv[0], hsv[-1], hsv[:, 0], hsv[:, -1]])
    h0, s0, v0 = np.median(border, axis=0)
    hue_distance = np.abs((hsv[..., 0] - h0 + 128) % 256 - 128)
    backdrop = (hue_distance < HUE) & (hsv[..., 1] > s0 - SAT) & (hsv[..., 2] > v0 - VAL)
    subject = fill_holes(largest_component(~backdrop))
    mask = Image.fromarray((subject * 255).astype(np.uint8), "L")
    return mask.resize(photo.size, Image.NEAREST)


def main():
    out = os.path.join(DIR, "masks")
    os.makedirs(out, exist_ok=True)
    for name in sorted(os.listdir(DIR)):
        if name.endswith(".jpg"):
            mask = mask_of(os.path.join(DIR, name))
            target = os.path.join(out, name[:-4] + ".png")
            mask.save(target, optimize=True)
            cover = np.asarray(mask).astype(bool).mean()
            print(f"{target}: {cover:.1%} of the photo")


if __name__ == "__main__":
    main()
