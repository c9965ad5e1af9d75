"""The training and evaluation loops: one obvious loop, whatever the batches are (images, or cached taps)."""
from __future__ import annotations

import math
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ..data.batches import Batches, batch_indices
from ..errors import ConfigError, TrainingError
from ..precision import autocast
from ..tuned import TunedModel
from .config import TrainConfig
from .predict import evaluate
from .state import load_state, save_state
from .steps import epoch_order, optimizer_and_schedule, training_loss


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak memory so far: CUDA's max allocated, or the process's peak RSS on CPU (an upper bound, labelled so)."""
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device), "peak_memory_kind": "cuda_max_allocated"}
    scale = 1 if sys.platform == "darwin" else 1024
    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale,
            "peak_memory_kind": "cpu_peak_rss"}


def fit(model: TunedModel, train: Batches, cfg: TrainConfig, val: Batches | None = None,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
        state: Path | None = None, sample_weight: torch.Tensor | None = None,
        stop_on_nonfinite: bool = True, until: int | None = None) -> list[dict[str, Any]]:
    """Train ``model``'s trainable parameters; returns per-epoch records (also passed to ``on_epoch``).

    A loss that is not finite stops the run with a TrainingError before the step that would spread it into the
    weights (``stop_on_nonfinite=False``: go on, as a stack of selection candidates does, scoring it as it ends).

    With ``state``, everything the rest of the run depends on (trainable tensors, optimiser, schedule, RNG, history)
    is written there atomically after every epoch, and a run that finds the file continues after its last epoch:
    killed at any moment and run again, it ends with the same weights as an uninterrupted run.
    ``sample_weight`` (one per training sample) weights each sample's loss; 0 leaves it out (``training_loss``).
    ``until`` stops after that epoch, a point in the full schedule (a rung of successive halving); run again with the
    same ``state``, it goes on from there.
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
    for epoch in range(first, cfg.epochs if until is None else min(until, cfg.epochs)):
        model.train()
        start, loss_sum, seen = time.perf_counter(), 0.0, 0.0
        order = epoch_order(len(train), cfg.order_seed, epoch)
        for idx, (inputs, y) in zip(batch_indices(order, cfg.batch_size),
                                    train.iterate(order, cfg.batch_size, device)):
            w = None if sample_weight is None else sample_weight[idx].to(device)
            with autocast(device, cfg.precision):
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
