"""Full fine-tuning: every backbone weight trains. The stream baseline for memory and accuracy."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backbones import Backbone
from . import register
from .base import Method, MethodConfig
from .layers import timm_head


@dataclass
class FullConfig(MethodConfig):
    pass


@register
class FullFineTune(Method):
    name = "full"
    config_class = FullConfig
    reads_taps = False
    summary = "all backbone weights and a new head train"

    def __init__(self, config: FullConfig, backbone: Backbone, num_classes: int):
        super().__init__(config, backbone, num_classes)
        self.head = timm_head(backbone.dim, num_classes)

    def attach(self, backbone: Backbone) -> None:
        backbone.requires_grad_(True)

    def forward(self, images: torch.Tensor, backbone: Backbone) -> torch.Tensor:
        return self.head(backbone(images))
