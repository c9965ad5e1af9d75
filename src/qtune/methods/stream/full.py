"""Full fine-tuning: every backbone weight trains. The stream baseline for memory and accuracy.

With ``trainable_blocks = K`` only the top K blocks and the final norm train (partial fine-tuning, the
memory-constrained variant of the SynQT paper's Table 3); the embedding and the blocks below stay frozen.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...backbones import Backbone
from ..registry import register
from .core import StreamConfig, StreamMethod


@dataclass
class FullConfig(StreamConfig):
    pass


@register
class FullFineTune(StreamMethod):
    name = "full"
    config_class = FullConfig
    combinable = True  # trained in place: a side path's queries use the updated weights
    summary = "all backbone weights and a new head train"

    def inject(self, backbone: Backbone) -> None:
        if self.first == 0:
            backbone.requires_grad_(True)
            return
        model = backbone.model
        for i in self.trainable_range:
            model.blocks[i].requires_grad_(True)
        model.norm.requires_grad_(True)
        model.fc_norm.requires_grad_(True)
        if getattr(model, "attn_pool", None) is not None:  # attention-pooling models ("map")
            model.attn_pool.requires_grad_(True)
