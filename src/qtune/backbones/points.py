"""Points of a frozen block that side paths may read beyond its K/V (Head2Toe, LST), and how they are pooled.

A ``Point`` names one tensor of block i's forward, per token (B, N, C), in the block's own computation:
  input       X_{i-1}, the block's input (X_0 for block 0: the embedded patches);
  x           X_i, the block's output (with ``input`` of block 0, what LST's ladder reads);
  pre_attn    norm1(X_{i-1}), what attention reads;
  attn        the attention branch's output (after proj and ls1), before the residual;
  mlp_hidden  the MLP's hidden activation (after fc1 and the activation), C = the MLP width;
  mlp_out     the MLP branch's output (after fc2 and ls2), before the residual.
``pool = 0`` keeps every token; ``pool = S > 0`` average-pools the tokens into windows so that about S numbers
remain per sample (Head2Toe's "target size"), flattened to (B, F).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError

POINTS = ("input", "x", "pre_attn", "attn", "mlp_hidden", "mlp_out")


@dataclass(frozen=True)
class Point:
    """One tensor of some blocks' forward, pooled or per token: what a method reads and a cache may store."""

    name: str
    blocks: tuple[int, ...]
    pool: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", tuple(sorted(set(self.blocks))))
        if self.name not in POINTS:
            raise ConfigError(f"unknown block point {self.name!r} (choose from {', '.join(POINTS)})")
        if self.pool < 0:
            raise ConfigError(f"point {self.name}: pool must be >= 0 (got {self.pool})")

    @property
    def key(self) -> str:
        """A file-name-safe identity, e.g. ``mlp_hidden.p8192``."""
        return f"{self.name}.p{self.pool}" if self.pool else self.name

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "blocks": list(self.blocks), "pool": self.pool}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Point":
        return cls(d["name"], tuple(d["blocks"]), d["pool"])

    def covers(self, other: "Point") -> bool:
        """Whether what this point holds includes what ``other`` reads."""
        return (self.name, self.pool) == (other.name, other.pool) and set(other.blocks) <= set(self.blocks)

    def pool_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """Head2Toe's pooling of (B, N, C) to about ``pool`` numbers: windows of N // (pool / C) tokens, averaged
        (a trailing partial window is dropped), flattened; one global mean when C >= pool. Unpooled: t itself."""
        if not self.pool:
            return t
        b, n, c = t.shape
        if c >= self.pool:
            return t.mean(dim=1)
        size = max(1, int(n / (self.pool / c)))
        windows = n // size
        return t[:, :windows * size].reshape(b, windows, size, c).mean(dim=2).reshape(b, windows * c)

    def width(self, tokens: int, channels: int) -> int:
        """Numbers per sample and block once pooled."""
        if channels >= self.pool:
            return channels
        return tokens // max(1, int(tokens / (self.pool / channels))) * channels
