"""The pre-training set: FractalDB-style classes, optionally with Fashion-MNIST's 60,000 training images.

Fractals alone gave a backbone whose features added nothing over raw pixels on the demo's tasks (the README records
the probe). Fashion-MNIST (MIT; Debian's `dataset-fashion-mnist`) adds real photographs' statistics: smooth surfaces,
edges and textures of objects. Its 10 classes follow the fractal classes in one label space, so one head classifies
both. Its images stay grey: a random tint per image (measured: 300 steps on Fashion-MNIST alone, a 12-block ViT) held
training accuracy at 13% where grey images reached 36%, and a random background colour as well at chance (10.6%).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qtune.data.real_images import fashion_mnist
from qtune.pretrain.fractal import FractalDataset

SOURCES = ("fractal", "fractal+fashion_mnist")
FASHION_CLASSES = 10


def fashion_set(size: int, split: str, offset: int = 0, limit: int | None = None) -> FractalDataset:
    """Fashion-MNIST's `split` (its first `limit` images), centred in a size x size black frame, labels + offset."""
    images, labels = fashion_mnist(split)
    images, labels = images[:limit], labels[:limit]
    pad = (size - images.shape[1]) // 2
    if pad < 0:
        raise ValueError(f"Fashion-MNIST's 28 px images need img_size >= 28, not {size}")
    framed = np.zeros((len(images), size, size), np.uint8)  # black, as Fashion-MNIST's own border is
    framed[:, pad : pad + images.shape[1], pad : pad + images.shape[2]] = images
    return FractalDataset(np.repeat(framed[..., None], 3, axis=-1), labels + offset)


def build(
    source: str, num_classes: int, images_per_class: int, size: int, seed: int, stream: int,
    cache: Path | None = None, fashion_limit: int | None = None,
) -> FractalDataset:
    """The fractal classes (rendered, or read back from `cache`), then Fashion-MNIST's images if `source` says so."""
    if source not in SOURCES:
        raise ValueError(f"unknown pre-training data {source!r} (choose from {', '.join(SOURCES)})")
    fractal = FractalDataset.build(num_classes, images_per_class, size, seed, stream, cache=cache)
    if source == "fractal":
        return fractal
    fashion = fashion_set(size, "train", offset=num_classes, limit=fashion_limit)
    return FractalDataset(np.concatenate([fractal.images, fashion.images]),
                          np.concatenate([fractal.labels, fashion.labels]))


def num_labels(source: str, num_classes: int) -> int:
    return num_classes + (FASHION_CLASSES if source == "fractal+fashion_mnist" else 0)
