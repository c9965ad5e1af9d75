"""FacT-TT: Factor-Tuning with a tensor-train format (Jie and Deng, AAAI 2023, arXiv 2212.03145).

The increments of every block's q, k, v, proj, fc1 and fc2 weights form one tensor that is factorised as
U (D -> r) and V (r -> D), shared by all blocks and weights, and a small core per weight and block:
dW x = s * V(dropout(Sigma(U x))). Sigma is r x r for q, k, v and proj; fc1 maps r -> h r and fc2 h r -> r for an
MLP of width h D, whose input/output is seen as h chunks of D. V starts at zero, so the model starts as the
backbone. With ``trainable_blocks = K`` only the top K blocks carry cores (U and V stay shared among them).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ...backbones import Backbone
from ...errors import ConfigError
from ..registry import register
from ..base import positive, probability
from .core import StreamConfig, StreamMethod, Wrapped


@dataclass
class FacTConfig(StreamConfig):
    rank: int = field(default=8, metadata={"help": "rank r of the shared factors U, V"})
    scale: float = field(default=1.0, metadata={"help": "scale s of the increments"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on the cores' output"})

    def validate(self) -> None:
        super().validate()
        positive("rank", self.rank)
        probability("dropout", self.dropout)


class Factors(nn.Module):
    """U and V, shared by every wrapped layer (V zero-initialised), and the dropout and scale of the increments."""

    def __init__(self, dim: int, rank: int, dropout: float, scale: float):
        super().__init__()
        self.u = nn.Linear(dim, rank, bias=False)
        self.v = nn.Linear(rank, dim, bias=False)
        nn.init.zeros_(self.v.weight)
        self.drop = nn.Dropout(dropout)
        self.scale = scale


class FacTLinear(Wrapped):
    """base_layer(x) + s * V(dropout(Sigma(U x))) (proj). The shared factors are registered in the method and only
    referenced here, so they are saved and counted once."""

    def __init__(self, base_layer: nn.Linear, factors: Factors, core: nn.Module):
        super().__init__(base_layer)
        self._factors = (factors,)
        self.core = core

    @property
    def factors(self) -> Factors:
        return self._factors[0]

    def increment(self, x: torch.Tensor) -> torch.Tensor:
        f = self.factors
        return f.scale * f.v(f.drop(self.core(f.u(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.increment(x)


class FacTQKV(FacTLinear):
    """qkv: one core each for q, k and v, sharing U x."""

    def __init__(self, base_layer: nn.Linear, factors: Factors, rank: int):
        super().__init__(base_layer, factors, nn.ModuleList(nn.Linear(rank, rank, bias=False) for _ in range(3)))

    def increment(self, x: torch.Tensor) -> torch.Tensor:
        f = self.factors
        u = f.u(x)
        return f.scale * torch.cat([f.v(f.drop(core(u))) for core in self.core], dim=-1)


class FacTFc1(FacTLinear):
    """fc1 (D -> h D): the core maps r -> h r; V then maps each of the h chunks back to D."""

    def __init__(self, base_layer: nn.Linear, factors: Factors, rank: int, chunks: int):
        super().__init__(base_layer, factors, nn.Linear(rank, chunks * rank, bias=False))
        self.chunks = chunks

    def increment(self, x: torch.Tensor) -> torch.Tensor:
        f = self.factors
        h = f.drop(self.core(f.u(x))).unflatten(-1, (self.chunks, -1))  # (..., h, r)
        return f.scale * f.v(h).flatten(-2)  # (..., h D)


class FacTFc2(FacTLinear):
    """fc2 (h D -> D): U maps each of the h chunks of the input to r; the core maps h r -> r."""

    def __init__(self, base_layer: nn.Linear, factors: Factors, rank: int, chunks: int):
        super().__init__(base_layer, factors, nn.Linear(chunks * rank, rank, bias=False))
        self.chunks = chunks

    def increment(self, x: torch.Tensor) -> torch.Tensor:
        f = self.factors
        u = f.u(x.unflatten(-1, (self.chunks, -1))).flatten(-2)  # (..., h r)
        return f.scale * f.v(f.drop(self.core(u)))


@register
class FacTTT(StreamMethod):
    name = "fact_tt"
    config_class = FacTConfig
    summary = "tensor-train factorised increments of qkv/proj/fc1/fc2 with factors shared across blocks"

    def __init__(self, config: FacTConfig, backbone: Backbone, num_classes: int, *, head: bool = True):
        super().__init__(config, backbone, num_classes, head=head)
        dim = backbone.dim
        for i in self.trainable_range:
            blk = backbone.model.blocks[i]
            fc1, fc2 = getattr(blk.mlp, "fc1", None), getattr(blk.mlp, "fc2", None)
            if (blk.attn.qkv.out_features != 3 * dim or not isinstance(fc1, nn.Linear)
                    or not isinstance(fc2, nn.Linear) or fc1.out_features % dim):
                raise ConfigError(f"fact_tt: block {i} is not a timm ViT block with a D -> 3D qkv and an Mlp of "
                                  f"width h * {dim} (fc1, fc2)")
        self.factors = Factors(dim, config.rank, config.dropout, config.scale)

    def inject(self, backbone: Backbone) -> None:
        rank = self.config.rank
        for i in self.trainable_range:
            blk = backbone.model.blocks[i]
            attn, mlp = blk.attn, blk.mlp
            chunks = mlp.fc1.out_features // backbone.dim
            self.wrap(attn, "qkv", lambda base: FacTQKV(base, self.factors, rank))
            self.wrap(attn, "proj", lambda base: FacTLinear(base, self.factors, nn.Linear(rank, rank, bias=False)))
            self.wrap(mlp, "fc1", lambda base: FacTFc1(base, self.factors, rank, chunks))
            self.wrap(mlp, "fc2", lambda base: FacTFc2(base, self.factors, rank, chunks))
