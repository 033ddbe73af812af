#!/usr/bin/env python3
"""Pillow's resizes of one small image, for services/imaging/tests/pillow.rs.

Run by a developer in a venv with pillow and numpy (CI reads the committed PNGs):

    python scripts/parity/make_resample_fixtures.py

Writes services/imaging/fixtures/resample/input.png (a seeded random 37x23 RGB image with a
few flat areas and sharp edges), input-gray.png, and one PNG per (filter, size):
<filter>-<w>x<h>.png and gray-<filter>-<w>x<h>.png, each what `Image.resize((w, h), filter)`
returns. Sizes cover down- and up-sampling on each axis and one axis only.
"""
import os

import numpy as np
from PIL import Image

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "services", "imaging", "fixtures", "resample")
FILTERS = {
    "nearest": Image.NEAREST,
    "box": Image.BOX,
    "bilinear": Image.BILINEAR,
    "hamming": Image.HAMMING,
    "bicubic": Image.BICUBIC,
    "lanczos": Image.LANCZOS,
}
SIZES = [(16, 11), (64, 50), (37, 5), (80, 23), (7, 40)]


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(23, 37, 3), dtype=np.uint8)
    a[2:9, 3:20] = (250, 10, 30)
    a[12:, 25:] = 0
    a[:, 30] = 255
    rgb = Image.fromarray(a, "RGB")
    gray = rgb.convert("L")
    rgb.save(os.path.join(OUT, "input.png"))
    gray.save(os.path.join(OUT, "input-gray.png"))
    for name, f in FILTERS.items():
        for w, h in SIZES:
            rgb.resize((w, h), f).save(os.path.join(OUT, f"{name}-{w}x{h}.png"))
            gray.resize((w, h), f).save(os.path.join(OUT, f"gray-{name}-{w}x{h}.png"))
    print(f"wrote {len(FILTERS) * len(SIZES) * 2 + 2} files to {OUT}")


if __name__ == "__main__":
    main()
