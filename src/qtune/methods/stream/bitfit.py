"""BitFit: bias-only fine-tuning (Ben Zaken, Goldberg and Ravfogel, ACL 2022, arXiv 2106.10199).

Every bias of the backbone's Linear, LayerNorm and Conv2d layers trains, plus the head. Each bias is trained as a
zero-initialised increment in a wrapper (bias + delta is the trained bias), so the frozen weights stay
bit-identical and a checkpoint holds the increments only. With ``trainable_blocks = K``: the biases of the top K
blocks and of the final norm; the patch embedding's only when every block trains.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...backbones import Backbone
from ..registry import register
from .core import StreamConfig, StreamMethod, Wrapped, wrap_children

_BIASED = (nn.Linear, nn.LayerNorm, nn.Conv2d)


@dataclass
class BitFitConfig(StreamConfig):
    pass


class BiasDelta(Wrapped):
    """base_layer(x) + delta, the bias increment broadcast over the layer's channel dimension."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.delta = nn.Parameter(torch.zeros_like(base_layer.bias))
        # Linear and LayerNorm add their bias on the last dimension, a convolution on dimension 1.
        self.conv = isinstance(base_layer, nn.Conv2d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        return out + (self.delta.view(-1, 1, 1) if self.conv else self.delta)


def _has_bias(m: nn.Module) -> bool:
    return isinstance(m, _BIASED) and m.bias is not None


@register
class BitFit(StreamMethod):
    name = "bitfit"
    config_class = BitFitConfig
    summary = "every bias of the backbone and the head"

    def inject(self, backbone: Backbone) -> None:
        model = backbone.model
        roots: list[nn.Module] = [model.blocks[i] for i in self.trainable_range]
        if self.first == 0:
            roots.append(model.patch_embed)
        for root in roots:
            self.wrapped += wrap_children(root, _has_bias, BiasDelta)
        # Top-level norms (the final norm; the pre-norm below block 0 only when every block trains).
        tops = ["norm", "fc_norm"] + (["norm_pre"] if self.first == 0 else [])
        for attr in tops:
            module = getattr(model, attr, None)
            if module is not None and _has_bias(module):
                setattr(model, attr, BiasDelta(module))
                self.wrapped.append(getattr(model, attr))
