"""int8 storage of K/V: symmetric quantisation with one fp16 scale per (image, block, K/V, head, token).

A block's K/V of one image, (2, H, N, head_dim), is stored as int8 q = round(x / s) clamped to [-127, 127], with
s = max |x| / 127 over the head_dim values of each token's key or value in each head ("token" scales, (2, H, N) per
image). The other layout, one scale per channel ("channel": the max over the N tokens, (2, H, head_dim) per image),
is kept for measurements and for reading caches that hold it. benchmarks/cache_int8.py compares the two on a
pretrained ViT-Ti/16 (docs/cache.md, "int8 caches"): token scales change a trained SynQT's logits about half as
much as channel scales (a token of large norm no longer coarsens the values of every other token in its channels)
and VQT's a little less; they cost 2 bytes per 64 values, 3% (channel scales: 1%).

The scale is rounded to fp16 before the values are divided by it, so dequantising (q * s) uses exactly the scale
the values were quantised with: the error of every value is at most s / 2.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import CacheError

SCALE_LAYOUTS = ("token", "channel")  # the first is what builds write
SCALE_DTYPE = np.dtype(np.float16)
QMAX = 127
_FP16_MAX = float(torch.finfo(torch.float16).max)


def check_layout(layout: str) -> str:
    if layout not in SCALE_LAYOUTS:
        raise CacheError(f"int8 scale layout {layout!r}: choose from {', '.join(SCALE_LAYOUTS)}")
    return layout


def _reduced_dim(layout: str) -> int:
    """The axis of (B, 2, H, N, hd) that one scale spans: the tokens (channel scales) or head_dim (token scales)."""
    return 3 if check_layout(layout) == "channel" else 4


def scale_shape(kv_shape: tuple[int, ...] | list[int], layout: str) -> list[int]:
    """The scales' shape for K/V of shape (rows, 2, H, N, hd)."""
    dim = _reduced_dim(layout)
    return [s for i, s in enumerate(kv_shape) if i != dim]


def quantise(kv: torch.Tensor, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values, fp16 scales) of float K/V (B, 2, H, N, hd), as written to disk."""
    dim = _reduced_dim(layout)
    x = kv.detach().to(device="cpu", dtype=torch.float32)
    scale = (x.abs().amax(dim=dim, keepdim=True) / QMAX).clamp_max(_FP16_MAX).half()
    s = scale.float()
    # an all-zero group has s = 0: its values divide by the smallest float and stay 0
    q = (x / s.clamp_min(torch.finfo(torch.float32).tiny)).round_().clamp_(-QMAX, QMAX).to(torch.int8)
    return q.contiguous().numpy(), scale.squeeze(dim).contiguous().numpy()


def dequantise(q: np.ndarray, scale: np.ndarray, layout: str, device: torch.device,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q * scale in ``dtype`` on ``device``: the int8 rows move as they are (a quarter of fp32's bytes), become the
    one output tensor and are scaled in place, with no second float copy. (``torch.mul(q, s, out=...)`` on the int8
    tensor saves nothing more and took 1.7x as long on a CPU: mixed-dtype arithmetic is slower there.)"""
    dim = _reduced_dim(layout)
    out = torch.from_numpy(q).to(device).to(dtype)
    return out.mul_(torch.from_numpy(scale).to(device=device, dtype=dtype).unsqueeze(dim))


def roundtrip(kv: torch.Tensor, layout: str) -> torch.Tensor:
    """K/V as an int8 cache gives them back (for measuring the error)."""
    return dequantise(*quantise(kv, layout), layout, kv.device, kv.dtype)


__all__ = ["SCALE_DTYPE", "SCALE_LAYOUTS", "check_layout", "dequantise", "quantise", "roundtrip", "scale_shape"]
