"""Resumable training state without pickle: tensors in a safetensors file, everything else as JSON in its header.

Unpickling a file can run any code it names, and a run folder may come from anywhere; reading this format runs
none. Optimiser, scheduler and RNG states nest tensors in dicts with integer keys and in tuples: both are kept.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError
from ..io import atomic_write

FORMAT = "qtune-state"
_TAGS = ("__tensor__", "__items__", "__tuple__")


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not set(obj) & set(_TAGS):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"training state: cannot store a {type(obj).__name__}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    return {k: _decode(v, tensors) for k, v in obj.items()}


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (nested dicts, lists, tuples, numbers, strings and tensors) atomically."""
    tensors: dict[str, torch.Tensor] = {}
    tree = json.dumps(_encode(state, tensors))
    atomic_write(Path(path), lambda p: save_file(tensors, str(p), metadata={"format": FORMAT, "state": tree}))


def load_state(path: Path) -> dict[str, Any]:
    """The state ``save_state`` wrote, tensors on the CPU; anything else is a CheckpointError naming the file."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError("its header names no qtune state")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return _decode(json.loads(meta["state"]), tensors)
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: not a qtune training state ({type(e).__name__}: {e})"[:300]) from None
