"""Small generated image datasets for tests and the quick example: coloured shapes, one class per shape/colour."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

_SHAPES = ("square", "circle", "triangle", "cross")
_COLOURS = ((220, 60, 60), (60, 200, 60), (70, 90, 230), (230, 200, 50))


def _draw(shape: str, colour: tuple[int, int, int], size: int, rng: np.random.Generator) -> Image.Image:
    bg = tuple(int(c) for c in rng.integers(0, 90, 3))
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    r = rng.uniform(0.2, 0.35) * size
    cx, cy = rng.uniform(r, size - r, 2)
    jitter = tuple(int(np.clip(c + rng.integers(-30, 31), 0, 255)) for c in colour)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "square":
        d.rectangle(box, fill=jitter)
    elif shape == "circle":
        d.ellipse(box, fill=jitter)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=jitter)
    else:
        w = r / 3
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=jitter)
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=jitter)
    arr = np.asarray(im, dtype=np.int16) + rng.integers(-12, 13, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_shapes(root: Path, num_classes: int = 4, per_class: int = 40, size: int = 32, seed: int = 0) -> Path:
    """Write an image folder (one sub-folder per class); class c is shape c with colour c (both cue the label)."""
    if not 1 <= num_classes <= len(_SHAPES):
        raise ValueError(f"num_classes must be in 1..{len(_SHAPES)}")
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        d = root / f"{c}_{_SHAPES[c]}"
        d.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            _draw(_SHAPES[c], _COLOURS[c], size, rng).save(d / f"{j:04d}.png")
    return root
