"""`qtune demo`, the main job: the offline benchmark, the shipped demo backbone, the methods, one table.

Per task and method: hyper-parameters chosen on train800 -> val200, the choice retrained on train800val200 and
tested once. Side-path methods train from one TapCache per task (one frozen pass over its images); stream methods
train live on a private copy of the backbone. Runs anywhere: nothing is downloaded.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from statistics import mean
from typing import Any, Sequence

from .backbones import demo_weights, load_backbone
from .data.offline import ALL_TASKS, OFFLINE_TASKS, make_offline_benchmark
from .engine.loop import TrainConfig
from .errors import ConfigError
from .experiments.benchmark import MethodPlan, default_jobs, run_tasks
from .methods import get_method
from .report.tables import benchmark_table, format_markdown, format_table, plot_accuracy_vs_memory, write_results

DEMO_METHODS = ("linear", "vqt", "synqt")
GROUPS = ("natural", "specialized", "structured")
# Small grids around each method's published recipe; selection is on val200 only.
GRIDS: dict[str, list[dict[str, Any]]] = {
    "linear": [{"lr": 1e-2, "weight_decay": 0.0}, {"lr": 1e-3, "weight_decay": 0.0}],
    "vqt": [{"lr": 0.1, "weight_decay": 1e-4}, {"lr": 0.02, "weight_decay": 1e-4}],
    "synqt": [{"lr": 3e-3, "weight_decay": 1e-2}, {"lr": 1e-3, "weight_decay": 1e-2}],
}
DEFAULT_GRID = [{"lr": 1e-3, "weight_decay": 1e-2}, {"lr": 1e-4, "weight_decay": 1e-2}]


def run_demo(out: Path, methods: Sequence[str] = DEMO_METHODS, tasks: Sequence[str] | None = None,
             weights: str | Path | None = None, quick: bool = False, progress: bool = True,
             epochs: int | None = None, threads: int = 1, jobs: int | None = None,
             cache_dtype: str = "fp16", overwrite: bool = False, keep_caches: bool = False) -> list[dict]:
    start = time.perf_counter()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: --out names a file; give a folder for the demo's results")
    if (out / "summary.json").exists() and not overwrite:
        raise ConfigError(f"{out}: holds the results of an earlier demo (pass --overwrite to replace them)")
    if overwrite:  # results kept for resuming belong to the run being replaced
        shutil.rmtree(out / "runs", ignore_errors=True)
    tasks = list(tasks or OFFLINE_TASKS)
    unknown = [t for t in tasks if t not in ALL_TASKS]
    if unknown:
        raise ConfigError(f"unknown demo task(s) {', '.join(unknown)} (choose from {', '.join(ALL_TASKS)})")
    for m in methods:
        get_method(m)
    jobs = max(1, min(jobs or default_jobs(), len(tasks)))
    weights = demo_weights() if weights in (None, "demo") else Path(weights)
    print(f"qtune demo: backbone {weights}, tasks {', '.join(tasks)}, methods {', '.join(methods)}; "
          f"{jobs} task(s) at a time, {threads} torch thread(s) each, {cache_dtype} caches")
    load_backbone(None, weights)  # a bad backbone fails here, before any work
    task_dirs = make_offline_benchmark(out / "data", seed=0, tasks=tasks, test_size=200 if quick else 500,
                                       progress=progress)
    base = TrainConfig(epochs=epochs or (5 if quick else 15), batch_size=64, warmup_epochs=1 if quick else 2,
                       progress=False, seed=0)
    plans = [MethodPlan(m, base, tuple(GRIDS.get(m, DEFAULT_GRID))) for m in methods]
    rows = run_tasks(dict(zip(tasks, task_dirs)), out, {t: plans for t in tasks}, weights, cache_dtype=cache_dtype,
                     threads=threads, jobs=jobs, progress=progress, keep_cache=keep_caches)
    groups = [g for g in GROUPS if any(r.group == g for r in rows)]
    summary = benchmark_table(rows, groups)
    text = format_table(summary, tasks, groups)
    kinds = sorted({r.memory_kind for r in rows})
    print("\n" + text)
    print(f"\naccuracy: top-1 on test (%), hyper-parameters chosen on val200; memory: one training step at batch "
          f"{base.batch_size} ({', '.join(kinds)}); seconds: training time of the final runs; side paths read "
          f"{cache_dtype} K/V caches")
    write_results(out, rows, summary, text, format_markdown(summary, tasks, groups))
    chance = mean(mean(1 / ALL_TASKS[t].num_classes for t in tasks if ALL_TASKS[t].group == g) for g in groups)
    plot = plot_accuracy_vs_memory(out, summary, ", ".join(kinds), f"qtune demo: {weights.name}, top-1 on test",
                                   chance)
    print(f"results written to {out} (table.txt, table.md, summary.csv, summary.json, results.json, {plot.name}); "
          f"total {time.perf_counter() - start:.0f} s")
    return summary
