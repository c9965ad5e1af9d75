"""Adapter-only checkpoints: trainable tensors (safetensors) + method config and backbone identity (JSON).

The frozen backbone is never written; loading rebuilds the method on a backbone and refuses one whose identity
(name + weights hash) differs from the one it was trained on.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..backbones import Backbone
from ..backbones.vit import identity_difference
from ..errors import CheckpointError, WeightsError
from ..io import atomic_write, file_sha256, write_json
from ..tuned import TunedModel

TENSORS = "adapter.safetensors"
CONFIG = "adapter_config.json"
FORMAT_VERSION = 1


def save_adapter(directory: Path, model: TunedModel, classes: Sequence[str], extra: dict[str, Any] | None = None) -> None:
    """Write the trainable tensors and everything needed to rebuild them on the same backbone."""
    tensors = {n: p.detach().cpu().contiguous() for n, p in model.trainable_parameters().items()}
    atomic_write(directory / TENSORS, lambda p: save_file(tensors, str(p), metadata={"format": "qtune-adapter"}))
    write_json(directory / CONFIG, {
        "format_version": FORMAT_VERSION,
        "tensors_sha256": file_sha256(directory / TENSORS),
        "method": model.method.name,
        "method_config": model.method.config.to_dict(),
        "num_classes": model.method.num_classes,
        "classes": list(classes),
        "backbone": model.backbone.identity.to_dict(),
        "preprocessing": model.backbone.preprocessing.to_dict(),
        **(extra or {}),
    })


def read_adapter_config(directory: Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (is {directory} a qtune checkpoint folder?)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt JSON ({e})") from None
    for key in ("method", "method_config", "num_classes", "backbone"):
        if key not in cfg:
            raise CheckpointError(f"{path}: field {key!r} missing")
    return cfg


def _described(identity: dict[str, Any], weights: str | None) -> str:
    """A backbone in words: name, where its weights came from, their hash."""
    return (f"{identity['name']} ({weights or 'no weights file: random or hub weights'}, "
            f"weights hash {identity['weights_hash'][:12]})")


def load_adapter(directory: Path, backbone: Backbone, weights: str | Path | None = None
                 ) -> tuple[TunedModel, dict[str, Any]]:
    """Rebuild the tuned model from ``directory`` on ``backbone``, after checking it is the same backbone.
    ``weights``: the file ``backbone`` was loaded from, named in the error if it is another backbone."""
    directory = Path(directory)
    cfg = read_adapter_config(directory)
    diff = identity_difference(cfg["backbone"], backbone.identity.to_dict(), "in training")
    if diff:
        was = _described(cfg["backbone"], cfg.get("backbone_weights"))
        now = _described(backbone.identity.to_dict(), str(weights) if weights else None)
        detail = f"; {diff}" if was == now else ""  # e.g. only the model arguments differ
        raise CheckpointError(f"{directory}: trained on another backbone: {was}, given {now}{detail}")
    model = TunedModel.build(backbone, cfg["method"], cfg["num_classes"], cfg["method_config"], own_backbone=True)
    if not (directory / TENSORS).is_file():
        raise CheckpointError(f"{directory / TENSORS}: not found")
    if "tensors_sha256" in cfg and file_sha256(directory / TENSORS) != cfg["tensors_sha256"]:  # older ones have none
        raise CheckpointError(f"{directory / TENSORS}: corrupt (its sha256 differs from the one recorded in {CONFIG})")
    try:
        tensors = load_file(str(directory / TENSORS))
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise CheckpointError(f"{directory / TENSORS}: cannot read ({e})") from None
    params = model.trainable_parameters()
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    bad_shape = [n for n in set(params) & set(tensors) if params[n].shape != tensors[n].shape]
    if missing or unexpected or bad_shape:
        raise CheckpointError(f"{directory / TENSORS}: tensors do not match method {cfg['method']!r} "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {bad_shape[:3]})")
    model.load_state_dict(tensors, strict=False)
    return model, cfg


def load_checkpoints(paths: Sequence[str | Path], weights: str | Path | None = None
                     ) -> tuple[Backbone, list[tuple[TunedModel, dict[str, Any]]]]:
    """Several checkpoints of one backbone, which is loaded once (from ``weights``, or the file the first checkpoint
    names). Side-path models share it; a stream method gets its own copy, since it changes the backbone."""
    import copy

    from ..backbones import BackboneSpec
    from ..methods import get_method

    first = read_adapter_config(Path(paths[0]))
    bb = first["backbone"]
    weights = weights or first.get("backbone_weights")
    # without a weights file the checkpoint was trained on random weights, rebuilt from the default seed
    spec = BackboneSpec(bb["name"], None if weights is None else str(weights), model_args=bb["model_args"],
                        preprocessing=first.get("preprocessing") or {}, random_init=not weights)
    try:
        backbone = spec.load()
    except WeightsError as e:  # e.g. weights of another architecture: say which backbone the checkpoint needs
        raise CheckpointError(f"{paths[0]}: trained on {_described(bb, first.get('backbone_weights'))}; the "
                              f"weights given do not load into it: {e}") from None
    pristine = copy.deepcopy(backbone)
    loaded = []
    for path in paths:
        side = get_method(read_adapter_config(Path(path))["method"]).reads_taps
        loaded.append(load_adapter(Path(path), backbone if side else copy.deepcopy(pristine), weights))
    return backbone, loaded
