"""DTL and DTL+: Disentangled Transfer Learning (Fu, Zhu and Wu, AAAI 2024, arXiv 2312.07856), on a ViT.

A Compact Side Network of low-rank maps reads every block's input and feeds what it gathers back into the stream
from block M upward, as the authors' code (heekhero/DTL) computes it. With blocks 1..L, X_{i-1} block i's input:
  R_i = R_{i-1} + B_i A_i X_{i-1}     (A_i: r x D, B_i: D x r; R_0 = 0), for every block i;
  X_i <- X_i + phi(R_i)               for i >= M = add_from + 1, phi(z) = z * sigmoid(beta z),
and the head reads the mean of the patch tokens of X_L through the frozen final norm. DTL+ puts one depthwise
k x k convolution, shared by all the add blocks, after phi on the patch tokens (the prefix tokens pass unchanged).
A_i starts as ``nn.Linear`` does and B_i at zero, so training starts from the backbone's own features.

What trains live and what comes from the cache: nothing changes the stream before the addition after block M, so
X_0 .. X_M are fixed functions of the image; they are read as block points (``input`` of block 0, ``x`` of blocks
0..add_from, 0-based) from a trace or a cache, and the low-rank maps of blocks 1..M act on them there. Blocks
M+1 .. L see a changed stream: they run live, with autograd through their frozen weights (which never change), and
that is all the backward DTL needs. ``add_from = L - 1`` leaves no block live.
Not built: the authors' stochastic depth (drop path 0.1 on the frozen blocks in their DTL+ scripts); the frozen
blocks here always run as in evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ...backbones import Backbone, Point, Taps
from ...backbones.stages import plain_vit_only
from ...errors import ConfigError
from ..base import Method, MethodConfig, positive
from ..layers import timm_head
from ..registry import register
from ..stream.core import check_cls_pool, check_pool, pool_tokens


@dataclass
class DTLConfig(MethodConfig):
    rank: int = field(default=2, metadata={"help": "rank r of each block's low-rank map (the authors' d')"})
    add_from: int | None = field(default=None, metadata={
        "help": "0-based index of the first block whose output gets the side information; the blocks above it run "
                "live (default: depth // 2, the authors' 7th of 12 blocks)"})
    beta: float = field(default=100.0, metadata={"help": "beta of the activation z * sigmoid(beta z)"})
    kernel: int = field(default=0, metadata={"help": "DTL+'s shared depthwise convolution size (0: none, DTL)"})
    pool: str = field(default="mean", metadata={
        "help": "mean (the authors': patch tokens, then the final norm), cls, or auto (the backbone's own)"})

    def validate(self) -> None:
        positive("rank", self.rank)
        positive("beta", self.beta)
        positive("kernel", self.kernel, allow_zero=True)
        check_pool(self.pool)
        if self.add_from is not None and (isinstance(self.add_from, bool) or self.add_from < 0):
            raise ConfigError(f"add_from must be a block index >= 0 (got {self.add_from!r})")


@dataclass
class DTLPlusConfig(DTLConfig):
    kernel: int = field(default=3, metadata={"help": "size of the shared depthwise convolution (the authors' 3)"})


@register
class DTL(Method):
    name = "dtl"
    config_class = DTLConfig
    # The blocks it runs call CPU attention (aten::_scaled_dot_product_flash_attention_for_cpu), which vmap has no
    # batching rule for: a stack loops over its models and is no faster (measured); CUDA's kernels have rules.
    stacks_on = ("cuda",)
    summary = "low-rank maps of every block's input, summed and added back to the stream from block M upward"

    def __init__(self, config: DTLConfig, backbone: Backbone, num_classes: int):
        if backbone.kind != "vit":
            raise ConfigError(plain_vit_only(backbone, self.name))
        super().__init__(config, backbone, num_classes)
        depth, dim = backbone.depth, backbone.dim
        self.add_from = depth // 2 if config.add_from is None else config.add_from
        if self.add_from >= depth:
            raise ConfigError(f"add_from must be in 0..{depth - 1} for this {depth}-block backbone "
                              f"(got {self.add_from})")
        self.frozen = (Point("input", (0,)), Point("x", tuple(range(self.add_from + 1))))
        backbone.check_points(self.frozen)
        self.down = nn.ModuleList(nn.Linear(dim, config.rank, bias=False) for _ in range(depth))  # A_i
        self.up = nn.ModuleList(nn.Linear(config.rank, dim, bias=False) for _ in range(depth))  # B_i
        for b in self.up:
            nn.init.zeros_(b.weight)
        self.prefix = backbone.model.num_prefix_tokens
        self.grid = tuple(backbone.model.patch_embed.grid_size)
        self.fuse = (nn.Conv2d(dim, dim, config.kernel, padding="same", groups=dim, bias=False)
                     if config.kernel else None)
        check_cls_pool(config.pool, backbone, self.name)
        self.head = timm_head(backbone.pooled_dim, num_classes)

    def blocks_read(self, backbone: Backbone) -> tuple[int, ...]:
        return ()

    def points_read(self, backbone: Backbone) -> tuple[Point, ...]:
        return self.frozen

    def live_blocks(self, backbone: Backbone) -> tuple[int, ...]:
        return tuple(range(self.add_from + 1, backbone.depth))

    def classifier(self) -> nn.Linear:
        return self.head

    def side(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """B_i A_i x, block i's low-rank map of its input."""
        return self.up[i](self.down[i](x))

    def feedback(self, r: torch.Tensor) -> torch.Tensor:
        """phi(R), then (DTL+) the shared depthwise convolution over the patch grid."""
        z = r * torch.sigmoid(self.config.beta * r)
        if self.fuse is None:
            return z
        b, _, d = z.shape
        patches = z[:, self.prefix:].transpose(1, 2).reshape(b, d, *self.grid)
        return torch.cat([z[:, :self.prefix], self.fuse(patches).flatten(2).transpose(1, 2)], dim=1)

    def forward(self, taps: Taps, backbone: Backbone) -> torch.Tensor:
        first, outputs = (taps.points[p] for p in self.frozen)
        m = self.add_from
        r = self.side(0, first[0])
        for i in range(1, m + 1):  # the other inputs up to block M: the unchanged stream, from the trace or cache
            r = r + self.side(i, outputs[i - 1])
        x = outputs[m] + self.feedback(r)
        for i in self.live_blocks(backbone):  # the modified stream: live, with backward through frozen blocks
            r = r + self.side(i, x)
            x = backbone.block_forward(i, x)[0] + self.feedback(r)
        return self.head(pool_tokens(x, backbone, self.config.pool))


@register
class DTLPlus(DTL):
    name = "dtl_plus"
    config_class = DTLPlusConfig
    summary = "DTL with one depthwise convolution, shared by the add blocks, on the fed-back side information"
