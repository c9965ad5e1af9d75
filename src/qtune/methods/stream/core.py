"""What every stream method shares: the block loop with a frozen prefix, pooling, and PEFT-style wrappers.

A stream method changes X_i, so backward runs through the backbone from the first block it modifies upward.
With ``trainable_blocks = K`` its structures live only in the top K blocks (the memory-constrained variants of
the SynQT paper, Table 3); the blocks below run under ``no_grad``, so nothing of them is saved for backward, and
their output X_{L-K} is a fixed function of the image.
Structures inside the backbone are wrappers around timm sub-modules (a ``base_layer`` plus the new parameters,
swapped in on the parent), never rebound ``forward`` methods, so timm's own block code and ``Backbone.block_forward``
run them unchanged.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Sequence

import torch
from torch import nn

from ...backbones import Backbone
from ...backbones.stages import plain_vit_only
from ...errors import ConfigError
from ..base import Method, MethodConfig, block_count, first_trainable_block
from ..layers import timm_head

POOLS = ("auto", "cls", "mean")


@dataclass
class StreamConfig(MethodConfig):
    trainable_blocks: int | None = field(default=None, metadata={
        "help": "trainable structures only in the top K blocks; the blocks below run without autograd (default: all)"})

    def validate(self) -> None:
        block_count("trainable_blocks", self.trainable_blocks)


class Wrapped(nn.Module):
    """A frozen timm sub-module (``base_layer``) plus trainable parameters around it, swapped in on its parent.

    Its own dropout follows the method's train/eval mode; the frozen base layer stays in eval mode.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer

    def train(self, mode: bool = True) -> "Wrapped":
        super().train(mode)
        self.base_layer.train(False)
        return self


def wrap_children(root: nn.Module, select: Callable[[nn.Module], bool],
                  make: Callable[[nn.Module], nn.Module]) -> list[nn.Module]:
    """Replace every sub-module of ``root`` that ``select`` accepts (not descending into it) by ``make(module)``."""
    made = []
    for name, child in list(root.named_children()):
        if select(child):
            new = make(child)
            setattr(root, name, new)
            made.append(new)
        else:
            made += wrap_children(child, select, make)
    return made


def ensure_unmodified(backbone: Backbone, method: str) -> None:
    """Stream methods change the backbone they attach to: one tuned model per backbone object."""
    if any(p.requires_grad for p in backbone.parameters()):
        raise ConfigError(f"{method}: this backbone already carries another method's trainable structures "
                          "(load a fresh backbone for each stream-method model)")


def pool_tokens(x: torch.Tensor, backbone: Backbone, mode: str) -> torch.Tensor:
    """Pre-logits feature of X_L: the backbone's own pooling (auto), CLS through the final norm, or the mean of
    the tokens after the prefix (prompts + patches) through the final norm (GateVPT's choice for MAE)."""
    if mode == "auto":
        return backbone.pool(x)
    if mode == "cls":
        return backbone.final_norm(x[:, 0])
    return backbone.final_norm(x[:, backbone.model.num_prefix_tokens:].mean(dim=1))


def check_pool(mode: str) -> None:
    if mode not in POOLS:
        raise ConfigError(f"pool must be one of {', '.join(POOLS)} (got {mode!r})")


def check_cls_pool(mode: str, backbone: Backbone, method: str) -> None:
    """``pool = cls`` needs a class token."""
    if mode == "cls" and getattr(backbone.model, "cls_token", None) is None:
        raise ConfigError(f"{method}: pool=cls, but the backbone has no class token (use auto or mean)")


