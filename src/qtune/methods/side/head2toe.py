"""Head2Toe (Evci, Dumoulin, Larochelle and Mozer, ICML 2022, arXiv 2201.03529): a linear head over features from
every block of the frozen backbone.

As the authors' ViT-B/16 configuration reads them: per block, what attention reads (norm1's output), the attention
output, the MLP's hidden activation and the MLP's output, each average-pooled over tokens to about ``target_size``
numbers (their ``additional_features_target_size``), plus the backbone's pre-logits feature; each feature scaled to
unit length per sample (their "unit_vector" normalisation) and concatenated. Feature selection is a second step, as
in the paper: ``qtune compress`` trains a head with a group-lasso (L2,1) penalty on these features, keeps the
``keep`` fraction of input dimensions with the largest weight norms and retrains the head on them
(``feature_ids``). The backbone is read only, so training runs from a trace or a cache of the pooled points.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ...backbones import Backbone, Point, Taps
from ...errors import ConfigError
from ..base import Method, MethodConfig, feature_ids, positive
from ..registry import register

H2T_POINTS = ("pre_attn", "attn", "mlp_hidden", "mlp_out")


@dataclass
class Head2ToeConfig(MethodConfig):
    points: str = field(default=",".join(H2T_POINTS), metadata={
        "help": "block points read, comma-separated (pre_attn, attn, mlp_hidden, mlp_out, x)"})
    target_size: int = field(default=8192, metadata={
        "help": "numbers kept per point and block after pooling over tokens (the authors' ViT-B setting)"})
    feature_ids: list[int] | None = field(default=None, metadata={
        "help": "the head's input dimensions kept by feature selection (qtune compress); default all"})

    def validate(self) -> None:
        positive("target_size", self.target_size)
        names = self.point_names()
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"points: give distinct block points, comma-separated (got {self.points!r})")
        for name in names:
            Point(name, ())  # names the bad point
        feature_ids(self.feature_ids)

    def point_names(self) -> list[str]:
        return [n.strip() for n in self.points.split(",") if n.strip()]


@register
class Head2Toe(Method):
    name = "head2toe"
    config_class = Head2ToeConfig
    summary = "linear head over every block's pooled, normalised features (feature selection: qtune compress)"

    def __init__(self, config: Head2ToeConfig, backbone: Backbone, num_classes: int):
        super().__init__(config, backbone, num_classes)
        blocks = tuple(range(backbone.depth))
        self.points = tuple(Point(name, blocks, config.target_size) for name in config.point_names())
        backbone.check_points(self.points)
        width = backbone.pooled_dim + backbone.depth * sum(math.prod(backbone.point_shape(p)) for p in self.points)
        ids = config.feature_ids
        if ids is not None and max(ids) >= width:
            raise ConfigError(f"feature_ids: {max(ids)} is beyond the {width} features of this backbone")
        self.register_buffer("kept", None if ids is None else torch.tensor(sorted(ids)), persistent=False)
        self.head = nn.Linear(width if ids is None else len(ids), num_classes)

    def blocks_read(self, backbone: Backbone) -> tuple[int, ...]:
        return ()

    def points_read(self, backbone: Backbone) -> tuple[Point, ...]:
        return self.points

    def classifier(self) -> nn.Linear:
        return self.head

    def forward(self, taps: Taps, backbone: Backbone) -> torch.Tensor:
        feats = [taps.pooled, *(f.flatten(1) for p in self.points for f in taps.points[p])]
        x = torch.cat([F.normalize(f, dim=-1) for f in feats], dim=-1)
        return self.head(x if self.kept is None else x[:, self.kept])
