"""Many side-path models trained at once: one read of a batch of cached taps feeds every model of a stack.

A stack is G models of one method with the same structure (``MethodConfig.structure``) on one backbone. Their
trainable tensors are stacked per step and one ``torch.func.vmap`` over ``functional_call`` runs the method's own
module code for all G: the frozen blocks are shared, and the query attention folds the G models' queries into one
product over the shared K/V (``backbones.vit._QueryAttention``). Each model keeps its own optimiser and schedule
(the ones ``fit`` builds), its own seed (masks drawn from its own generator, ``methods.masks``) and its own per-sample
weights, so model g ends where ``fit`` of its config alone ends, given the same batch order (``shuffle_seed``).

k-fold CV costs no extra read: every batch holds all training samples and the model of fold k weights the samples
of fold k by 0 (``fold_weights``), then is evaluated on exactly those.
"""
from __future__ import annotations

import json
import math
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap
from tqdm.auto import tqdm

from ..data.batches import batch_indices
from ..errors import ConfigError
from ..methods.masks import per_model_generators
from ..tuned import TunedModel
from .config import TrainConfig
from ..data.batches import Batches
from ..precision import autocast
from .state import load_state, save_state
from .steps import epoch_order, optimizer_and_schedule, training_loss

# TrainConfig fields that every model of a stack must share: they decide which batches are read, and when.
SHARED = ("epochs", "batch_size", "precision", "device", "num_workers")


def stack_key(model: TunedModel) -> tuple:
    """Models with equal keys can train in one stack: same method, classes, structure and backbone."""
    method = model.method
    return (method.name, method.num_classes, json.dumps(method.config.structure(), sort_keys=True), id(model.backbone))


