"""`qtune demo`, the main job: the offline benchmark, the shipped demo backbone, the methods, one table.

Per task and method: hyper-parameters chosen on train800 -> val200, the choice retrained on train800val200 and
tested once. Side-path methods train from one TapCache per task (one frozen pass over its images); stream methods
train live on a private copy of the backbone. Runs anywhere: nothing is downloaded.
"""
from __future__ import annotations

import copy
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import torch

from .backbones import Backbone, load_backbone
from .cache import build_cache, cached_splits
from .data import ImageDataset
from .data.benchmarks import read_vtab
from .data.offline import OFFLINE_TASKS, make_offline_benchmark
from .engine.loop import ImageBatches, TrainConfig, evaluate, fit
from .errors import ConfigError
from .experiments import select_then_test
from .memory.account import measure_step
from .methods import create_method, get_method
from .report.tables import ResultRow, benchmark_table, format_table, plot_accuracy_vs_memory, write_results
from .tuned import TunedModel

DEMO_METHODS = ("linear", "vqt", "synqt")
GROUPS = ("natural", "specialized", "structured")
# Small grids around each method's published recipe; selection is on val200 only.
GRIDS: dict[str, list[dict[str, Any]]] = {
    "linear": [{"lr": 1e-2, "weight_decay": 0.0}, {"lr": 1e-3, "weight_decay": 0.0}],
    "vqt": [{"lr": 0.1, "weight_decay": 1e-4}, {"lr": 0.02, "weight_decay": 1e-4}],
    "synqt": [{"lr": 3e-3, "weight_decay": 1e-2}, {"lr": 1e-3, "weight_decay": 1e-2}],
}
DEFAULT_GRID = [{"lr": 1e-3, "weight_decay": 1e-2}, {"lr": 1e-4, "weight_decay": 1e-2}]


def demo_weights() -> Path:
    """The shipped demo backbone: a folder in timm's hub layout (model.safetensors + config.json)."""
    return Path(str(resources.files("qtune") / "assets" / "demo_vit"))


def _batches(model: TunedModel, cache: Path, listings: dict, num_workers: int = 0) -> dict[str, Any]:
    """Cached batches for side-path methods where the cache matches, live images otherwise."""
    served, notes = cached_splits(cache, model, listings) if model.reads_taps else ({}, [])
    for note in notes:
        print(note)
    transform = model.backbone.preprocessing.transform()
    return {k: served.get(k) or ImageBatches(ImageDataset(v, transform), num_workers) for k, v in listings.items()}


def _step_memory(backbone: Backbone, method: str, num_classes: int, batches: Any, batch_size: int) -> tuple[int, str]:
    """Training memory of one step of ``method`` at ``batch_size``, measured the way the demo trains it."""
    model = _fresh_model(backbone, method, num_classes, seed=0)
    inputs, labels = next(batches.iterate(list(range(min(batch_size, len(batches)))), batch_size,
                                          torch.device("cpu")))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    flat = [*inputs.keys, *inputs.values, inputs.pooled] if hasattr(inputs, "pooled") else [inputs]
    acc = measure_step(model, opt, lambda: torch.nn.functional.cross_entropy(batches.forward(model, inputs), labels),
                       flat)
    return acc.total, acc.kind


def _fresh_model(backbone: Backbone, method: str, num_classes: int, seed: int,
                 options: dict[str, Any] | None = None) -> TunedModel:
    """A new model; stream methods get their own copy of the backbone, since they change it."""
    torch.manual_seed(seed)
    bb = backbone if get_method(method).reads_taps else copy.deepcopy(backbone)
    return TunedModel(bb, create_method(method, bb, num_classes, options or {}))


