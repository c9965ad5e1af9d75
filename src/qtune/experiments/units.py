"""What a worker runs: a unit of a sweep (a task's cache, a stack of selection trials, a task's final runs and test
pass), as typed values that cross the process or Ray boundary whole. The planner (``planner.Plan.unit``) builds them;
``run_unit`` runs one and never raises: a failure comes back as an ``Outcome`` with the error, for the driver to
record."""
from __future__ import annotations

import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..backbones import BackboneSpec
from ..backbones.points import Point
from ..engine.config import TrainConfig
from .tasks import TaskSource

KINDS = ("cache", "select", "final")


@dataclass(frozen=True)
class Item:
    """One trial as a worker trains it: the method labelled ``label`` in the tables runs ``method``."""

    key: str
    label: str
    method: str
    options: dict[str, Any]
    train: TrainConfig
    fold: int  # selection: the held-out fold (-1: the validation samples); final runs: -1
    until: int | None = None  # successive halving: train to this epoch of the schedule (and save the state) and score


@dataclass(frozen=True)
class Unit:
    kind: str  # one of KINDS
    task: str
    source: TaskSource
    num_classes: int
    backbone: BackboneSpec  # the spec's, or a labelled method's own (then ``cache`` is None: it trains live)
    cache: str | None
    checkpoints: str
    cache_dtype: str
    protocol: dict[str, Any]  # selection, folds, seed (of the folds), cache_dtype
    items: tuple[Item, ...]
    blocks: tuple[int, ...]  # what the task's cache stores
    points: tuple[Point, ...]
    threads: int = 1
    progress: bool = False
    states: str | None = None  # successive halving: the folder of the trials' training states between rungs

    @property
    def keys(self) -> list[str]:
        return [i.key for i in self.items]


@dataclass
class Outcome:
    """A unit's trial results (key -> what ``Store.record`` takes), or the error that stopped it."""

    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None
    test_read: bool = False  # the unit read its task's test split


def say(*args: Any, **kwargs: Any) -> None:
    """Progress on stdout. A reader that left (`qtune sweep ... | head`) does not stop the sweep: the rest of the
    output goes nowhere and the work goes on (its results are in the store)."""
    try:
        print(*args, **kwargs)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def run_unit(unit: Unit) -> Outcome:
    """Run one unit on its thread count; never raises."""
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(unit.threads)
        return {"cache": cache, "select": select, "final": final}[unit.kind](unit)
    except Exception as e:  # noqa: BLE001 - any failure of a unit is recorded, not raised
        where = traceback.extract_tb(e.__traceback__)[-1]
        return Outcome(error=f"{type(e).__name__}: {e} ({Path(where.filename).name}:{where.lineno})")
    finally:
        torch.set_num_threads(before)


def cache(unit: Unit) -> Outcome:
    from ..cache import build_cache

    data = unit.source.read()
    build_cache(unit.cache, unit.backbone.load(), [data.pool], dtype=unit.cache_dtype, blocks=list(unit.blocks),
                progress=False, on_chunk=_ticker(unit, f"cache of {len(data.pool.samples)} images", "chunk"),
                points=list(unit.points))
    return Outcome()


def _ticker(unit: Unit, what: str, step: str = "epoch", every: float = 20.0) -> Callable[[int], None] | None:
    """A callback, called with a step's number (an epoch, a cache chunk), printing a line at most every ``every``
    seconds (None without progress): no long stretch of a sweep is silent."""
    if not unit.progress:
        return None
    last = [time.perf_counter()]

    def tick(epoch: int) -> None:
        if time.perf_counter() - last[0] >= every:
            last[0] = time.perf_counter()
            say(f"    {unit.task} {what}: {step} {epoch} done", flush=True)
    return tick


def _batches(model, unit: Unit, listings):
    from ..cache import batches_for

    batches, notes = batches_for(model, unit.cache if model.reads_taps else None, listings)
    if notes:
        say("\n".join(notes))
    return batches


def _held_out(unit: Unit, data) -> Any:
    """(folds, N) held-out masks over the pool: k stratified folds, or the validation samples as the one fold (-1).
    Outside the samples final runs train on (few-shot: the val list) a selection run never trains either."""
    from ..engine.many import fold_weights

    p = unit.protocol
    if p["selection"] == "kfold":
        return fold_weights(data.pool.labels, p["folds"], p["seed"])[1]
    return data.val.unsqueeze(0)


def _build(backbone, unit: Unit, items: tuple[Item, ...] | list[Item]):
    from ..tuned import TunedModel

    return [TunedModel.build(backbone, i.method, unit.num_classes, i.options, seed=i.train.seed) for i in items]


def _fit(models, batches, cfgs, weights, tick, selection: bool, states: list[Path] | None = None,
         until: int | None = None) -> None:
    """Side-path models train as one stack; a stream method's model alone (it traces its own stream). A diverged
    selection candidate is scored as it ends (as in a stack), a diverged final run is a failed trial. With
    ``until``, training stops at that epoch, each model's state saved in ``states`` (or continued from there)."""
    from ..engine.loop import fit
    from ..engine.many import fit_many

    if models[0].reads_taps:
        fit_many(models, batches, cfgs, weights, on_epoch=tick and (lambda e, _: tick(e)), states=states,
                 until=until)
        return
    for g, (m, c) in enumerate(zip(models, cfgs)):
        fit(m, batches, c, sample_weight=None if weights is None else weights[g],
            on_epoch=tick and (lambda r: tick(r["epoch"])), stop_on_nonfinite=not selection,
            state=None if states is None else states[g], until=until)


