"""One trace, many heads: several tuned models of one backbone evaluated on one read of each batch of images.

The frozen stream is traced once per batch (the blocks any side-path model reads); every side-path model reads those
taps, models of one structure together as a stack (``engine.many``); stream methods run on the same decoded images.
A sweep reads a task's test split this way once for all its final models; ``qtune predict`` serves several
checkpoints with it.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..backbones import Backbone
from ..errors import ConfigError
from ..tuned import TunedModel
from .config import TrainConfig
from ..data.batches import ImageBatches
from .loop import _autocast
from .many import ModelStack, stack_key


@torch.no_grad()
def predict_heads(backbone: Backbone, models: Sequence[TunedModel], images: ImageBatches, cfg: TrainConfig,
                  desc: str = "predict") -> tuple[list[torch.Tensor], torch.Tensor]:
    """Logits (N, classes) of each model, in ``models``' order, and the labels, from one pass over ``images``."""
    side = [i for i, m in enumerate(models) if m.reads_taps]
    for m in models:
        if m.reads_taps and m.backbone is not backbone:
            raise ConfigError("predict_heads: side-path models must share the backbone that is traced")
    groups: dict[tuple, list[int]] = {}
    for i in side:
        groups.setdefault(stack_key(models[i]), []).append(i)
    stacks = [(idx, ModelStack([models[i] for i in idx])) for idx in groups.values()]
    device = cfg.resolved_device()
    for m in models:
        m.to(device)
        m.eval()
    for _, s in stacks:
        s.train(False)
    blocks = tuple(sorted({b for i in side for b in models[i].blocks_read()}))
    points = tuple(dict.fromkeys(p for i in side for p in models[i].points_read()))
    outs: list[list[torch.Tensor]] = [[] for _ in models]
    labels = []
    order = list(range(len(images)))
    for x, y in tqdm(images.iterate(order, cfg.batch_size, device), total=math.ceil(len(order) / cfg.batch_size),
                     desc=desc, disable=not cfg.progress, leave=False):
        with _autocast(device, cfg.precision):
            if stacks:
                taps = backbone.trace(x, blocks, points)
                for idx, s in stacks:
                    for i, logits in zip(idx, s.logits(taps)):
                        outs[i].append(logits.float().cpu())
            for i, m in enumerate(models):
                if not m.reads_taps:
                    outs[i].append(m(x).float().cpu())
        labels.append(y.cpu())
    return [torch.cat(o) for o in outs], torch.cat(labels)
