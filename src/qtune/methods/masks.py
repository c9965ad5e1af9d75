"""Random masks (dropout, DropFeat) that a stack of models trained at once draws per model, as each would alone.

One model draws its masks from the global RNG exactly as ``nn.Dropout`` does on CPU (``bernoulli_(keep)``, then
divided by ``keep``); in a stack of one (``engine.many`` runs it without vmap), from that model's generator. Under ``torch.func.vmap`` over a stack of G models (``engine.many``), the vmap rule below draws
model g's mask from its own generator, seeded as model g's own run would seed the global RNG: each model of a stack
sees the masks of its sequential run, in the same order.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

_generators: list[Sequence[torch.Generator]] = []


@contextlib.contextmanager
def per_model_generators(generators: Sequence[torch.Generator]) -> Iterator[None]:
    """Masks drawn under vmap inside this context come from ``generators[g]`` for model g."""
    _generators.append(generators)
    try:
        yield
    finally:
        _generators.pop()


def per_model_masks() -> bool:
    """Whether masks now come from per-model generators, which activation checkpointing does not rewind."""
    return bool(_generators)


class _KeepMask(torch.autograd.Function):
    """A {0, 1/keep} mask shaped like its input; not differentiable (it depends on the input's shape only)."""

    @staticmethod
    def forward(like: torch.Tensor, keep: float) -> torch.Tensor:
        # a stack of one model runs without vmap: its mask comes from its own generator all the same
        gen = _generators[-1][0] if _generators and len(_generators[-1]) == 1 else None
        return torch.empty_like(like).bernoulli_(keep, generator=gen).div_(keep)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.mark_non_differentiable(output)

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - the mask is non-differentiable
        return None, None

    @staticmethod
    def vmap(info, in_dims, like: torch.Tensor, keep: float):
        if not _generators or len(_generators[-1]) != info.batch_size:
            raise RuntimeError("random masks under vmap need per_model_generators() with one generator per model")
        like = like.movedim(in_dims[0], 0) if in_dims[0] is not None else like.expand(info.batch_size, *like.shape)
        masks = [torch.empty_like(like[g]).bernoulli_(keep, generator=gen).div_(keep)
                 for g, gen in enumerate(_generators[-1])]
        return torch.stack(masks), 0


def keep_mask(like: torch.Tensor, keep: float) -> torch.Tensor:
    """A mask like ``like``: each entry 1/keep with probability ``keep``, else 0."""
    return _KeepMask.apply(like, keep)


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose masks a stack of models draws per model (see the module's docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return x * keep_mask(x, 1.0 - self.p)