def trained_samples(pool, weights):
    """What a unit's models train on: when they all weight the same samples (selection on val, final runs), those
    samples alone and no weights, so an epoch is one pass over the training set at the recipe's batch size (a
    few-shot pool's val samples would otherwise make its epochs up to 17x longer and its batches mostly weight 0);
    k-fold candidates, each leaving out its own fold, read the whole pool with their weights."""
    if bool((weights == weights[0]).all()):
        return pool.select(weights[0].tolist()), None
    return pool, weights.float()


def select(unit: Unit) -> Outcome:
    import torch

    from ..engine.predict import accuracies, predict

    backbone, data = unit.backbone.load(), unit.source.read()
    held = _held_out(unit, data)
    cfgs = [i.train for i in unit.items]
    models = _build(backbone, unit, unit.items)
    masks = torch.stack([held[max(i.fold, 0)] for i in unit.items])
    train, weights = trained_samples(data.pool, ~masks & (data.final_train | data.val))
    scored = masks.any(0)
    batches = _batches(models[0], unit, {"train": train, "scored": data.pool.select(scored.tolist())})
    until = unit.items[0].until  # one rung per unit: the planner stacks trials at one rung
    states = None if unit.states is None else [Path(unit.states) / f"{i.key}.safetensors" for i in unit.items]
    t0 = time.perf_counter()
    _fit(models, batches["train"], cfgs, weights, _ticker(unit, f"{unit.items[0].label} selection x{len(models)}"),
         selection=True, states=states, until=until)
    logits, labels = predict(models, batches["scored"], cfgs[0])
    seconds = (time.perf_counter() - t0) / len(models)
    accs = accuracies(logits, labels, masks[:, scored])
    return Outcome({i.key: {"metric": a, "seconds": seconds, "trainable_parameters": m.num_trainable(),
                            "metrics": {"held_out": int(k.sum()), "trained_on": len(train.samples),
                                        "epochs": i.train.epochs if until is None else min(until, i.train.epochs)}}
                    for i, a, m, k in zip(unit.items, accs, models, masks)})


def final(unit: Unit) -> Outcome:
    from ..data import ImageDataset
    from ..data.batches import ImageBatches
    from ..engine.checkpoint import save_adapter
    from ..engine.predict import accuracies, predict
    from ..memory.step import COMPARED_BATCH, step_memory

    backbone, data = unit.backbone.load(), unit.source.read()
    train, _ = trained_samples(data.pool, data.final_train[None])  # few-shot: the k shots, not the pool's val list
    by_label: dict[str, list[Item]] = {}
    for i in unit.items:
        by_label.setdefault(i.label, []).append(i)
    results: dict[str, dict[str, Any]] = {}
    trained: list[tuple[Item, Any]] = []
    measure = []
    for items in by_label.values():
        cfgs = [i.train for i in items]
        models = _build(backbone, unit, items)
        batches = _batches(models[0], unit, {"train": train})["train"]
        t0 = time.perf_counter()
        _fit(models, batches, cfgs, None, _ticker(unit, f"{items[0].label} final x{len(models)}"), selection=False)
        seconds = (time.perf_counter() - t0) / len(models)
        for i, m in zip(items, models):
            save_adapter(Path(unit.checkpoints) / i.key, m, data.pool.classes,
                         {"backbone_weights": unit.backbone.weights, "trial": i.key})
            results[i.key] = {"seconds": seconds, "trainable_parameters": m.num_trainable(),
                              "metrics": {"trained_on": len(train.samples)}}
            trained.append((i, m))
        measure.append((items, models[0], batches, cfgs[0].batch_size))
    # The test split, traced once: every final model of the task reads each traced batch.
    batch = max(i.train.batch_size for i in unit.items)
    images = ImageBatches(ImageDataset(data.test, backbone.preprocessing.transform()))
    logits, labels = predict([m for _, m in trained], images, TrainConfig(batch_size=batch, progress=False))
    for (i, _), acc in zip(trained, accuracies(logits, labels)):
        results[i.key]["metric"] = acc
        results[i.key]["metrics"].update(test_images=len(labels), test_evaluations=1,
                                         checkpoint=str(Path(unit.checkpoints) / i.key))
    # Memory last: measuring takes a training step, which changes the model it measures. Methods compare at one
    # batch size; the recipe's own batch is kept beside it.
    for items, model, batches, batch_size in measure:
        compared, own_batch = (min(b, len(batches)) for b in (COMPARED_BATCH, batch_size))  # a task may be smaller
        step = step_memory(model, batches, compared)
        own = step if own_batch == compared else step_memory(model, batches, own_batch)
        for i in items:
            results[i.key].update(memory_bytes=step.total, memory_kind=step.kind)
            results[i.key]["metrics"].update(memory_batch_size=compared, recipe_batch_size=own_batch,
                                             recipe_memory_bytes=own.total)
    return Outcome(results, test_read=True)


__all__ = ["Item", "KINDS", "Outcome", "Unit", "run_unit", "say"]
