import pytest
import torch
from safetensors.torch import save_file

from qtune.backbones import load_backbone
from qtune.errors import ConfigError, WeightsError
from tests.conftest import TINY, TINY_NAME, tiny_backbone


@pytest.fixture
def source():
    return load_backbone(TINY_NAME, model_args=TINY, init_seed=7)


def _load(path):
    return load_backbone(TINY_NAME, path, model_args=TINY)


def test_random_init_is_reproducible_and_seeded():
    assert tiny_backbone().identity.weights_hash == tiny_backbone().identity.weights_hash
    assert load_backbone(TINY_NAME, model_args=TINY, init_seed=1).identity != tiny_backbone().identity


def test_safetensors_and_pth_give_the_same_identity(source, tmp_path):
    sd = source.model.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    torch.save(sd, tmp_path / "w.pth")
    for f in ("w.safetensors", "w.pth"):
        assert _load(tmp_path / f).identity.weights_hash == source.identity.weights_hash


@pytest.mark.parametrize("layout", ["mae", "mocov3", "dino"])
def test_training_checkpoint_layouts(source, tmp_path, layout):
    sd = source.model.state_dict()
    if layout == "mae":  # {'model': encoder + decoder + mask token}
        ckpt = {"model": {**sd, "mask_token": torch.zeros(1, 1, 48), "decoder_embed.weight": torch.zeros(4, 48)}}
    elif layout == "mocov3":  # both encoders under module.
        ckpt = {"state_dict": {**{f"module.base_encoder.{k}": v for k, v in sd.items()},
                               **{f"module.momentum_encoder.{k}": v + 1 for k, v in sd.items()}}}
    else:  # DINO teacher: backbone + projection head
        ckpt = {"teacher": {**{f"backbone.{k}": v for k, v in sd.items()}, "head.mlp.0.weight": torch.zeros(3, 3)}}
    torch.save(ckpt, tmp_path / "ckpt.pth")
    assert _load(tmp_path / "ckpt.pth").identity.weights_hash == source.identity.weights_hash


def test_other_architecture_names_the_mismatched_keys(tmp_path):
    other = load_backbone(TINY_NAME, model_args={**TINY, "depth": 2})
    torch.save(other.model.state_dict(), tmp_path / "other.pth")
    with pytest.raises(WeightsError, match=r"missing: blocks\.2\."):
        _load(tmp_path / "other.pth")
    wide = load_backbone(TINY_NAME, model_args={**TINY, "embed_dim": 96})
    torch.save(wide.model.state_dict(), tmp_path / "wide.pth")
    with pytest.raises(WeightsError, match="wrong shape"):
        _load(tmp_path / "wide.pth")


def test_unreadable_and_missing_files(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="bad.pth: cannot read"):
        _load(tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match="not found"):
        _load(tmp_path / "absent.safetensors")
    (tmp_path / "bad.npz").write_bytes(b"zzz")
    with pytest.raises(WeightsError, match="bad.npz"):
        _load(tmp_path / "bad.npz")


def test_hub_folder_layout(source, tmp_path):
    import json

    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    cfg = {"architecture": TINY_NAME, "pretrained_cfg": {"mean": [0.1, 0.2, 0.3], "std": [1, 1, 1],
                                                         "input_size": [3, 32, 32], "interpolation": "bilinear"}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    bb = load_backbone(None, tmp_path, model_args=TINY)
    assert bb.identity.weights_hash == source.identity.weights_hash
    assert bb.preprocessing.mean == (0.1, 0.2, 0.3) and bb.preprocessing.interpolation == "bilinear"


def test_hub_name_reaches_timm_loader(monkeypatch):
    """With pretrained=True the hub path is timm's own; stop it where it would reach the network."""
    import timm.models._builder as builder

    calls = []

    def fake_load_pretrained(model, pretrained_cfg=None, **kwargs):
        calls.append(pretrained_cfg)
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(builder, "load_pretrained", fake_load_pretrained)
    with pytest.raises(ConnectionError):
        load_backbone("vit_base_patch16_224.augreg_in21k", pretrained=True)
    assert calls and calls[0]["hf_hub_id"].startswith("timm/vit_base_patch16_224.augreg_in21k")


def test_unknown_model():
    with pytest.raises(ConfigError, match="unknown timm model"):
        load_backbone("no_such_model")
