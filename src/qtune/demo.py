"""`qtune demo`, the main job: the offline benchmark, the shipped demo backbone, the methods, one table.

The demo is a sweep with a built-in spec (written to OUT/spec.toml, so `qtune sweep OUT/spec.toml --out OUT` reruns
or extends it): per task, each method's own paper's recipe (RECIPES); where it has a learning-rate grid, the rate
is chosen on train800 -> val200; the choice is retrained on train800val200 and tested once. Side-path methods train from one TapCache per task, stream methods live. Runs
anywhere: nothing is downloaded.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Sequence

from .backbones import BackboneSpec, demo_weights
from .data.offline import ALL_TASKS, OFFLINE_TASKS
from .errors import ConfigError
from .experiments.spec import toml_value
from .experiments.store import STORE_FILES
from .experiments.executors import default_jobs
from .experiments.sweep import run_sweep
from .io import write_text
from .methods import get_method
from .report.sweep_report import write_report

DEMO_METHODS = ("linear", "vqt", "synqt")
DEMO_TASKS = (*OFFLINE_TASKS, "mnist")
# Each method's published recipe, cut to the demo's 15-minute budget on 2 CPU cores (the README says where it differs
# from the papers'). The preset gives the authors' per-task options on the tasks that stand in for VTAB tasks of the
# same name; on the others the method's defaults apply. Selection is on val200 only.
RECIPES: dict[str, dict[str, Any]] = {
    # VPT's linear-probe protocol searches lr on validation; epochs as SynQT's, which costs nothing here
    "linear": {"train": {"epochs": 50, "warmup_epochs": 10, "weight_decay": 0.0}, "grid": {"lr": [1e-2, 1e-3]}},
    # VQT: Adam with coupled decay, batch 128, warmup 10 of 100 epochs; two points of its lr grid (0.5 and 0.1 x
    # 128/256). 25 epochs (warmup 3) to fit the budget.
    "vqt": {"preset": "vqt:vtab/{task}",
            "train": {"optimizer": "adam", "batch_size": 128, "epochs": 25, "warmup_epochs": 3, "weight_decay": 1e-4,
                      "min_lr": 0.0},
            "grid": {"lr": [0.25, 0.05]}},
    # SynQT: AdamW, lr 1e-3, wd 1e-2, batch 64, warmup 10 of 50 epochs, nothing to choose; 30 epochs (warmup 6) to fit
    # the budget.
    "synqt": {"preset": "synqt:vtab/{task}",
              "train": {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-2, "batch_size": 64, "epochs": 30,
                        "warmup_epochs": 6, "min_lr": 1e-6}},
}
DEFAULT_RECIPE: dict[str, Any] = {"train": {"epochs": 30, "warmup_epochs": 6, "weight_decay": 1e-2},
                                  "grid": {"lr": [1e-3, 1e-4]}}


def demo_spec(methods: Sequence[str], tasks: Sequence[str], weights: Path, epochs: int | None, quick: bool,
              cache_dtype: str) -> str:
    """The demo's sweep spec, as TOML; `epochs` (and `quick`) replace every recipe's epochs and warmup."""
    if quick:
        epochs = epochs or 5
    lines = [f'name = "qtune demo ({weights.name})"', "",
             "[backbone]", f"weights = {toml_value(str(weights))}", "",
             "[tasks]", f"offline = {toml_value(list(tasks))}", f"offline_test_size = {200 if quick else 500}", "",
             "[train]", "batch_size = 64", "",
             "[protocol]", 'selection = "val"', "seed = 0", "seeds = [0]", f'cache_dtype = "{cache_dtype}"', ""]
    for m in methods:
        recipe = RECIPES.get(m, DEFAULT_RECIPE)
        train = dict(recipe["train"])
        if epochs:
            train.update(epochs=epochs, warmup_epochs=epochs // 5)
        lines += [f"[methods.{m}]"]
        lines += [f"preset = {toml_value(recipe['preset'])}"] if "preset" in recipe else []
        lines += [f"train = {toml_value(train)}"]
        lines += [f"grid = {toml_value(recipe['grid'])}"] if "grid" in recipe else []
        lines += [""]
    return "\n".join(lines)


def run_demo(out: Path, methods: Sequence[str] = DEMO_METHODS, tasks: Sequence[str] | None = None,
             weights: str | Path | None = None, quick: bool = False, progress: bool = True,
             epochs: int | None = None, jobs: int | None = None, cache_dtype: str = "fp16",
             overwrite: bool = False, keep_caches: bool = False) -> list[dict]:
    start = time.perf_counter()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: --out names a file; give a folder for the demo's results")
    if any((out / f).exists() for f in ("summary.json", *STORE_FILES)) and not overwrite:
        raise ConfigError(f"{out}: holds the results of an earlier demo (pass --overwrite to replace them)")
    if overwrite:  # the store, checkpoints and report belong to the run being replaced; the data is kept
        for f in STORE_FILES:
            (out / f).unlink(missing_ok=True)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    tasks = list(tasks or DEMO_TASKS)
    unknown = [t for t in tasks if t not in ALL_TASKS]
    if unknown:
        raise ConfigError(f"unknown demo task(s) {', '.join(unknown)} (choose from {', '.join(ALL_TASKS)})")
    for m in methods:
        get_method(m)
    jobs = max(1, min(jobs or default_jobs(), len(tasks) * len(methods)))
    weights = demo_weights() if weights in (None, "demo") else Path(weights)
    BackboneSpec(weights=str(weights)).load()  # a bad backbone fails here, before any work
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "spec.toml"
    write_text(spec, demo_spec(methods, tasks, weights, epochs, quick, cache_dtype))
    if progress:
        print(f"qtune demo: backbone {weights}, tasks {', '.join(tasks)}, methods {', '.join(methods)}; "
              f"{jobs} worker(s), one torch thread each, {cache_dtype} caches; the spec is {spec}")
    run_sweep(spec, out, jobs=jobs, progress=progress)
    summary = write_report(out, out)
    if not keep_caches:
        shutil.rmtree(out / "cache", ignore_errors=True)
    if progress:
        print(f"\naccuracy: top-1 on test (%), learning rate chosen on val200; memory: one training step at batch 64 "
              f"(CPU account); seconds: training time of the final runs; side paths read {cache_dtype} K/V caches")
        print(f"results written to {out} (table.txt, table.md, summary.csv, summary.json, results.json, chosen.md, "
              f"accuracy_vs_memory.png); total {time.perf_counter() - start:.0f} s")
    return summary