def _run_task(task: str, task_dir: Path, out: Path, methods: Sequence[str], weights: Path, base: TrainConfig,
              cache_dtype: str, threads: int, progress: bool) -> list[ResultRow]:
    """Every method on one task: its cache, selection on val200, the retrained choice tested once."""
    torch.set_num_threads(threads)
    backbone = load_backbone(None, weights)
    info = OFFLINE_TASKS[task]
    splits = read_vtab(task_dir, info.num_classes)
    cache = out / "cache" / f"{task}-{cache_dtype}"
    build_cache(cache, backbone, [splits["train800val200"], splits["test"]], dtype=cache_dtype, progress=progress)
    rows = []
    for method in methods:
        def run(hp: dict[str, Any], train: str, evaluate_on: str, method: str = method) -> dict[str, Any]:
            cfg = replace(base, lr=hp["lr"], weight_decay=hp["weight_decay"])
            model = _fresh_model(backbone, method, info.num_classes, cfg.seed, hp.get("options"))
            data = _batches(model, cache, {train: splits[train], evaluate_on: splits[evaluate_on]})
            t0 = time.perf_counter()
            fit(model, data[train], cfg)
            seconds = time.perf_counter() - t0
            return {"accuracy": evaluate(model, data[evaluate_on], cfg)["accuracy"], "seconds": seconds,
                    "trainable": model.num_trainable(), "batches": data[train]}

        sel = select_then_test(run, GRIDS.get(method, DEFAULT_GRID))
        memory, kind = _step_memory(backbone, method, info.num_classes, sel.final["batches"], base.batch_size)
        rows.append(ResultRow(method, task, info.group, sel.final["accuracy"], sel.final["trainable"], memory, kind,
                              sel.final["seconds"], {**sel.best, "val_accuracy": sel.val_accuracy}))
        print(f"  {task:<14} {method:<8} test {100 * sel.final['accuracy']:5.1f}%  "
              f"(val {100 * sel.val_accuracy:5.1f}% with lr {sel.best['lr']:g})  {sel.final['seconds']:.1f} s",
              flush=True)
    return rows


def default_jobs() -> int:
    """One task per available core: the demo model is too small for intra-op threads to pay off."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_demo(out: Path, methods: Sequence[str] = DEMO_METHODS, tasks: Sequence[str] | None = None,
             weights: str | Path | None = None, quick: bool = False, progress: bool = True,
             epochs: int | None = None, threads: int = 1, jobs: int | None = None,
             cache_dtype: str = "fp32") -> list[dict]:
    start = time.perf_counter()
    tasks = list(tasks or OFFLINE_TASKS)
    unknown = [t for t in tasks if t not in OFFLINE_TASKS]
    if unknown:
        raise ConfigError(f"unknown demo task(s) {', '.join(unknown)} (choose from {', '.join(OFFLINE_TASKS)})")
    for m in methods:
        get_method(m)
    jobs = max(1, min(jobs or default_jobs(), len(tasks)))
    weights = Path(weights) if weights else demo_weights()
    print(f"qtune demo: backbone {weights}, tasks {', '.join(tasks)}, methods {', '.join(methods)}; "
          f"{jobs} task(s) at a time, {threads} torch thread(s) each, {cache_dtype} caches")
    load_backbone(None, weights)  # a bad backbone fails here, before any work
    task_dirs = make_offline_benchmark(out / "data", seed=0, tasks=tasks, test_size=200 if quick else 500,
                                       progress=progress)
    base = TrainConfig(epochs=epochs or (5 if quick else 15), batch_size=64, warmup_epochs=1 if quick else 2,
                       progress=False, seed=0)
    args = [(t, d, out, list(methods), weights, base, cache_dtype, threads, progress and jobs == 1)
            for t, d in zip(tasks, task_dirs)]
    if jobs == 1:
        per_task = [_run_task(*a) for a in args]
    else:  # each task is seeded on its own, so the results do not depend on jobs
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            per_task = list(pool.map(_run_task, *zip(*args)))
    rows = [r for task_rows in per_task for r in task_rows]
    groups = [g for g in GROUPS if any(r.group == g for r in rows)]
    summary = benchmark_table(rows, groups)
    text = format_table(summary, tasks, groups)
    kinds = sorted({r.memory_kind for r in rows})
    print("\n" + text)
    print(f"\naccuracy: top-1 on test (%), hyper-parameters chosen on val200; memory: one training step at batch "
          f"{base.batch_size} ({', '.join(kinds)}); seconds: training time of the final runs; side paths read "
          f"{cache_dtype} K/V caches")
    write_results(out, rows, summary, text)
    plot = plot_accuracy_vs_memory(out, summary, ", ".join(kinds))
    print(f"results written to {out} (table.txt, summary.csv, summary.json, results.json, {plot.name}); "
          f"total {time.perf_counter() - start:.0f} s")
    return summary
