"""Linear probe: a linear head on the frozen backbone's pooled feature. The reference point for memory and accuracy."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...backbones import Backbone, Taps
from ..registry import register
from ..base import Method, MethodConfig
from ..layers import timm_head


@dataclass
class LinearConfig(MethodConfig):
    pass


@register
class LinearProbe(Method):
    name = "linear"
    config_class = LinearConfig
    summary = "linear head on the frozen pooled feature"

    def __init__(self, config: LinearConfig, backbone: Backbone, num_classes: int):
        super().__init__(config, backbone, num_classes)
        self.head = timm_head(backbone.pooled_dim, num_classes)

    def blocks_read(self, backbone: Backbone) -> tuple[int, ...]:
        return ()

    def classifier(self) -> nn.Linear:
        return self.head

    def forward(self, taps: Taps, backbone: Backbone) -> torch.Tensor:
        return self.head(taps.pooled)
