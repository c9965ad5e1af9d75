"""Training memory of one step of a model on its own batches (cached taps or live images), as training runs it."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .account import StepMemory, measure_step

# Reports compare methods' training memory at one batch size, the papers' tables' (each recipe's own batch differs:
# VQT trains at 128, the others at 64).
COMPARED_BATCH = 64


def batch_tensors(inputs: Any) -> list[torch.Tensor]:
    """The tensors a batch holds: images, or taps (K/V, pooled feature, block points)."""
    if not hasattr(inputs, "pooled"):
        return [inputs]
    return [*inputs.keys, *inputs.values, inputs.pooled, *(t for ts in inputs.points.values() for t in ts)]


def step_memory(model: nn.Module, batches: Any, batch_size: int,
                loss: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
                device: torch.device | str = "cpu") -> StepMemory:
    """One AdamW step of ``model`` on the first ``batch_size`` samples of ``batches`` (``engine.loop.Batches``),
    measured by ``measure_step``; the loss is ``loss(inputs, labels)``, by default the cross-entropy of
    ``batches.forward(model, inputs)``. The model is measured in the mode it is in."""
    inputs, labels = next(batches.iterate(list(range(min(batch_size, len(batches)))), batch_size,
                                          torch.device(device)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    if loss is None:
        def loss(x: Any, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(batches.forward(model, x), y)
    return measure_step(model, optimizer, lambda: loss(inputs, labels), batch_tensors(inputs))
