"""VQT: Visual Query Tuning (Tu, Mai and Chao, CVPR 2023, arXiv 2212.03220).

Per block, n learnable queries read the frozen block's keys/values one-way; the block's outputs for them are
features, not carried forward. Unlike the authors' code, the stream runs without autograd and the queries attend
to its K/V (Backbone.query_block): the same gradients, several times fewer bytes saved for backward.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ...backbones import Backbone, Taps
from ..registry import register
from ...errors import ConfigError
from ..base import Method, MethodConfig, feature_ids, positive, probability
from ..layers import vpt_head, vpt_uniform_bound
from ..masks import Dropout


@dataclass
class VQTConfig(MethodConfig):
    tokens: int = field(default=1, metadata={"help": "query tokens per block (n)"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on the queries"})
    normalize: bool = field(default=True, metadata={"help": "L2-normalise each block's features before the head"})
    feature_ids: list[int] | None = field(default=None, metadata={
        "help": "the head's input dimensions kept by compression (qtune compress); default all"})

    def validate(self) -> None:
        positive("tokens", self.tokens)
        probability("dropout", self.dropout)
        feature_ids(self.feature_ids)


@register
class VQT(Method):
    name = "vqt"
    config_class = VQTConfig
    summary = "learnable queries per block read frozen K/V; outputs concatenated into a linear head"

    def __init__(self, config: VQTConfig, backbone: Backbone, num_classes: int):
        super().__init__(config, backbone, num_classes)
        bound = vpt_uniform_bound(backbone.patch_size, backbone.dim)
        self.queries = nn.Parameter(torch.empty(backbone.depth, config.tokens, backbone.dim).uniform_(-bound, bound))
        self.drop = Dropout(config.dropout)
        width = backbone.pooled_dim + backbone.depth * config.tokens * backbone.dim
        ids = config.feature_ids
        if ids is not None and max(ids) >= width:
            raise ConfigError(f"feature_ids: {max(ids)} is beyond the {width} features of this backbone")
        self.register_buffer("kept", None if ids is None else torch.tensor(sorted(ids)), persistent=False)
        self.head = vpt_head(width if ids is None else len(ids), num_classes)

    def classifier(self) -> nn.Linear:
        return self.head

    def forward(self, taps: Taps, backbone: Backbone) -> torch.Tensor:
        b = taps.batch_size
        feats = [taps.pooled]
        for i in range(backbone.depth):
            q = self.drop(self.queries[i].expand(b, -1, -1))  # (B, n, D)
            feats.append(taps.query(backbone, i, q).out.flatten(1))
        if self.config.normalize:
            feats = [F.normalize(f, dim=-1) for f in feats]
        x = torch.cat(feats, dim=-1)
        return self.head(x if self.kept is None else x[:, self.kept])
