"""Backbones: load a timm ViT, Swin or ConvNeXt by name, from a local weights file or (with a network) the hub."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import timm
import torch

from ..errors import ConfigError, WeightsError
from ..preprocessing import Preprocessing
from .points import POINTS, Point
from .stages import ConvNeXtBackbone, StageBackbone, SwinBackbone, stage_backbone_class
from .taps import Taps
from .vit import Backbone, BackboneIdentity, QueryOutput
from .weights import load_into, weights_hash

__all__ = ["POINTS", "Backbone", "BackboneIdentity", "BackboneSpec", "ConvNeXtBackbone", "Point", "QueryOutput",
           "StageBackbone", "SwinBackbone", "Taps", "check_weights_source", "demo_weights", "load_backbone"]

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def demo_weights() -> Path:
    """The demo backbone shipped in the package (``--weights demo``): a folder in timm's hub layout."""
    from importlib import resources

    return Path(str(resources.files("qtune") / "assets" / "demo_vit"))


def check_weights_source(name: str | None, weights: Any, pretrained: bool, random_init: bool,
                         spelled: Callable[[str], str] = str) -> None:
    """Refuse a backbone named without weights unless random weights are asked for: features of a random backbone
    train to a result that looks like any other, so they never come by default. ``spelled`` writes a field the way
    the user gives it (a flag, a spec field)."""
    given = [f for f, v in (("weights", weights), ("pretrained", pretrained)) if v]
    if random_init and given:
        raise ConfigError(f"{spelled('random_init')} conflicts with {spelled(given[0])}: give one")
    if name and not given and not random_init:
        raise ConfigError(f"backbone {name!r} has no weights: give {spelled('weights')} or {spelled('pretrained')}, "
                          f"or {spelled('random_init')} to use random weights (nothing pretrained to transfer)")


def _resolve_weights_dir(path: Path) -> tuple[Path, dict[str, Any]]:
    """A folder in timm's hub layout: a weights file + config.json (architecture, pretrained_cfg)."""
    cfg_file = path / "config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    for fname in _WEIGHT_FILES:
        if (path / fname).is_file():
            return path / fname, cfg
    raise WeightsError(f"{path}: folder holds none of {', '.join(_WEIGHT_FILES)}")


def load_backbone(
    name: str | None,
    weights: str | Path | None = None,
    *,
    pretrained: bool = False,
    model_args: dict[str, Any] | None = None,
    preprocessing: dict[str, Any] | None = None,
    init_seed: int = 0,
) -> Backbone:
    """Build a frozen timm ViT, or a Swin or ConvNeXt whose chosen stage side paths read (``stages.py``).

    name: a timm model name (``vit_base_patch16_224``, optionally with a ``.tag`` selecting the pretrained config);
        may be omitted when ``weights`` is a folder whose config.json names the architecture.
    weights: a local file (.safetensors/.pth/.bin/.npz), a folder in timm's hub layout (whose config.json names the
        architecture, so ``name`` may be omitted), or ``"demo"`` for the shipped demo backbone. Without it, the weights
        are random (seeded by ``init_seed``, so the identity is reproducible) unless ``pretrained`` asks timm for
        the hub weights, which needs a network.
    model_args: keyword arguments for the timm constructor (img_size, depth, global_pool, ...).
    preprocessing: overrides of input_size / interpolation / mean / std.
    """
    model_args = dict(model_args or {})
    pretrained_cfg: dict[str, Any] | None = None
    weights_path = demo_weights() if weights == "demo" else Path(weights) if weights is not None else None
    if weights_path is not None and weights_path.is_dir():
        folder = weights_path
        weights_path, cfg = _resolve_weights_dir(folder)
        arch = cfg.get("architecture")
        if name and arch and name.split(".")[0] != arch.split(".")[0]:
            raise WeightsError(f"{folder}: holds a {arch} (its config.json), not a {name}: drop --backbone or give "
                               f"weights of that architecture")
        name = name or arch
        pretrained_cfg = cfg.get("pretrained_cfg")
        model_args = {**cfg.get("model_args", {}), **model_args}  # the folder's architecture, then the caller's
    if weights_path is not None and not weights_path.exists():
        raise WeightsError(f"{weights_path}: weights file not found")
    if not name:
        raise ConfigError("a backbone name is needed (e.g. vit_base_patch16_224)")
    kwargs: dict[str, Any] = dict(model_args, num_classes=0)
    if pretrained_cfg is not None:
        kwargs["pretrained_cfg"] = pretrained_cfg
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model = timm.create_model(name, pretrained=pretrained and weights_path is None, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ConfigError(f"unknown timm model {name!r}") from e
        raise
    except TypeError as e:
        raise ConfigError(f"backbone {name!r}: bad model argument ({e})") from e
    if weights_path is not None:
        load_into(model, weights_path)
    data_config = timm.data.resolve_model_data_config(model)
    # The model's own input size wins over the pretrained config's (img_size may have been overridden).
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)  # ConvNeXt has no fixed size
    if img_size is not None:
        data_config["input_size"] = (3, *img_size)
    prep = Preprocessing.from_timm(data_config).override(**(preprocessing or {}))
    identity = BackboneIdentity(name, weights_hash(model), {k: v for k, v in model_args.items()})
    return (stage_backbone_class(model) or Backbone)(model, identity, prep)


_SPEC_SPELLING = {"weights": 'weights = "FILE"', "pretrained": "pretrained = true", "random_init": "random_init = true"}


@dataclass
class BackboneSpec:
    """A backbone as a run, a sweep spec or a checkpoint records it: what ``load`` builds."""

    name: str | None = None
    weights: str | None = None
    pretrained: bool = False
    model_args: dict[str, Any] = field(default_factory=dict)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    init_seed: int = 0
    random_init: bool = False  # a named backbone without weights: random weights, only when asked for

    def __post_init__(self) -> None:
        for name in ("pretrained", "random_init"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        check_weights_source(self.name, self.weights, self.pretrained, self.random_init, _SPEC_SPELLING.get)
        if self.weights == "demo":  # recorded as the real folder, so that checkpoints and caches point at it
            self.weights = str(demo_weights())

    def load(self) -> Backbone:
        return load_backbone(self.name, self.weights, pretrained=self.pretrained, model_args=self.model_args,
                             preprocessing=self.preprocessing, init_seed=self.init_seed)
