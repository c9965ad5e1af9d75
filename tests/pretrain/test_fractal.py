"""FractalDB-style rendering and the resumable pre-training loop, on tiny settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

from qtune.pretrain.fractal import FractalDataset, render, render_dataset, sample_classes, sample_ifs
from qtune.pretrain.train import pretrain

TINY = dict(
    data="fractal",
    img_size=16,
    patch_size=4,
    embed_dim=32,
    depth=2,
    num_heads=2,
    num_classes=4,
    images_per_class=16,
    eval_images_per_class=4,
    batch_size=16,
    steps=20,
    threads=1,
    log_every=5,
)


def _singular_values(ifs: np.ndarray) -> np.ndarray:
    return np.stack([np.linalg.svd(row[:4].reshape(2, 2), compute_uv=False) for row in ifs])


def test_sampled_systems_are_contractive_and_proper() -> None:
    rng = np.random.default_rng(0)
    for _ in range(10):
        ifs = sample_ifs(rng)
        assert ifs.shape[1] == 7 and 2 <= len(ifs) <= 4
        assert (_singular_values(ifs) < 1).all()
        assert np.isclose(ifs[:, 6].sum(), 1) and (ifs[:, 6] > 0).all()


def test_rendering_is_deterministic_and_not_degenerate() -> None:
    systems = sample_classes(6, seed=5)
    for a, b in zip(systems, sample_classes(6, seed=5), strict=True):
        np.testing.assert_array_equal(a, b)
    img = render(systems[0], np.random.default_rng(1), 32)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(img, render(systems[0], np.random.default_rng(1), 32))
    assert not np.array_equal(img, render(systems[0], np.random.default_rng(2), 32))
    images, labels = render_dataset(systems, 8, 32, seed=5)
    assert images.shape == (48, 32, 32, 3) and np.bincount(labels).tolist() == [8] * 6
    lit = (images.max(axis=-1) > 24).mean(axis=(1, 2))
    assert lit.min() > 0.01 and lit.mean() > 0.05  # every image shows a fractal
    assert lit.max() < 0.9  # and none is a filled square
    assert images.reshape(48, -1).std(axis=1).min() > 5


def test_dataset_cache_round_trip(tmp_path: Path) -> None:
    a = FractalDataset.build(3, 4, 16, seed=0, cache=tmp_path / "train.npy")
    b = FractalDataset.build(3, 4, 16, seed=0, cache=tmp_path / "train.npy")
    assert isinstance(b.images, np.memmap)
    np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))
    x, y = b.batch(np.array([0, 5]))
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32 and y.tolist() == [0, 2]


def _load_backbone(path: Path, card: dict) -> VisionTransformer:
    weights = load_file(str(path))
    assert not any(k.startswith("head") for k in weights)
    assert "blocks.0.attn.qkv.weight" in weights and "norm.weight" in weights
    model = timm.create_model(card["architecture"], **card["model_args"], num_classes=0)
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    assert isinstance(model, VisionTransformer)
    return model


def test_smoke_run_writes_backbone_and_card(tmp_path: Path) -> None:
    out = tmp_path / "vit.safetensors"
    card = pretrain(out, **TINY)
    assert card["complete"] and card["training"]["steps"] == 20
    assert json.loads(out.with_suffix(".json").read_text()) == json.loads(json.dumps(card))
    model = _load_backbone(out, card)
    assert model(torch.zeros(1, 3, 16, 16)).shape == (1, 32)
    assert 0.0 <= card["eval"]["held_out_top1"] <= 1.0 and card["eval"]["num_images"] == 16
    assert card["data"]["num_classes"] == 4 and card["data"]["images_per_class"] == 16
    assert card["training"]["threads"] == 1 and card["training"]["wall_time_s"] >= 0
    assert not (tmp_path / "vit.work" / "checkpoint.safetensors").exists()
    assert pretrain(out, **TINY)["weights"]["sha256"] == card["weights"]["sha256"]  # complete: reused
    for changed in ({"lr": 0.5}, {"steps": 30}):
        with pytest.raises(ValueError, match="another recipe"):
            pretrain(out, **{**TINY, **changed})


def test_interrupted_run_resumes_where_it_stopped(tmp_path: Path) -> None:
    pretrain(tmp_path / "a.safetensors", **TINY, save_dtype="float32")
    partial = pretrain(tmp_path / "b.safetensors", **TINY, save_dtype="float32", stop_after_steps=12)
    assert partial == {
        "complete": False,
        "step": 12,
        "total_steps": 20,
        "checkpoint": str(tmp_path / "b.work" / "checkpoint.safetensors"),
    }
    assert not (tmp_path / "b.safetensors").exists()
    with pytest.raises(ValueError, match="another recipe"):
        pretrain(tmp_path / "b.safetensors", **{**TINY, "seed": 1}, save_dtype="float32")
    resumed = pretrain(tmp_path / "b.safetensors", **TINY, save_dtype="float32")
    assert resumed["training"]["steps"] == 20 and resumed["training"]["resumed_at"] == [12]
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    for k in a:  # resuming replays exactly the same batches, augmentations and learning rates
        assert torch.equal(a[k], b[k]), k


def test_hub_layout_gets_config_json(tmp_path: Path) -> None:
    card = pretrain(tmp_path / "model.safetensors", **{**TINY, "steps": 2})
    assert json.loads((tmp_path / "config.json").read_text())["weights"]["sha256"] == card["weights"]["sha256"]
    _load_backbone(tmp_path / "model.safetensors", card)


HIERARCHICAL = {
    "swin": {"architecture": "swin_tiny_patch4_window7_224", "img_size": 16, "patch_size": 2, "embed_dim": 8,
             "depths": [1, 1, 2, 1], "num_heads": [1, 1, 2, 2], "window_size": 2},
    "convnext": {"architecture": "convnext_tiny", "patch_size": 1, "depths": [1, 1, 1, 2], "dims": [8, 8, 16, 16]},
}


@pytest.mark.parametrize("kind", HIERARCHICAL)
def test_a_hierarchical_model_pretrains_into_a_stage_backbone(tmp_path: Path, kind: str) -> None:
    from qtune.backbones import StageBackbone, load_backbone

    arch = HIERARCHICAL[kind]
    card = pretrain(tmp_path / "model.safetensors", **{**TINY, "steps": 3}, timm_model=json.dumps(arch),
                    save_dtype="float32")
    assert card["architecture"] == arch["architecture"] and card["recipe"]["timm_model"] == json.dumps(arch)
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert not any(k.startswith("head.fc") for k in weights)  # the classifier goes; ConvNeXt's head.norm stays
    assert ("head.norm.weight" in weights) == (kind == "convnext")
    bb = load_backbone(None, tmp_path)  # the folder's config.json names the architecture
    assert isinstance(bb, StageBackbone) and bb.kind == kind and bb.preprocessing.input_size == (16, 16)
    state = bb.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items())
    assert bb.trace(torch.zeros(2, 3, 16, 16)).pooled.shape == (2, bb.pooled_dim)


def test_a_timm_model_without_an_architecture_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="architecture"):
        pretrain(tmp_path / "model.safetensors", **TINY, timm_model='{"depths": [1, 1, 1, 1]}')
