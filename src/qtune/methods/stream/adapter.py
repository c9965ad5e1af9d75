"""Adapter: sequential bottleneck adapters (Houlsby et al., ICML 2019, arXiv 1902.00751; Pfeiffer et al., EACL
2021, arXiv 2005.00247).

A residual bottleneck y + up(act(down(y))) applied to a sub-block's output y before the block's residual add.
Pfeiffer: one per block, after the MLP. Houlsby: two per block, after the attention output projection and after
the MLP. The up-projection starts at zero, so the model starts as the backbone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ...backbones import Backbone
from ...errors import ConfigError
from ..registry import register
from ..base import positive
from .core import StreamConfig, StreamMethod, Wrapped

PLACEMENTS = ("pfeiffer", "houlsby")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


@dataclass
class AdapterConfig(StreamConfig):
    bottleneck: int = field(default=64, metadata={"help": "bottleneck width of each adapter"})
    placement: str = field(default="pfeiffer", metadata={
        "help": "pfeiffer (after the MLP) or houlsby (after the attention projection and after the MLP)"})
    activation: str = field(default="relu", metadata={"help": "relu, gelu or silu inside the bottleneck"})

    def validate(self) -> None:
        super().validate()
        positive("bottleneck", self.bottleneck)
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"placement must be one of {', '.join(PLACEMENTS)} (got {self.placement!r})")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {', '.join(ACTIVATIONS)} (got {self.activation!r})")


class SequentialAdapter(Wrapped):
    """y = base_layer(x); y + up(act(down(y)))."""

    def __init__(self, base_layer: nn.Module, dim: int, bottleneck: int, activation: str):
        super().__init__(base_layer)
        self.down = nn.Linear(dim, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        return y + self.up(self.act(self.down(y)))


@register
class Adapter(StreamMethod):
    name = "adapter"
    config_class = AdapterConfig
    combinable = True
    summary = "sequential bottleneck adapters after the MLP (pfeiffer) or after attention and MLP (houlsby)"

    def inject(self, backbone: Backbone) -> None:
        cfg = self.config
        for i in self.trainable_range:
            blk = backbone.model.blocks[i]
            def adapter(base: nn.Module) -> nn.Module:
                return SequentialAdapter(base, backbone.dim, cfg.bottleneck, cfg.activation)
            if cfg.placement == "houlsby":
                self.wrap(blk.attn, "proj", adapter)
            self.wrap(blk, "mlp", adapter)