class ModelStack:
    """G models of one structure, run as one: ``losses`` and ``logits`` give one value per model."""

    def __init__(self, models: Sequence[TunedModel]):
        if not models:
            raise ConfigError("a stack needs at least one model")
        keys = {stack_key(m) for m in models}
        if len(keys) > 1:
            raise ConfigError(f"models of one stack must share method, classes, structure and backbone; got "
                              f"{len(keys)} kinds (group them with stack_key)")
        if not models[0].reads_taps:
            raise ConfigError(f"method {models[0].method.name!r} trains the stream; only side-path methods stack")
        self.models = list(models)
        self.base = models[0].method
        self.backbone = models[0].backbone
        self.names = [n for n, p in self.base.named_parameters() if p.requires_grad]
        frozen = [n for n, p in self.base.named_parameters() if not p.requires_grad]
        if frozen:  # they would be taken from the first model for all
            raise ConfigError(f"method {self.base.name!r} has frozen tensors of its own ({', '.join(frozen)})")
        self.params = [dict(m.method.named_parameters()) for m in models]

    def __len__(self) -> int:
        return len(self.models)

    def stacked(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor as (G, ...), differentiable back to each model's own parameter."""
        return {n: torch.stack([p[n] for p in self.params]) for n in self.names}

    def taps(self, inputs: Any) -> Any:
        """Taps as given (a cache), or traced live from images: what every model of the stack reads."""
        return self.models[0].trace(inputs) if isinstance(inputs, torch.Tensor) else inputs

    def logits(self, inputs: Any) -> torch.Tensor:
        """(G, B, classes); train or eval mode as set by ``train``."""
        taps = self.taps(inputs)
        if len(self.models) == 1:  # see losses
            return self.base(taps, self.backbone).unsqueeze(0)

        def one(params: dict[str, torch.Tensor]) -> torch.Tensor:
            return functional_call(self.base, params, (taps, self.backbone))
        with self.known_fallback():
            return vmap(one, randomness="error")(self.stacked())

    def losses(self, inputs: Any, labels: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """(G,) training losses; ``weights`` (G, B) per model and sample, or None for plain means."""
        why = self.models[0].live_only
        if why:  # each model would need its own random stream, and its masks under vmap its own generator
            raise ConfigError(f"method {self.base.name!r}: {why}; such models train one at a time (fit), not stacked")
        taps = self.taps(inputs)
        if len(self.models) == 1:  # one model runs as itself: vmap's batching costs 1.4-1.9x per SynQT step
            w = None if weights is None else weights[0]
            return training_loss(self.base(taps, self.backbone), labels, w)[None]

        def one(params: dict[str, torch.Tensor], w: torch.Tensor | None) -> torch.Tensor:
            return training_loss(functional_call(self.base, params, (taps, self.backbone)), labels, w)
        with self.known_fallback():
            return vmap(one, in_dims=(0, None if weights is None else 0), randomness="error")(self.stacked(),
                                                                                              weights)

    @contextmanager
    def known_fallback(self) -> Iterator[None]:
        """Where the method declares that vmap loops over its models on this device (``Method.stacks_on``), PyTorch's
        warning about the missing batching rule says nothing new: it is kept out of the user's log."""
        with warnings.catch_warnings():
            if len(self.models) > 1 and next(self.base.parameters()).device.type not in type(self.base).stacks_on:
                warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet "
                                                          "implemented the batching rule")
            yield

    def train(self, mode: bool = True) -> None:
        for m in self.models:
            m.train(mode)


def _check_configs(cfgs: Sequence[TrainConfig], count: int) -> None:
    if len(cfgs) != count:
        raise ConfigError(f"{count} models but {len(cfgs)} training configs")
    for name in (*SHARED, "order_seed"):
        values = {getattr(c, name) for c in cfgs}
        if len(values) > 1:
            raise ConfigError(f"models trained together share {name}; got {sorted(values, key=str)} "
                              "(set shuffle_seed to share the batch order)")
    for c in cfgs:
        if c.eval_every:
            raise ConfigError("fit_many does not validate during training (eval_every must be 0)")


def fit_many(models: Sequence[TunedModel], train: Batches, cfgs: Sequence[TrainConfig],
             sample_weights: torch.Tensor | None = None,
             on_epoch: Callable[[int, list[dict[str, Any]]], None] | None = None,
             states: Sequence[Path] | None = None, until: int | None = None) -> list[list[dict[str, Any]]]:
    """Train ``models[g]`` with ``cfgs[g]`` (per model: lr, weight decay, optimiser, schedule, seed; shared: the
    ``SHARED`` fields and the batch order), all from one read of each batch. ``sample_weights`` (G, N) weights each
    model's samples (0 holds a sample out). Returns each model's per-epoch records, as ``fit`` does.

    ``until`` stops after that epoch, a point in the full schedule (a rung of successive halving); with ``states``
    (one file per model) each model's training state is written there when it stops, and a stack whose files all
    exist at one epoch goes on from it. Each model's run depends on its own state only, so the models that go on may
    do so in a smaller stack.

    Models that trace the frozen stream live while training (``MethodConfig.live_only``: SynQT's ``drop_path``)
    share no trace, so they train one after another, each with ``fit`` (``on_epoch`` then gets one model's record).
    """
    stack = ModelStack(models)
    _check_configs(cfgs, len(stack))
    if stack.models[0].live_only:
        return _one_by_one(stack.models, train, cfgs, sample_weights, on_epoch, states, until)
    cfg0 = cfgs[0]
    device = cfg0.resolved_device()
    if cfg0.precision == "fp16" and device.type == "cuda":
        raise ConfigError("fit_many: fp16 needs one loss scaler per model; use bf16 (or fp32)")
    n = len(train)
    if sample_weights is not None and tuple(sample_weights.shape) != (len(stack), n):
        raise ConfigError(f"sample_weights must be (models, samples) = ({len(stack)}, {n}); "
                          f"got {tuple(sample_weights.shape)}")
    for m in stack.models:
        m.to(device)
    steps_per_epoch = math.ceil(n / cfg0.batch_size)
    schedules = [optimizer_and_schedule(m, c, steps_per_epoch) for m, c in zip(stack.models, cfgs)]
    # Each model's masks come from a generator seeded as fit seeds the global RNG for that model.
    generators = [torch.Generator(device).manual_seed(c.seed) for c in cfgs]
    histories: list[list[dict[str, Any]]] = [[] for _ in cfgs]
    first = _resume(stack, schedules, generators, histories, states)
    step = first * steps_per_epoch
    last = cfg0.epochs if until is None else min(until, cfg0.epochs)
    bar = tqdm(total=cfg0.epochs * steps_per_epoch, initial=step, desc=f"train x{len(stack)}",
               disable=not cfg0.progress, dynamic_ncols=True)
    for epoch in range(first, last):
        stack.train()
        start = time.perf_counter()
        loss_sum = torch.zeros(len(stack), dtype=torch.float64)
        seen = torch.zeros(len(stack), dtype=torch.float64)
        order = epoch_order(n, cfg0.order_seed, epoch)
        for idx, (inputs, y) in zip(batch_indices(order, cfg0.batch_size),
                                    train.iterate(order, cfg0.batch_size, device)):
            w = None if sample_weights is None else sample_weights[:, idx].to(device)
            with per_model_generators(generators), autocast(device, cfg0.precision):
                losses = stack.losses(inputs, y, w)
            for opt, _ in schedules:
                opt.zero_grad(set_to_none=True)
            with stack.known_fallback():
                losses.sum().backward()  # model g's parameters get the gradient of its own loss only
            step += 1
            for opt, sched in schedules:
                opt.step()
                sched.step_update(step)
            counts = torch.full((len(stack),), float(len(y))) if w is None else w.sum(1).double().cpu()
            loss_sum += losses.detach().double().cpu() * counts
            seen += counts
            bar.update(1)
            del inputs
        seconds = time.perf_counter() - start
        for g, (opt, _) in enumerate(schedules):
            histories[g].append({"epoch": epoch + 1, "train_loss": (loss_sum[g] / seen[g].clamp_min(1e-12)).item(),
                                 "lr": opt.param_groups[0]["lr"], "epoch_seconds": seconds / len(stack)})
        if on_epoch is not None:
            on_epoch(epoch + 1, [h[-1] for h in histories])
    bar.close()
    if states is not None and last < cfg0.epochs:
        for m, (opt, _), gen, history, path in zip(stack.models, schedules, generators, histories, states):
            save_state(path, {"trainable": {n: p.detach() for n, p in m.trainable_parameters().items()},
                              "optimizer": opt.state_dict(), "generator": gen.get_state(), "history": history,
                              "epoch": last})
    return histories


def _one_by_one(models: Sequence[TunedModel], train: Batches, cfgs: Sequence[TrainConfig],
                sample_weights: torch.Tensor | None, on_epoch: Callable[[int, list[dict[str, Any]]], None] | None,
                states: Sequence[Path] | None, until: int | None) -> list[list[dict[str, Any]]]:
    """``fit`` of each model alone: its random draws (stochastic depth included) come from the global RNG seeded
    with its own seed, so each run is what ``qtune train`` of its config gives; a rung's state is ``fit``'s."""
    from .loop import fit  # loop -> predict -> many

    return [fit(m, train, c, sample_weight=None if sample_weights is None else sample_weights[g],
                on_epoch=None if on_epoch is None else (lambda r: on_epoch(r["epoch"], [r])),
                stop_on_nonfinite=False, state=None if states is None else Path(states[g]), until=until)
            for g, (m, c) in enumerate(zip(models, cfgs))]


def _resume(stack: ModelStack, schedules: list, generators: list[torch.Generator],
            histories: list[list[dict[str, Any]]], states: Sequence[Path] | None) -> int:
    """Load the models' saved states and return the epoch they reached; 0 (a fresh start) unless every model has a
    state and all are at one epoch, which stacking needs (a lost file costs a rerun, never a wrong result)."""
    if states is None or len(states) != len(stack) or not all(Path(p).is_file() for p in states):
        return 0
    saved = [load_state(Path(p)) for p in states]
    if len({s["epoch"] for s in saved}) != 1:
        return 0
    for m, (opt, _), gen, history, s in zip(stack.models, schedules, generators, histories, saved):
        m.load_state_dict(s["trainable"], strict=False)
        opt.load_state_dict(s["optimizer"])  # with the learning rate the schedule set at the last step
        gen.set_state(s["generator"])
        history[:] = s["history"]
    return int(saved[0]["epoch"])


def fold_weights(labels: Sequence[int], folds: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified k-fold CV as sample weights: (folds, N) weights, 0 on fold k's held-out samples and 1 elsewhere,
    and the (folds, N) held-out masks. Deterministic given ``seed`` (scikit-learn's StratifiedKFold, shuffled)."""
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(labels)
    counts = np.bincount(y)
    if folds < 2 or counts[counts > 0].min() < folds:
        raise ConfigError(f"{folds}-fold CV needs folds >= 2 and at least {folds} samples of every class "
                          f"(the rarest has {counts[counts > 0].min()})")
    held = torch.zeros(folds, len(y), dtype=torch.bool)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, test) in enumerate(splitter.split(np.zeros(len(y)), y)):
        held[k, torch.from_numpy(test)] = True
    return (~held).float(), held


def step_bytes(models: Sequence[TunedModel], train: Batches, batch_size: int) -> int:
    """Training memory of one stacked step of ``models`` (``memory.step.step_memory``, as ``qtune memory``); the
    frozen backbone, shared, is not counted."""
    from ..memory.step import step_memory

    stack = ModelStack(models)
    generators = [torch.Generator().manual_seed(g) for g in range(len(stack))]
    stack.train()

    def loss(inputs: Any, labels: torch.Tensor) -> torch.Tensor:
        with per_model_generators(generators):
            return stack.losses(inputs, labels, None).sum()

    holder = nn.ModuleList(m.method for m in stack.models)
    return step_memory(holder, train, batch_size, loss, next(stack.base.parameters()).device).total


def models_per_stack(build: Callable[[int], TunedModel], train: Batches, batch_size: int, budget: int,
                     most: int) -> int:
    """How many models of one structure fit ``budget`` bytes in one stack, from two measured steps (one model and
    two): memory grows by one model's share per model. At least 1; at most ``most``."""
    one = step_bytes([build(0)], train, batch_size)
    two = step_bytes([build(0), build(1)], train, batch_size)
    per_model = max(two - one, 1)
    fit = (budget - (one - per_model)) // per_model
    return int(max(1, min(most, fit)))


__all__ = ["ModelStack", "SHARED", "fit_many", "fold_weights", "models_per_stack",
           "stack_key", "step_bytes"]

