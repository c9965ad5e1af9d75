"""Small trainable building blocks shared by the methods."""
from __future__ import annotations

import math

import torch
from torch import nn

from .masks import Dropout


class Adapter(nn.Module):
    """Residual bottleneck x + dropout(fc2(dropout(gelu(fc1(x))))), the "Adapter(r)" of docs/methods.md.

    The same dropout module acts twice, after the activation and after fc2, as in the SynQT authors' ``Mlp``.
    """

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop = Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def vpt_uniform_bound(patch_size: int, dim: int) -> float:
    """The VPT/VQT init bound for prompt-like tokens: xavier-uniform over a (3 p^2) -> D patch projection."""
    return math.sqrt(6.0 / (3 * patch_size**2 + dim))


def vpt_head(in_features: int, num_classes: int) -> nn.Linear:
    """The VPT code base's head: kaiming-normal (fan_out) weights, bias -log(99)."""
    head = nn.Linear(in_features, num_classes)
    nn.init.kaiming_normal_(head.weight, mode="fan_out")
    nn.init.constant_(head.bias, -math.log(99.0))
    return head


def timm_head(in_features: int, num_classes: int) -> nn.Linear:
    """timm's ViT head init: truncated normal (std 0.02) weights, zero bias."""
    head = nn.Linear(in_features, num_classes)
    nn.init.trunc_normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    return head
