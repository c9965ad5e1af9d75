"""What one training step of any model is made of, shared by ``fit``, ``fit_many`` and ``compress``: the sample order
of an epoch, the loss, the optimiser and its warmup + cosine schedule."""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn

from .config import TrainConfig

# config.OPTIMIZERS as timm's optimiser names (timm's "sgd" is Nesterov).
_OPTIMIZERS = {"adamw": "adamw", "adam": "adam", "sgd": "momentum"}


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled sample order of one epoch: a function of (seed, epoch) only, so any batch source and a resumed
    run see the same order."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def training_loss(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy, averaged over the batch or, with per-sample ``weight``, weighted (a batch whose weights are all
    zero gives 0). Weight 0 keeps a sample out of training: k-fold CV over batches of all training samples."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half-precision logits: loss in fp32
    if weight is None:
        return F.cross_entropy(logits, labels)
    losses = F.cross_entropy(logits, labels, reduction="none")
    return (weight * losses).sum() / weight.sum().clamp_min(torch.finfo(losses.dtype).tiny)


def optimizer_and_schedule(model: nn.Module, cfg: TrainConfig, steps_per_epoch: int
                           ) -> tuple[torch.optim.Optimizer, CosineLRScheduler]:
    """``model``'s optimiser (decay exemptions as configured) and its per-step warmup + half-cosine schedule."""
    optimizer = create_optimizer_v2(model, opt=_OPTIMIZERS[cfg.optimizer], lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    momentum=cfg.momentum, foreach=True, filter_bias_and_bn=not cfg.decay_all)
    total = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if warmup >= total:  # a warmup as long as training would never reach the peak learning rate
        warmup = total // 2
        print(f"qtune: warmup of {cfg.warmup_epochs:g} epochs is not shorter than training ({cfg.epochs} epochs): "
              f"warming up over the first half ({warmup} of {total} steps) instead", file=sys.stderr)
    return optimizer, warmup_cosine(optimizer, total, warmup, cfg.min_lr)


def warmup_cosine(optimizer: torch.optim.Optimizer, total: int, warmup: int, min_lr: float) -> CosineLRScheduler:
    """Linear warmup from 0 over the first ``warmup`` of ``total`` steps, then half a cosine to ``min_lr``; call
    ``step_update(n)`` with the number of steps taken, which makes the rate a function of the step alone."""
    return CosineLRScheduler(optimizer, t_initial=total - warmup, lr_min=min_lr, warmup_t=warmup, warmup_lr_init=0.0,
                             warmup_prefix=True, t_in_epochs=False)


__all__ = ["epoch_order", "optimizer_and_schedule", "training_loss", "warmup_cosine"]
