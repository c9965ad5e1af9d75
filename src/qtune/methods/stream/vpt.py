"""VPT: Visual Prompt Tuning (Jia et al., ECCV 2022, arXiv 2203.12119), shallow and deep.

m learnable prompt tokens are inserted right after the prefix (CLS) tokens, after the position embedding.
Shallow: inserted once, they flow through every block. Deep: each block's input prompts are replaced by that
block's own. With ``trainable_blocks = K`` the prompts enter at block L-K (shallow) or exist only for the top K
blocks (deep); the blocks below see the plain stream and run without autograd.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ...backbones import Backbone
from ..registry import register
from ..base import positive, probability
from ..layers import vpt_head, vpt_uniform_bound
from .core import StreamConfig, StreamMethod, check_cls_pool, check_pool, pool_tokens


@dataclass
class PromptConfig(StreamConfig):
    tokens: int = field(default=10, metadata={"help": "prompt tokens (m), inserted after the CLS token"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on the prompts"})
    pool: str = field(default="auto", metadata={
        "help": "auto (the backbone's own pooling), cls, or mean (prompts + patches, for MAE) through the final norm"})

    def validate(self) -> None:
        super().validate()
        positive("tokens", self.tokens)
        probability("dropout", self.dropout)
        check_pool(self.pool)


def insert_prompts(x: torch.Tensor, prompts: torch.Tensor, prefix: int) -> torch.Tensor:
    """[prefix tokens, prompts, patches]: (B, N, D), (B, m, D) -> (B, N + m, D)."""
    return torch.cat([x[:, :prefix], prompts, x[:, prefix:]], dim=1)


def replace_prompts(x: torch.Tensor, prompts: torch.Tensor, prefix: int) -> torch.Tensor:
    """The m tokens after the prefix replaced by ``prompts`` (VPT-deep at each block's input)."""
    return torch.cat([x[:, :prefix], prompts, x[:, prefix + prompts.shape[1]:]], dim=1)


class PromptMethod(StreamMethod):
    """Shared by VPT and GateVPT: prompt parameters (one set per prompted block), insertion, pooling, VPT head."""

    deep: ClassVar[bool] = False

    def __init__(self, config: PromptConfig, backbone: Backbone, num_classes: int, *, head: bool = True):
        super().__init__(config, backbone, num_classes, head=head)
        sets = len(self.trainable_range) if self.deep else 1
        bound = vpt_uniform_bound(backbone.patch_size, backbone.dim)
        self.prompts = nn.Parameter(torch.empty(sets, config.tokens, backbone.dim).uniform_(-bound, bound))
        self.prompt_drop = nn.Dropout(config.dropout)
        self.prefix = backbone.model.num_prefix_tokens
        check_cls_pool(config.pool, backbone, self.name)

    def make_head(self, dim: int, num_classes: int) -> nn.Module:
        return vpt_head(dim, num_classes)

    def _prompts(self, j: int, batch: int) -> torch.Tensor:
        return self.prompt_drop(self.prompts[j].expand(batch, -1, -1))  # (B, m, D)

    def enter(self, x: torch.Tensor, backbone: Backbone) -> torch.Tensor:
        return insert_prompts(x, self._prompts(0, x.shape[0]), self.prefix)

    def pool(self, x: torch.Tensor, backbone: Backbone) -> torch.Tensor:
        return pool_tokens(x, backbone, self.config.pool)


@register
class VPTShallow(PromptMethod):
    name = "vpt_shallow"
    config_class = PromptConfig
    combinable = True
    summary = "prompt tokens inserted after CLS at the input, flowing through all blocks"


@register
class VPTDeep(PromptMethod):
    name = "vpt_deep"
    config_class = PromptConfig
    combinable = True
    deep = True
    summary = "each block's input prompts replaced by its own learnable prompt tokens"

    @classmethod
    def for_backbone(cls, backbone: Backbone) -> type:
        if backbone.kind == "vit":
            return cls
        from .stage_vpt import stage_vpt_class  # prompts per window (Swin) or prompt pixels (ConvNeXt)

        return stage_vpt_class(backbone)

    def block(self, i: int, x: torch.Tensor, backbone: Backbone) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if i > self.first:
            x = replace_prompts(x, self._prompts(i - self.first, x.shape[0]), self.prefix)
        return backbone.block_forward(i, x)