class StreamMethod(Method):
    """Base of the stream methods: embed, frozen prefix (no autograd), trainable blocks, pool, head.

    Subclasses add parameters in ``__init__`` (tokens) or wrap backbone sub-modules in ``inject`` (and list in
    ``self.wrapped`` the modules whose train/eval mode follows the method's), and may override ``enter`` (what
    happens to X_{s} at the first trainable block s) and ``block`` (one block of the trainable part).
    Built with ``head=False`` it is the stream part of a combination, whose side path supplies the head.
    """

    reads_taps = False
    combinable: ClassVar[bool] = False  # whether a side path's query computation sees every change it makes

    def __init__(self, config: StreamConfig, backbone: Backbone, num_classes: int, *, head: bool = True):
        if backbone.kind != "vit":
            raise ConfigError(plain_vit_only(backbone, self.name))
        super().__init__(config, backbone, num_classes)
        self.depth = backbone.depth
        self.first = first_trainable_block(config.trainable_blocks, backbone.depth)
        self.head = self.make_head(backbone.dim, num_classes) if head else None
        self.wrapped: list[nn.Module] = []

    def wrap(self, parent: nn.Module, attr: str, make: Callable[[nn.Module], nn.Module]) -> nn.Module:
        """Replace ``parent.attr`` by ``make(parent.attr)`` (a wrapper holding it as ``base_layer``), listed in
        ``wrapped`` so that its mode follows the method's; returns the wrapper."""
        wrapper = make(getattr(parent, attr))
        setattr(parent, attr, wrapper)
        self.wrapped.append(wrapper)
        return wrapper

    @property
    def trainable_range(self) -> range:
        """The blocks that hold trainable structures: the top ``trainable_blocks`` (all by default)."""
        return range(self.first, self.depth)

    def make_head(self, dim: int, num_classes: int) -> nn.Module:
        return timm_head(dim, num_classes)

    def attach(self, backbone: Backbone) -> None:
        ensure_unmodified(backbone, self.name)
        self.inject(backbone)

    def inject(self, backbone: Backbone) -> None:
        """Wrap or unfreeze the backbone's sub-modules in ``trainable_range`` (prompt methods need nothing here)."""

    def train(self, mode: bool = True) -> "StreamMethod":
        super().train(mode)
        for m in self.wrapped:  # they live in the backbone, which keeps itself in eval mode
            m.train(mode)
        return self

    # -- the stream --
    def enter(self, x: torch.Tensor, backbone: Backbone) -> torch.Tensor:
        """X_s as the first trainable block receives it (prompt methods insert their tokens here)."""
        return x

    def block(self, i: int, x: torch.Tensor, backbone: Backbone) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One trainable block: X_i, K_i, V_i."""
        return backbone.block_forward(i, x)

    def frozen_prefix(self, images: torch.Tensor, backbone: Backbone, keep: Sequence[int] = (),
                      ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """X_s, a fixed function of the image, plus K/V of the ``keep`` blocks below s; no autograd when s > 0."""
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        # With every block trainable the embedding may train too (full, BitFit): keep autograd on then.
        with torch.no_grad() if self.first > 0 else contextlib.nullcontext():
            x = backbone.embed(images)
            for i in range(self.first):
                x, k, v = backbone.block_forward(i, x)
                if i in keep:  # compact copies: views would keep the whole qkv buffer alive
                    keys.append(k.contiguous())
                    values.append(v.contiguous())
        return x, keys, values

    def stream(self, images: torch.Tensor, backbone: Backbone, keep: Sequence[int] = (),
               ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """X_L of the modified stream, and the live K/V (with autograd) of the ``keep`` blocks."""
        x, keys, values = self.frozen_prefix(images, backbone, keep)
        x = self.enter(x, backbone)
        for i in range(self.first, backbone.depth):
            x, k, v = self.block(i, x, backbone)
            if i in keep:
                keys.append(k)
                values.append(v)
        return x, keys, values

    def pool(self, x: torch.Tensor, backbone: Backbone) -> torch.Tensor:
        return backbone.pool(x)

    def forward(self, images: torch.Tensor, backbone: Backbone) -> torch.Tensor:
        x, _, _ = self.stream(images, backbone)
        return self.head(self.pool(x, backbone))
