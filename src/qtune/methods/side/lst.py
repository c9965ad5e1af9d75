"""LST: Ladder Side-Tuning (Sung, Cho and Bansal, NeurIPS 2022, arXiv 2206.06522), on a ViT.

A side transformer of width D/r runs beside the frozen stream and reads it through a ladder, as the authors' code
builds it: s_0 = Down_0(X_0); per block i, s = g_i * s + (1 - g_i) * Down_i(X_i) with g_i = sigmoid(alpha_i / T)
(alpha_i learnable, starting at 0; T = 0.1), then s = SideBlock_i(s). Down_i are bias-free linear maps D -> D/r.
The side output is brought back to width D by a bias-free linear map and read as the backbone's own output is: its
frozen final norm and pooling (CLS or mean), then a new linear head. Only the side network trains and the stream is
read without autograd, so training runs from a trace or a cache of the X_i.

Side blocks are timm ViT blocks of width D/r with the backbone's head count and MLP ratio, initialised as timm
initialises a ViT (truncated normal, std 0.02). The paper's alternative, side blocks initialised from the backbone's
blocks by Fisher-information structural pruning, needs gradients on task data and is not built here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from timm.models.vision_transformer import Block
from torch import nn

from ...backbones import Backbone, Point, Taps
from ...errors import ConfigError
from ..base import Method, MethodConfig, positive
from ..layers import timm_head
from ..registry import register


@dataclass
class LSTConfig(MethodConfig):
    reduction: int = field(default=8, metadata={"help": "side width = backbone width / reduction (r)"})
    gate_temperature: float = field(default=0.1, metadata={"help": "T in the ladder gates sigmoid(alpha / T)"})
    gate_init: float = field(default=0.0, metadata={"init": True, "help": "initial alpha of every ladder gate"})

    def validate(self) -> None:
        positive("reduction", self.reduction)
        positive("gate_temperature", self.gate_temperature)


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


@register
class LST(Method):
    name = "lst"
    config_class = LSTConfig
    # The blocks it runs call CPU attention (aten::_scaled_dot_product_flash_attention_for_cpu), which vmap has no
    # batching rule for: a stack loops over its models and is no faster (measured); CUDA's kernels have rules.
    stacks_on = ("cuda",)
    summary = "ladder side network of width D/r reading every block's output through learnt gates"

    def __init__(self, config: LSTConfig, backbone: Backbone, num_classes: int):
        super().__init__(config, backbone, num_classes)
        dim, depth = backbone.dim, backbone.depth
        if dim % config.reduction:
            raise ConfigError(f"reduction {config.reduction} must divide the backbone width {dim}")
        side = dim // config.reduction
        heads = backbone.num_heads
        if side % heads:
            raise ConfigError(f"side width {side} (= {dim} / {config.reduction}) is not divisible by the backbone's "
                              f"{heads} heads; choose another reduction")
        self.ladder = (Point("input", (0,)), Point("x", tuple(range(depth))))
        backbone.check_points(self.ladder)
        mlp_ratio = backbone.model.blocks[0].mlp.fc1.out_features / dim
        self.down = nn.ModuleList(nn.Linear(dim, side, bias=False) for _ in range(depth + 1))
        self.blocks = nn.ModuleList(Block(side, heads, mlp_ratio=mlp_ratio, qkv_bias=True) for _ in range(depth))
        self.gates = nn.Parameter(torch.full((depth,), float(config.gate_init)))
        self.up = nn.Linear(side, dim, bias=False)
        self.apply(_init_linear)
        self.head = timm_head(backbone.pooled_dim, num_classes)

    def blocks_read(self, backbone: Backbone) -> tuple[int, ...]:
        return ()

    def points_read(self, backbone: Backbone) -> tuple[Point, ...]:
        return self.ladder

    def classifier(self) -> nn.Linear:
        return self.head

    def forward(self, taps: Taps, backbone: Backbone) -> torch.Tensor:
        first, outputs = (taps.points[p] for p in self.ladder)
        s = self.down[0](first[0])
        gates = torch.sigmoid(self.gates / self.config.gate_temperature)
        for i, block in enumerate(self.blocks):
            s = gates[i] * s + (1 - gates[i]) * self.down[i + 1](outputs[i])
            s = block(s)
        return self.head(backbone.pool(self.up(s)))
