"""The precisions qtune names, in one table: autocast dtypes of training and evaluation (PRECISIONS), and the storage
dtypes of caches (CACHE_DTYPES: those and int8, which stores K/V, never trains). Torch-free, so the command line
builds its choices from it without importing torch."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

# name -> torch dtype name; fp32 is also "no autocast".
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# name -> torch dtype name of what a TapCache stores its K/V as; int8 with per-token scales (cache/quant.py).
CACHE_DTYPES = {**PRECISIONS, "int8": "int8"}


def check_precision(name: str, what: str = "precision") -> str:
    if name not in PRECISIONS:
        raise ConfigError(f"{what} {name!r}: choose from {', '.join(PRECISIONS)}")
    return name


def check_cache_dtype(name: str, what: str = "cache dtype") -> str:
    if name not in CACHE_DTYPES:
        raise ConfigError(f"{what} {name!r}: choose from {', '.join(CACHE_DTYPES)}")
    return name


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, PRECISIONS[check_precision(name)])


def autocast(device: torch.device, precision: str) -> Any:
    """torch.autocast to ``precision`` on ``device``; disabled for fp32."""
    import torch

    check_precision(precision)
    return torch.autocast(device.type, dtype=torch_dtype(precision), enabled=precision != "fp32")


def precision_label(precision: str) -> str:
    """The dtype a figure was measured in, as stated next to it."""
    return "fp32" if check_precision(precision) == "fp32" else f"{precision} autocast, fp32 weights"


__all__ = ["CACHE_DTYPES", "PRECISIONS", "autocast", "check_cache_dtype", "check_precision", "precision_label", "torch_dtype"]
