"""Prediction and accuracy, one of each: any number of tuned models of one backbone on one read of each batch.

Batches of images are traced once per batch for every side-path model (the blocks and points any of them reads);
cached batches are taps already. Side-path models of one structure run together as a stack (``engine.many``), a
single model being a stack of one; stream methods run on the same decoded images. A sweep reads a task's test split
this way once for all its final models; ``qtune predict`` serves several checkpoints with it.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.batches import Batches
from ..errors import ConfigError
from ..precision import autocast
from ..tuned import TunedModel
from .config import TrainConfig
from .many import ModelStack, stack_key


@torch.no_grad()
def predict(models: Sequence[TunedModel], batches: Batches, cfg: TrainConfig,
            desc: str = "eval") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (G, N, classes) of every model for every sample, in dataset order, and the labels (N,)."""
    if not models:
        raise ConfigError("predict: no models")
    side = [i for i, m in enumerate(models) if m.reads_taps]
    backbone = models[side[0]].backbone if side else None
    if any(models[i].backbone is not backbone for i in side):
        raise ConfigError("predict: side-path models must share the backbone that is traced")
    groups: dict[tuple, list[int]] = {}
    for i in side:
        groups.setdefault(stack_key(models[i]), []).append(i)
    stacks = [(idx, ModelStack([models[i] for i in idx])) for idx in groups.values()]
    device = cfg.resolved_device()
    for m in models:
        m.to(device)
        m.eval()
    blocks = tuple(sorted({b for i in side for b in models[i].blocks_read()}))
    points = tuple(dict.fromkeys(p for i in side for p in models[i].points_read()))
    outs: list[list[torch.Tensor]] = [[] for _ in models]
    labels = []
    order = list(range(len(batches)))
    for inputs, y in tqdm(batches.iterate(order, cfg.batch_size, device), total=math.ceil(len(order) / cfg.batch_size),
                          desc=desc, disable=not cfg.progress, leave=False):
        images = isinstance(inputs, torch.Tensor)
        with autocast(device, cfg.precision):
            if stacks:
                taps = backbone.trace(inputs, blocks, points) if images else inputs
                for idx, s in stacks:
                    for i, logits in zip(idx, s.logits(taps)):
                        outs[i].append(logits.float().cpu())
            for i, m in enumerate(models):
                if not m.reads_taps:
                    if not images:
                        raise ConfigError(f"predict: method {m.method.name!r} trains the stream; it reads images, "
                                          "not cached taps")
                    outs[i].append(m(inputs).float().cpu())
        labels.append(y.cpu())
    return torch.stack([torch.cat(o) for o in outs]), torch.cat(labels)


def accuracies(logits: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor | None = None) -> list[float]:
    """Top-1 accuracy of each model's (G, N, classes) logits, over the samples where ``masks[g]`` is true (all
    samples without masks)."""
    hits = (logits.argmax(-1) == labels).float()
    if masks is None:
        return hits.mean(1).tolist()
    return [(h[m].mean().item() if m.any() else math.nan) for h, m in zip(hits, masks.bool())]


def evaluate(model: TunedModel, batches: Batches, cfg: TrainConfig, desc: str = "eval") -> dict[str, float]:
    """One model's accuracy and mean cross-entropy."""
    logits, labels = predict([model], batches, cfg, desc)
    return {"accuracy": accuracies(logits, labels)[0], "loss": F.cross_entropy(logits[0], labels).item(),
            "n": len(labels)}


__all__ = ["accuracies", "evaluate", "predict"]
