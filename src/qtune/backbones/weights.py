"""Reading backbone weights from local files in the layouts that circulate.

timm state dicts (.safetensors/.pth/.bin), Google .npz (through timm's own loader), and the training checkpoints
of MAE (``model``), MoCo v3 (``state_dict`` with ``module.base_encoder.``) and DINO (``teacher`` with ``backbone.``).
Conversion of key names is left to timm's ``checkpoint_filter_fn`` wherever timm has one.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..errors import WeightsError

STATE_DICT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
# Keys of pre-training heads and decoders that a backbone never uses.
_IGNORED_PREFIXES = ("head.", "head_dist.", "decoder", "mask_token", "fc_norm.", "predictor", "momentum_encoder.")


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Find the backbone's state dict inside a training checkpoint."""
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected a state dict, found {type(obj).__name__}")
    for key in ("teacher", "model", "state_dict", "model_ema", "state_dict_ema"):
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise WeightsError(f"{path}: no tensors found in the checkpoint")
    # MoCo v3 keeps both encoders; the base encoder is the backbone.
    if any(k.startswith("module.base_encoder.") for k in sd):
        sd = {k[len("module.base_encoder."):]: v for k, v in sd.items() if k.startswith("module.base_encoder.")}
    for prefix in ("module.", "backbone.", "encoder."):
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    if any(k.startswith("backbone.") for k in sd):  # DINO: backbone + projection head
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    return sd


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a local file, unwrapping known training-checkpoint layouts."""
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return _unwrap(load_file(str(path)), path)
        return _unwrap(torch.load(path, map_location="cpu", weights_only=True), path)
    except WeightsError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure means an unusable file
        raise WeightsError(f"{path}: cannot read weights ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e


def load_into(model: nn.Module, path: Path) -> None:
    """Load weights from ``path`` into a timm VisionTransformer, failing with the first mismatched keys."""
    if path.suffix == ".npz":
        if not path.is_file():
            raise WeightsError(f"{path}: weights file not found")
        try:
            model.load_pretrained(str(path))
        except Exception as e:  # noqa: BLE001
            raise WeightsError(f"{path}: not weights for this architecture ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200]})") from e
        return
    if path.suffix not in STATE_DICT_SUFFIXES:
        raise WeightsError(f"{path}: unknown weights format (expected one of {STATE_DICT_SUFFIXES + ('.npz',)})")
    sd = read_state_dict(path)
    try:
        from timm.models.vision_transformer import checkpoint_filter_fn

        sd = checkpoint_filter_fn(sd, model)
    except Exception:  # noqa: BLE001 - the filter is a best effort; key comparison below is the judge
        pass
    expected = model.state_dict()
    sd = {k: v for k, v in sd.items() if k in expected or not k.startswith(_IGNORED_PREFIXES)}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong_shape = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                   if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or wrong_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                parts.append(f"{len(keys)} {label}: {', '.join(keys[:3])}" + (", ..." if len(keys) > 3 else ""))
        raise WeightsError(f"{path}: weights do not match the architecture ({'; '.join(parts)})")
    model.load_state_dict(sd, strict=True)


def weights_hash(model: nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes): identifies weights whatever file they came from."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()
