"""AdaptFormer (Chen et al., NeurIPS 2022, arXiv 2205.13535): a parallel bottleneck beside each block's MLP.

x = x + mlp(norm2(x)) + s * up(dropout(relu(down(x)))), with s = 0.1, a 64-wide bottleneck, dropout 0.1 and the
up-projection initialised to zero (the authors' image configuration), so the model starts as the backbone.
The adapter reads the block's residual stream x, not norm2(x): the wrapper takes over the MLP and the block's
norm2 (which it applies itself; the block's norm2 slot becomes an identity), so timm's block code, the stream
loop and a side path's query computation all run the adapted block unchanged. With LayerScale checkpoints the
block's ls2 scales the adapter's output too.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ...backbones import Backbone
from ..registry import register
from ..base import positive, probability
from .core import StreamConfig, StreamMethod, Wrapped


@dataclass
class AdaptFormerConfig(StreamConfig):
    bottleneck: int = field(default=64, metadata={"help": "bottleneck width"})
    scale: float = field(default=0.1, metadata={"help": "fixed scale s of the adapter's output"})
    dropout: float = field(default=0.1, metadata={"help": "dropout inside the bottleneck"})

    def validate(self) -> None:
        super().validate()
        positive("bottleneck", self.bottleneck)
        probability("dropout", self.dropout)


class ParallelAdapter(Wrapped):
    """mlp(norm(x)) + scale * up(dropout(relu(down(x)))): the block's MLP branch with the adapter beside it."""

    def __init__(self, mlp: nn.Module, norm: nn.Module, dim: int, cfg: AdaptFormerConfig):
        super().__init__(mlp)
        self.norm = norm
        self.down = nn.Linear(dim, cfg.bottleneck)
        self.drop = nn.Dropout(cfg.dropout)
        self.up = nn.Linear(cfg.bottleneck, dim)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = cfg.scale

    def train(self, mode: bool = True) -> "ParallelAdapter":
        super().train(mode)
        self.norm.train(False)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: the residual stream, (B, N, D)
        return self.base_layer(self.norm(x)) + self.scale * self.up(self.drop(F.relu(self.down(x))))


@register
class AdaptFormer(StreamMethod):
    name = "adaptformer"
    config_class = AdaptFormerConfig
    combinable = True
    summary = "parallel bottleneck (scale 0.1, zero-initialised up-projection) beside each MLP"

    def inject(self, backbone: Backbone) -> None:
        for i in self.trainable_range:
            blk = backbone.model.blocks[i]
            self.wrap(blk, "mlp", lambda base: ParallelAdapter(base, blk.norm2, backbone.dim, self.config))
            blk.norm2 = nn.Identity()
