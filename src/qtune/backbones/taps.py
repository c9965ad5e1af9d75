"""Taps: everything a side-path method reads from the frozen stream for one batch."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

import torch

if TYPE_CHECKING:
    from .points import Point
    from .vit import Backbone, QueryOutput

R = TypeVar("R")


@dataclass
class Taps:
    """Per-block keys/values of the frozen stream, plus its pooled final feature.

    keys[j], values[j]: (B, H, N, head_dim) for block ``blocks[j]``: K_i and V_i of norm1(X_{i-1}), after k_norm.
    pooled: (B, D), the backbone's own pre-logits feature (final norm, then CLS or mean pooling).
    points[p]: for each block of point p (``points.Point``), in block order, its tensor: (B, N, C) per token, or
    (B, F) pooled.
    The sequences may be lazy (e.g. read from disk block by block); methods index them by position.
    """

    keys: Sequence[torch.Tensor]
    values: Sequence[torch.Tensor]
    pooled: torch.Tensor
    blocks: tuple[int, ...]
    points: dict["Point", Sequence[torch.Tensor]] = field(default_factory=dict)

    def kv(self, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of backbone block ``block`` (its index in the backbone, not in ``blocks``)."""
        j = self.blocks.index(block)
        return self.keys[j], self.values[j]

    def query(self, backbone: "Backbone", block: int, tokens: torch.Tensor, drop_path: float = 0.0) -> "QueryOutput":
        """Query ``tokens`` through frozen block ``block`` against these taps' K/V (``Backbone.query_block``, with
        its ``drop_path``).

        Side-path methods go through here rather than calling ``query_block`` with ``kv(block)`` themselves, so a
        Taps that reads K/V lazily (a depth-streamed cache) can put the read and the block under one checkpoint.
        """
        return backbone.query_block(block, tokens, *self.kv(block), drop_path=drop_path)

    def run_block(self, fn: Callable[..., R], *args: Any) -> R:
        """``fn(*args)``: one block's whole side path, which queries these taps once (``query``).

        Here it just runs. A Taps that reads K/V lazily runs it under one activation checkpoint, so that backward
        recomputes the block's trainable path together with its K/V read instead of keeping its activations.
        """
        return fn(*args)

    @property
    def batch_size(self) -> int:
        return self.pooled.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Taps":
        move = (lambda t: t.to(device=device, dtype=dtype)) if dtype else (lambda t: t.to(device=device))
        return Taps([move(k) for k in self.keys], [move(v) for v in self.values], move(self.pooled), self.blocks,
                    {p: [move(t) for t in ts] for p, ts in self.points.items()})
