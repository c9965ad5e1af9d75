"""A backbone plus a method: the model that trains, evaluates, saves and predicts."""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .backbones import Backbone, Point, Taps
from .methods import Method


class TunedModel(nn.Module):
    """Dispatches images to the frozen trace + side path, or to the stream method; holds both parts."""

    def __init__(self, backbone: Backbone, method: Method):
        super().__init__()
        self.backbone = backbone
        self.method = method
        method.attach(backbone)

    @classmethod
    def build(cls, backbone: Backbone, method: str, num_classes: int, options: Any = None, *,
              seed: int | None = None, own_backbone: bool = False) -> "TunedModel":
        """The one builder of backbone -> method -> model. A stream method changes its backbone, so it gets a private
        copy unless the caller hands the backbone over (``own_backbone``). With ``seed``, the trainable part is
        initialised from that seed; the global RNG is left as it was either way."""
        from .methods import create_method, get_method

        bb = backbone if own_backbone or get_method(method).reads_taps else copy.deepcopy(backbone)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            return cls(bb, create_method(method, bb, num_classes, options))

    @property
    def reads_taps(self) -> bool:
        return self.method.reads_taps

    def blocks_read(self) -> tuple[int, ...]:
        return self.method.blocks_read(self.backbone)

    def points_read(self) -> tuple[Point, ...]:
        return self.method.points_read(self.backbone)

    @property
    def live_only(self) -> str | None:
        """Why this side-path model traces live while training, never from a cache (None: a cache can serve it)."""
        return self.method.config.live_only()

    def trace(self, images: torch.Tensor) -> Taps:
        """What this side-path model reads of ``images``: the frozen stream's K/V of its blocks and its points."""
        return self.method.trace(self.backbone, images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.method.reads_taps:
            return self.method(self.trace(images), self.backbone)
        return self.method(images, self.backbone)

    def forward_taps(self, taps: Taps) -> torch.Tensor:
        """Logits from precomputed taps (a cache): the same side-path code as ``forward``."""
        return self.method(taps, self.backbone)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters().values())
