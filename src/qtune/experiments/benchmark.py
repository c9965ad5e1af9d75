"""One task of a VTAB-1k-style benchmark, for several methods: the demo and the benchmarks run through here.

Per task, side-path methods read one TapCache of its images (one frozen pass); stream methods train live, optionally
at a smaller input size. Per method, the candidates are chosen among on train800 -> val200 (no run when there is
only one), the choice is retrained on train800val200 once per seed and tested once per seed. Each finished method is
written to ``runs/<task>/<label>-<key>.json`` under the output folder and found there again by a rerun, so an
interrupted benchmark resumes where it stopped; the key changes with anything that changes the result.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from statistics import mean
from typing import Any, Sequence

import torch

from ..backbones import Backbone, load_backbone
from ..cache import build_cache, cached_splits, what_is_read
from ..cache.manifest import digest
from ..data import ImageDataset
from ..data.benchmarks import read_vtab
from ..data.offline import ALL_TASKS
from ..engine.loop import ImageBatches, TrainConfig, evaluate, fit
from ..io import write_json
from ..memory.account import measure_step
from ..methods import get_method
from ..report.tables import ResultRow
from ..tuned import TunedModel
from .select import select_then_test


@dataclass(frozen=True)
class MethodPlan:
    """How one method is trained on one task."""

    method: str
    train: TrainConfig
    grid: tuple[dict[str, Any], ...] = ({},)  # candidates: TrainConfig fields and "options", over the defaults here
    options: dict[str, Any] = field(default_factory=dict)
    label: str = ""  # the row's name in tables (default: the method's)
    input_size: int | None = None  # train and test at this input size (position embeddings resampled by timm)
    seeds: tuple[int, ...] = (0,)  # final runs; the selection runs use the first

    @property
    def name(self) -> str:
        return self.label or self.method

    def key(self, weights: Path, cache_dtype: str) -> str:
        record = {**asdict(self), "weights": str(weights), "cache_dtype": cache_dtype}
        return digest(json.dumps(record, sort_keys=True, default=str).encode())[:12]


def _backbone(weights: Path, input_size: int | None) -> Backbone:
    if input_size is None:
        return load_backbone(None, weights)
    return load_backbone(None, weights, model_args={"img_size": input_size}, preprocessing={"input_size": input_size})


def _batches(model: TunedModel, cache: Path | None, listings: dict) -> dict[str, Any]:
    """Cached batches for side-path methods where the cache matches, live images otherwise."""
    served, notes = cached_splits(cache, model, listings) if cache and model.reads_taps else ({}, [])
    for note in notes:
        print(note)
    transform = model.backbone.preprocessing.transform()
    return {k: served.get(k) or ImageBatches(ImageDataset(v, transform)) for k, v in listings.items()}


def step_memory(model: TunedModel, batches: Any, batch_size: int) -> tuple[int, str]:
    """Training memory of one step at ``batch_size``, measured the way the model trains (cached or live)."""
    inputs, labels = next(batches.iterate(list(range(min(batch_size, len(batches)))), batch_size,
                                          torch.device("cpu")))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    flat = ([*inputs.keys, *inputs.values, inputs.pooled, *(t for ts in inputs.points.values() for t in ts)]
            if hasattr(inputs, "pooled") else [inputs])
    acc = measure_step(model, opt, lambda: torch.nn.functional.cross_entropy(batches.forward(model, inputs), labels),
                       flat)
    return acc.total, acc.kind


def _run_plan(plan: MethodPlan, task: str, backbone: Backbone, splits: dict, cache: Path | None) -> ResultRow:
    info = ALL_TASKS[task]

    def run(hp: dict[str, Any], train: str, evaluate_on: str, seed: int | None = None) -> dict[str, Any]:
        fields = {k: v for k, v in hp.items() if k != "options"}
        cfg = replace(plan.train, **fields, seed=plan.seeds[0] if seed is None else seed)
        options = {**plan.options, **hp.get("options", {})}
        model = TunedModel.build(backbone, plan.method, info.num_classes, options, seed=cfg.seed)
        data = _batches(model, cache, {train: splits[train], evaluate_on: splits[evaluate_on]})
        t0 = time.perf_counter()
        fit(model, data[train], cfg, stop_on_nonfinite=False)  # a diverged grid point is scored, as in sweeps
        seconds = time.perf_counter() - t0
        acc = evaluate(model, data[evaluate_on], cfg)["accuracy"]
        print(f"  {task:<14} {plan.name:<12} {train}->{evaluate_on} seed {cfg.seed}: {100 * acc:5.1f}%  "
              f"({seconds:.0f} s)", flush=True)
        return {"accuracy": acc, "seconds": seconds, "model": model, "batches": data[train]}

    sel = select_then_test(run, plan.grid)
    finals = [sel.final, *(run(sel.best, "train800val200", "test", s) for s in plan.seeds[1:])]
    memory, kind = step_memory(sel.final["model"], sel.final["batches"],
                               replace(plan.train, **{k: v for k, v in sel.best.items() if k != "options"}).batch_size)
    hparams = {**sel.best, "val_accuracy": sel.val_accuracy, "seeds": list(plan.seeds),
               "seed_accuracies": [f["accuracy"] for f in finals]}
    if plan.input_size:
        hparams["input_size"] = plan.input_size
    return ResultRow(plan.name, task, info.group, mean(f["accuracy"] for f in finals),
                     sel.final["model"].num_trainable(), memory, kind, mean(f["seconds"] for f in finals), hparams)


def run_task(task: str, task_dir: Path, out: Path, plans: Sequence[MethodPlan], weights: Path,
             cache_dtype: str = "fp32", threads: int = 1, progress: bool = False,
             keep_cache: bool = True) -> list[ResultRow]:
    """Every plan on one task; finished plans are read back from ``out/runs/<task>``."""
    torch.set_num_threads(threads)
    splits = read_vtab(task_dir, ALL_TASKS[task].num_classes)
    done_dir = out / "runs" / task
    rows, todo = {}, []
    for plan in plans:
        path = done_dir / f"{plan.name}-{plan.key(weights, cache_dtype)}.json"
        if path.is_file():
            rows[plan.name] = ResultRow(**json.loads(path.read_text()))
            print(f"  {task:<14} {plan.name:<12} done before: {100 * rows[plan.name].accuracy:5.1f}% ({path})")
        else:
            todo.append((plan, path))
    backbones: dict[int | None, Backbone] = {}

    def backbone_at(size: int | None) -> Backbone:
        if size not in backbones:
            backbones[size] = _backbone(weights, size)
        return backbones[size]

    side_plans = [p for p, _ in todo if get_method(p.method).reads_taps and p.input_size is None]
    cache = None
    if side_plans:  # one cache holds what every side-path plan of the task reads, named by what it stores
        blocks, points = what_is_read(backbone_at(None), ((p.method, {**p.options, **hp.get("options", {})})
                                                          for p in side_plans for hp in p.grid),
                                      ALL_TASKS[task].num_classes)
        stored = "" if not points and len(blocks) == backbone_at(None).depth else "-" + digest(json.dumps(
            [blocks, [p.to_dict() for p in points]]).encode())[:8]
        cache = out / "cache" / f"{task}-{cache_dtype}{stored}"
    for plan, path in todo:
        backbone = backbone_at(plan.input_size)
        side = plan in side_plans
        if side:
            build_cache(cache, backbone, [splits["train800val200"], splits["test"]], dtype=cache_dtype,
                        blocks=blocks, points=points, progress=progress)
        row = _run_plan(plan, task, backbone, splits, cache if side else None)
        write_json(path, asdict(row))
        rows[plan.name] = row
    if not keep_cache and cache is not None and cache.exists():
        shutil.rmtree(cache)
    return [rows[p.name] for p in plans]


def default_jobs() -> int:
    """One task per available core: small models are overhead-bound, and intra-op threads only contend."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_tasks(task_dirs: dict[str, Path], out: Path, plans: dict[str, Sequence[MethodPlan]], weights: Path,
              cache_dtype: str = "fp32", threads: int = 1, jobs: int | None = None, progress: bool = False,
              keep_cache: bool = True) -> list[ResultRow]:
    """``run_task`` for every task with that task's plans, ``jobs`` tasks at a time in spawned processes; each task
    is seeded on its own, so the results do not depend on ``jobs``."""
    jobs = max(1, min(jobs or default_jobs(), len(task_dirs)))
    args = [(t, d, out, list(plans[t]), weights, cache_dtype, threads, progress and jobs == 1, keep_cache)
            for t, d in task_dirs.items()]
    if jobs == 1:
        per_task = [run_task(*a) for a in args]
    else:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            per_task = list(pool.map(run_task, *zip(*args)))
    return [r for rows in per_task for r in rows]
