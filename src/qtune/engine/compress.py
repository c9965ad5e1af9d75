"""Feature selection by group lasso, as VQT (Tu, Mai and Chao, CVPR 2023) and Head2Toe (Evci et al., ICML 2022)
do it: a smaller head over the features that matter.

The trained method's head input is a fixed function of the image (VQT's queries stay fixed; Head2Toe's features are
the frozen backbone's), so a linear classifier is trained on it with an L2,1 penalty (the sum over input dimensions
of the L2 norm of the weight's column), the ``keep`` fraction of dimensions with the largest column norms is kept,
and a fresh classifier is trained on those alone. The result is a model of the same method whose head reads only
the kept dimensions (its ``feature_ids`` option); its other trainable tensors are the input model's.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..methods.layers import vpt_head
from ..data.batches import batch_indices
from ..methods.base import inputs_of
from ..tuned import TunedModel
from .config import TrainConfig
from ..data.batches import Batches
from .steps import epoch_order, optimizer_and_schedule, training_loss


@torch.no_grad()
def classifier_inputs(model: TunedModel, batches: Batches, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """What the method's final linear layer reads, (N, F), for every sample in order, and the labels (eval mode)."""
    classifier = model.method.classifier()
    if classifier is None:
        raise ConfigError(f"method {model.method.name!r} has no linear classifier of its own")
    device = cfg.resolved_device()
    model.to(device).eval()
    labels = []
    with inputs_of(classifier, lambda x: x.float().cpu()) as got:
        for inputs, y in batches.iterate(list(range(len(batches))), cfg.batch_size, device):
            batches.forward(model, inputs)
            labels.append(y.cpu())
    return torch.cat(got), torch.cat(labels)


def train_classifier(head: nn.Linear, features: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig,
                     penalty: float = 0.0) -> float:
    """Train ``head`` on fixed features with ``cfg``'s optimiser and schedule, plus ``penalty`` times the L2,1 norm
    of its weight (the sum of its columns' L2 norms: a group lasso with one group per input dimension). Returns
    the last epoch's mean loss."""
    n = len(labels)
    steps = math.ceil(n / cfg.batch_size)
    optimizer, scheduler = optimizer_and_schedule(head, cfg, steps)
    step, loss_sum = 0, 0.0
    for epoch in range(cfg.epochs):
        loss_sum = 0.0
        for idx in batch_indices(epoch_order(n, cfg.order_seed, epoch), cfg.batch_size):
            loss = training_loss(head(features[idx]), labels[idx])
            if penalty:
                loss = loss + penalty * head.weight.norm(dim=0).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            scheduler.step_update(step)
            loss_sum += loss.item() * len(idx)
    return loss_sum / n


def compress(model: TunedModel, train: Batches, keep: float, cfg: TrainConfig,
             penalty: float = 1e-4) -> tuple[TunedModel, dict[str, Any]]:
    """A model whose head reads the ``keep`` fraction of its input dimensions chosen by the L2,1-penalised
    classifier, retrained on them; and what changed (dimensions and head parameters before and after)."""
    if not hasattr(model.method.config, "feature_ids"):
        raise ConfigError(f"feature selection is VQT's and Head2Toe's (got method {model.method.name!r})")
    if not 0.0 < keep <= 1.0:
        raise ConfigError(f"--keep must be in (0, 1] (got {keep})")
    if penalty < 0:
        raise ConfigError(f"--penalty must be >= 0 (got {penalty})")
    features, labels = classifier_inputs(model, train, cfg)
    width, classes = features.shape[1], model.method.num_classes
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        probe = vpt_head(width, classes)
    train_classifier(probe, features, labels, cfg, penalty)
    k = max(1, int(width * keep))
    chosen = probe.weight.detach().norm(dim=0).topk(k).indices.sort().values
    before = model.method.kept
    ids = chosen if before is None else before.cpu()[chosen]
    options = {**model.method.config.to_dict(), "feature_ids": ids.tolist()}
    small = TunedModel.build(model.backbone, model.method.name, classes, options, seed=cfg.seed)
    head = model.method.classifier()
    kept = {n: p for n, p in model.method.named_parameters() if not any(p is q for q in head.parameters())}
    small.method.load_state_dict(kept, strict=False)  # everything but the head, as trained
    loss = train_classifier(small.method.head, features[:, chosen], labels, cfg)
    head_params = lambda m: sum(p.numel() for p in m.method.head.parameters())  # noqa: E731
    return small, {"features_before": width, "features_after": k, "head_parameters_before": head_params(model),
                   "head_parameters_after": head_params(small), "trainable_before": model.num_trainable(),
                   "trainable_after": small.num_trainable(), "keep": keep, "penalty": penalty,
                   "final_train_loss": loss}
