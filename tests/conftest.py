"""Shared fixtures: tiny random ViTs and a small generated image-folder dataset. No network, no GPU."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qtune.backbones import Backbone, load_backbone
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
