"""The pre-training set: fractal classes and Fashion-MNIST in one label space."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qtune.data.real_images import FASHION_MNIST_DIR, fashion_mnist
from qtune.pretrain import data
from qtune.pretrain.train import pretrain

needs_fashion = pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Debian's dataset-fashion-mnist not installed")


def test_unknown_source_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown pre-training data"):
        data.build("imagenet", 2, 2, 16, 0, 1)


@needs_fashion
def test_fashion_images_join_the_fractal_label_space(tmp_path: Path) -> None:
    mixed = data.build("fractal+fashion_mnist", 3, 4, 32, 0, 1, fashion_limit=10)
    assert len(mixed) == 12 + 10 and mixed.images.shape == (22, 32, 32, 3)
    assert set(mixed.labels[:12]) == {0, 1, 2} and mixed.labels[12:].min() >= 3 and mixed.labels[12:].max() < 13
    fashion = mixed.images[12:]
    assert (fashion[:, :2] == 0).all() and (fashion[:, :, -2:] == 0).all()  # 28 px centred in a black 32 px frame
    raw, labels = fashion_mnist("train")
    assert np.array_equal(fashion[:, 2:30, 2:30], np.repeat(raw[:10, ..., None], 3, axis=-1))
    assert np.array_equal(mixed.labels[12:], labels[:10] + 3)
    assert data.num_labels("fractal+fashion_mnist", 3) == 13 and data.num_labels("fractal", 3) == 3


@needs_fashion
def test_pretraining_on_both_reports_fashion_mnist_test_accuracy(tmp_path: Path) -> None:
    tiny = dict(data="fractal+fashion_mnist", fashion_images=64, img_size=32, patch_size=8, embed_dim=32, depth=1,
                num_heads=2, num_classes=3, images_per_class=8, eval_images_per_class=2, batch_size=16, steps=3,
                threads=1, log_every=1)
    card = pretrain(tmp_path / "model.safetensors", **tiny)
    assert card["data"]["source"] == "fractal+fashion_mnist" and card["data"]["fashion_mnist_images"] == 64
    assert card["eval"]["fashion_mnist_test_images"] == 10_000
    assert 0.0 <= card["eval"]["fashion_mnist_test_top1"] <= 1.0
    assert card["training"]["epochs"] == round(3 * 16 / (3 * 8 + 64), 2)
    assert json.loads((tmp_path / "config.json").read_text())["recipe"]["data"] == "fractal+fashion_mnist"
    assert np.isfinite(card["eval"]["held_out_top1"])
