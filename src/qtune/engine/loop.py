"""The training and evaluation loops: one obvious loop, whatever the batches are (images, or cached taps)."""
from __future__ import annotations

import math
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn
from tqdm.auto import tqdm

from ..data.batches import ImageBatches, batch_indices  # noqa: F401 - ImageBatches: also importable from here
from ..errors import ConfigError, TrainingError
from ..tuned import TunedModel
from .config import TrainConfig
from .state import load_state, save_state

# config.OPTIMIZERS / PRECISIONS as timm's optimiser names and autocast dtypes (timm's "sgd" is Nesterov).
_OPTIMIZERS = {"adamw": "adamw", "adam": "adam", "sgd": "momentum"}
_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Batches(Protocol):
    """A source of (inputs, labels, indices) batches in a given sample order, and how the model consumes them."""

    def __len__(self) -> int: ...

    def iterate(self, order: list[int], batch_size: int, device: torch.device) -> Iterator[tuple[Any, torch.Tensor]]:
        ...

    def forward(self, model: TunedModel, inputs: Any) -> torch.Tensor: ...


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled sample order of one epoch: a function of (seed, epoch) only, so any batch source and a resumed
    run see the same order."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def _autocast(device: torch.device, precision: str):
    dtype = _PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak memory so far: CUDA's max allocated, or the process's peak RSS on CPU (an upper bound, labelled so)."""
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device), "peak_memory_kind": "cuda_max_allocated"}
    scale = 1 if sys.platform == "darwin" else 1024
    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale,
            "peak_memory_kind": "cpu_peak_rss"}


@torch.no_grad()
def predict(model: TunedModel, batches: Batches, cfg: TrainConfig, desc: str = "eval") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels for every sample, in dataset order."""
    device = cfg.resolved_device()
    model.eval()
    logits, labels = [], []
    order = list(range(len(batches)))
    total = math.ceil(len(order) / cfg.batch_size)
    for inputs, y in tqdm(batches.iterate(order, cfg.batch_size, device), total=total, desc=desc,
                          disable=not cfg.progress, leave=False):
        with _autocast(device, cfg.precision):
            logits.append(batches.forward(model, inputs).float().cpu())
        labels.append(y.cpu())
    return torch.cat(logits), torch.cat(labels)


def evaluate(model: TunedModel, batches: Batches, cfg: TrainConfig, desc: str = "eval") -> dict[str, float]:
    logits, labels = predict(model, batches, cfg, desc)
    return {"accuracy": (logits.argmax(1) == labels).float().mean().item(),
            "loss": F.cross_entropy(logits, labels).item(), "n": len(labels)}


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
    scheduler = CosineLRScheduler(optimizer, t_initial=total - warmup, lr_min=cfg.min_lr, warmup_t=warmup,
                                  warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
    return optimizer, scheduler


def training_loss(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy, averaged over the batch or, with per-sample ``weight``, weighted (a batch whose weights are all
    zero gives 0). Weight 0 keeps a sample out of training: k-fold CV over batches of all training samples."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half-precision logits: loss in fp32
    if weight is None:
        return F.cross_entropy(logits, labels)
    losses = F.cross_entropy(logits, labels, reduction="none")
    return (weight * losses).sum() / weight.sum().clamp_min(torch.finfo(losses.dtype).tiny)


def fit(model: TunedModel, train: Batches, cfg: TrainConfig, val: Batches | None = None,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
        state: Path | None = None, sample_weight: torch.Tensor | None = None,
        stop_on_nonfinite: bool = True) -> list[dict[str, Any]]:
    """Train ``model``'s trainable parameters; returns per-epoch records (also passed to ``on_epoch``).

    A loss that is not finite stops the run with a TrainingError before the step that would spread it into the
    weights (``stop_on_nonfinite=False``: go on, as a stack of selection candidates does, scoring it as it ends).

    With ``state``, everything the rest of the run depends on (trainable tensors, optimiser, schedule, RNG, history)
    is written there atomically after every epoch, and a run that finds the file continues after its last epoch:
    killed at any moment and run again, it ends with the same weights as an uninterrupted run.
    ``sample_weight`` (one per training sample) weights each sample's loss; 0 leaves it out (``training_loss``).
    """
    device = cfg.resolved_device()
    model.to(device)
    if not model.trainable_parameters():
        raise ConfigError("the model has no trainable parameters")
    if sample_weight is not None and len(sample_weight) != len(train):
        raise ConfigError(f"sample_weight has {len(sample_weight)} entries for {len(train)} training samples")
    torch.manual_seed(cfg.seed)  # dropout and DropFeat
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    optimizer, scheduler = optimizer_and_schedule(model, cfg, steps_per_epoch)
    total = cfg.epochs * steps_per_epoch
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16" and device.type == "cuda")
    history: list[dict[str, Any]] = []
    step = first = 0
    if state is not None and state.is_file():
        saved = load_state(state)
        model.load_state_dict(saved["trainable"], strict=False)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        torch.set_rng_state(saved["rng"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(saved["cuda_rng"], device)
        history, step, first = saved["history"], saved["step"], saved["epoch"]
    bar = tqdm(total=total, initial=step, desc="train", disable=not cfg.progress, dynamic_ncols=True)
    for epoch in range(first, cfg.epochs):
        model.train()
        start, loss_sum, seen = time.perf_counter(), 0.0, 0.0
        order = epoch_order(len(train), cfg.order_seed, epoch)
        for idx, (inputs, y) in zip(batch_indices(order, cfg.batch_size),
                                    train.iterate(order, cfg.batch_size, device)):
            w = None if sample_weight is None else sample_weight[idx].to(device)
            with _autocast(device, cfg.precision):
                loss = training_loss(train.forward(model, inputs), y, w)
            value = loss.item()
            if stop_on_nonfinite and not math.isfinite(value):
                bar.close()
                hint = "lower --lr" + (" or use --precision fp32" if cfg.precision != "fp32" else "")
                raise TrainingError(f"training diverged: the loss is {value} at epoch {epoch + 1}, step {step + 1} "
                                    f"(lr {cfg.lr:g}); {hint}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            try:
                scaler.step(optimizer)
            except RuntimeError as e:  # a step size beyond float32 (lr / Adam's bias correction, lr x decay)
                if "without overflow" not in str(e):
                    raise
                bar.close()
                raise TrainingError(f"training diverged: the optimiser's step overflows float32 at epoch {epoch + 1}, "
                                    f"step {step + 1} (lr {cfg.lr:g}, weight_decay {cfg.weight_decay:g}); "
                                    "lower --lr") from None
            scaler.update()
            step += 1
            scheduler.step_update(step)
            n = len(y) if w is None else w.sum().item()
            loss_sum += value * n
            seen += n
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{value:.3f}")
            del inputs  # let this batch (e.g. cached K/V) go before the next one is read
        record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1e-12),
                                  "lr": optimizer.param_groups[0]["lr"], "epoch_seconds": time.perf_counter() - start}
        if val is not None and cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            record["val_accuracy"] = evaluate(model, val, cfg, "val")["accuracy"]
            bar.set_postfix(epoch=epoch + 1, loss=f"{record['train_loss']:.3f}", val=f"{record['val_accuracy']:.3f}")
        history.append(record)
        if state is not None:
            save_state(state, dict(
                trainable={n: p.detach() for n, p in model.trainable_parameters().items()},
                optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                rng=torch.get_rng_state(), cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                history=history, step=step, epoch=epoch + 1))
        if on_epoch is not None:
            on_epoch(record)
    bar.close()
    return history
