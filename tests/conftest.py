"""Shared fixtures: tiny random ViTs and a small generated image-folder dataset. No network, no GPU."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from qtune.backbones import Backbone, load_backbone
from qtune.data import read_split
from qtune.data.synthetic import make_shapes

# Tiny models: per-op overhead dominates, and extra threads only contend.
torch.set_num_threads(1)

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 3, "num_heads": 3}
TINY_NAME = "vit_tiny_patch16_224"


def tiny_backbone(**overrides) -> Backbone:
    return load_backbone(TINY_NAME, model_args={**TINY, **overrides})


@pytest.fixture
def backbone() -> Backbone:
    return tiny_backbone()


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> Path:
    """train/val/test image folders of 4 shape classes, 32 px."""
    root = tmp_path_factory.mktemp("shapes")
    for split, n, seed in (("train", 40, 0), ("val", 10, 1), ("test", 20, 2)):
        make_shapes(root / split, per_class=n, seed=seed)
    return root


@pytest.fixture(scope="module")
def task(shapes, tmp_path_factory) -> Path:
    """A VTAB-1k style task folder of the shapes images: train800 24, val200 8, test 16 (4 classes)."""
    root = tmp_path_factory.mktemp("task") / "shapes4"
    root.mkdir()
    train = read_split(shapes / "train").samples
    test = read_split(shapes / "test").samples
    pick = {"train800": [s for c in range(4) for s in [t for t in train if t[1] == c][:6]],
            "val200": [s for c in range(4) for s in [t for t in train if t[1] == c][6:8]],
            "test": test[::5][:16]}
    pick["train800val200"] = pick["train800"] + pick["val200"]
    for split, samples in pick.items():
        base = shapes / ("test" if split == "test" else "train")
        lines = []
        for rel, y in samples:
            name = f"images/{base.name}_{rel.replace('/', '_')}"
            (root / name).parent.mkdir(exist_ok=True)
            shutil.copy2(base / rel, root / name)
            lines.append(f"{name} {y}\n")
        (root / f"{split}.txt").write_text("".join(lines))
    return root
