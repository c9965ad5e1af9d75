"""Training memory of one method on one backbone at one batch size, from a real training step.

Three ways to train, three figures:

- ``live``: images in, the frozen stream traced inside the step (side-path methods) or trained through (stream
  methods). What ``qtune train`` holds without a cache.
- ``cached``: side-path methods only. The batch's K/V (fp32, as a cached run converts them when read) and pooled
  feature are inputs resident before the step; no backbone forward runs. What ``qtune train --cache`` holds.
- ``cached_stream``: as ``cached`` with ``--stream-blocks``: only the pooled feature is resident; each block's K/V
  are read inside the step, under activation checkpointing, from an fp16 copy standing in for the cache's memory map
  (``cache_source_bytes``, page cache in a real run, not counted in the total).

The step is ``qtune.memory.account.measure_step``: AdamW, cross-entropy, the second of two steps.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..backbones import Backbone
from ..errors import ConfigError
from ..precision import autocast, check_precision, precision_label
from ..tuned import TunedModel
from .account import measure_step

MODES = ("live", "cached", "cached_stream")
def _stream_taps(taps, blocks: tuple[int, ...]):
    """StreamedTaps over an fp16 copy of the batch's K/V: each read gathers the block (one fp16 copy, as the memory
    map's fancy index does) and converts it to fp32, inside the step."""
    from ..cache.read import StreamedTaps

    source = {b: (k.half(), v.half()) for b, k, v in zip(blocks, taps.keys, taps.values)}

    def read(block: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = source[block]
        return k.clone().float(), v.clone().float()

    source_bytes = sum(k.nbytes + v.nbytes for k, v in source.values())
    return StreamedTaps(read, taps.pooled, blocks, taps.points), source_bytes


def measure_training(backbone: Backbone, method: str, options: dict[str, Any] | None = None, *, batch_size: int,
                     num_classes: int = 100, mode: str = "live", device: torch.device | str = "cpu",
                     precision: str = "fp32", seed: int = 0) -> dict[str, Any]:
    """One measured training step of ``method``: a row with the StepMemory fields and what was measured."""
    if mode not in MODES:
        raise ConfigError(f"mode {mode!r}: choose from {', '.join(MODES)}")
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1 (got {batch_size})")
    check_precision(precision)
    device = torch.device(device)
    model = TunedModel.build(backbone, method, num_classes, dict(options or {}), seed=0).to(device).train()
    if mode != "live" and not model.reads_taps:
        raise ConfigError(f"method {method!r} trains the stream; it has no cached run (mode {mode!r})")
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, *model.backbone.preprocessing.input_size, generator=gen).to(device)
    labels = torch.randint(0, num_classes, (batch_size,), generator=gen).to(device)
    extra: dict[str, Any] = {}
    if mode == "live":
        inputs: list[torch.Tensor] = [images, labels]

        def forward() -> torch.Tensor:
            return model(images)
    else:
        blocks = model.blocks_read()
        taps = model.trace(images)
        del images
        points = [t for ts in taps.points.values() for t in ts]
        if mode == "cached_stream":
            taps, extra["cache_source_bytes"] = _stream_taps(taps, tuple(blocks))
            inputs = [taps.pooled, *points, labels]
        else:
            inputs = [*taps.keys, *taps.values, taps.pooled, *points, labels]

        def forward() -> torch.Tensor:
            return model.forward_taps(taps)

    def loss_fn() -> torch.Tensor:
        with autocast(device, precision):
            return F.cross_entropy(forward(), labels)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=1e-2)
    step = measure_step(model, optimizer, loss_fn, inputs)
    return {"method": method, "mode": mode, "options": dict(options or {}), "batch_size": batch_size,
            "trainable_parameters": sum(p.numel() for p in trainable),
            "precision": precision_label(precision), **step.to_dict(), **extra}
