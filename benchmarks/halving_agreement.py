"""Successive halving against the full protocol: the same grids, tasks and backbone, both through `qtune sweep`.

Per task and method: the candidate each protocol chooses, the final test accuracy of each choice, the model-epochs
each trained (selection and final runs) and what that cost in frozen passes per image (the training seconds the
store records, over the measured seconds of one frozen pass per image, plus the one pass that built the cache).
Both sweeps share one output folder, so they read the same caches and data; the store keeps both.

    python benchmarks/halving_agreement.py --weights ../shared/weights/vit_tiny_patch16_224.augreg_in21k_ft_in1k \\
        --out runs/halving
    python benchmarks/halving_agreement.py --weights demo --out runs/halving-demo --tasks digits,texture_patch,...

Grids (each method's recipe otherwise, as benchmarks/real_backbone.py runs them): linear over 8 learning rates,
VQT over 4 learning rates x 2 weight decays of its paper's grid, SynQT over lr x s' x s'' (8 points, n = 4).
"""
from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path
from statistics import mean
from typing import Any

import torch

from qtune.backbones import BackboneSpec
from qtune.experiments.spec import load_spec
from qtune.experiments.store import Store, Trial
from qtune.experiments.sweep import run_sweep
from qtune.io import write_text
from qtune.methods.presets import SYNQT_RECIPE, VQT_RECIPE
from real_backbone import TASKS, sweep_spec, task_dirs

GRIDS: dict[str, dict[str, Any]] = {
    "linear": {"train": {**SYNQT_RECIPE, "weight_decay": 1e-4},
               "grid": {"lr": [3e-1, 1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4]}},
    "vqt": {"train": dict(VQT_RECIPE), "options": {"tokens": 1},
            "grid": {"lr": [0.25, 0.125, 0.05, 0.025], "weight_decay": [1e-4, 0.0]}},
    "synqt": {"train": dict(SYNQT_RECIPE), "options": {"tokens": 4},
              "grid": [{"lr": lr, "options.attn_scale": a, "options.ffn_scale": f}
                       for lr, a, f in itertools.product((1e-3, 3e-3), (0.1, 1.0), (0.1, 1.0))]},
}


def frozen_seconds_per_image(weights: Path, images: int = 64) -> float:
    """One frozen pass (the cache build's trace of every block's K/V) per image, on this process's threads."""
    backbone = BackboneSpec(weights=str(weights)).load()
    x = torch.randn(images, 3, *backbone.preprocessing.input_size)
    with torch.no_grad():
        backbone.trace(x[:8], list(range(backbone.depth)))  # warm-up
        start = time.perf_counter()
        backbone.trace(x, list(range(backbone.depth)))
    return (time.perf_counter() - start) / images


def summary(trials: list[Trial], frozen: float, pool: int) -> dict[str, Any]:
    """A method's protocol on a task: its choice, test accuracy, model-epochs and frozen passes per image."""
    finals = [t for t in trials if t.kind == "final"]
    epochs = sum((t.metrics or {}).get("epochs", t.config["train"]["epochs"]) for t in trials if t.kind == "fold")
    epochs += sum(t.config["train"]["epochs"] for t in finals)
    seconds = sum(t.seconds or 0.0 for t in trials)
    return {"choice": finals[0].candidate, "test": mean(t.metric for t in finals), "model_epochs": epochs,
            "passes": 1 + seconds / (frozen * pool), "config": finals[0].config}


def describe(config: dict[str, Any], method: str) -> str:
    grid = GRIDS[method]["grid"]
    keys = sorted({k for point in grid for k in point}) if isinstance(grid, list) else sorted(grid)
    flat = {**config["train"], **{f"options.{k}": v for k, v in config["options"].items()}}
    return ", ".join(f"{k.removeprefix('options.')}={flat[k]:g}" for k in keys)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True,
                   help="a backbone folder in timm's hub layout (or a weights file), or demo: qtune's demo ViT")
    p.add_argument("--out", default="runs/halving")
    p.add_argument("--tasks", default=",".join(TASKS), help="offline tasks (generated or real scans; none: '')")
    p.add_argument("--vtab", default="", help="VTAB-1k task folders too, comma-separated (qtune data vtab)")
    p.add_argument("--methods", default="linear,vqt,synqt")
    p.add_argument("--test-size", type=int, default=500)
    p.add_argument("--selection", default="val", choices=("val", "kfold"))
    p.add_argument("--eta", type=float, default=3.0)
    p.add_argument("--rungs", default="0.1,0.3", help="fractions of each schedule at which candidates are scored")
    p.add_argument("--cache-dtype", default="fp16")
    p.add_argument("--epochs", type=int, help="every schedule this long (warmup scaled with it): a stated "
                   "shorter schedule where the recipes' do not fit the machine")
    p.add_argument("--jobs", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(1)

    out = Path(args.out)
    weights = Path(args.weights) if args.weights == "demo" else Path(args.weights).resolve()
    tasks = [t for t in args.tasks.split(",") if t]
    methods = {m: GRIDS[m] for m in args.methods.split(",")}
    if args.epochs:
        methods = {m: {**t, "train": {**t["train"], "epochs": args.epochs,
                                      "warmup_epochs": t["train"]["warmup_epochs"] * args.epochs
                                      / t["train"]["epochs"]}} for m, t in methods.items()}
    dirs = task_dirs(out / "data", tasks, args.test_size)
    for folder in (Path(d).resolve() for d in args.vtab.split(",") if d):
        dirs[folder.name] = folder
        tasks.append(folder.name)
    halving = {"eta": args.eta, "rungs": [float(f) for f in args.rungs.split(",")]}
    specs = {}
    for name, extra in (("full", {}), ("halving", {"halving": halving})):
        specs[name] = out / f"{name}.toml"
        write_text(specs[name], sweep_spec(weights, dirs, [0], args.cache_dtype, methods, {},
                                           {"selection": args.selection, **extra}, name=f"agreement-{name}"))
    hashes = {name: run_sweep(spec, out, jobs=args.jobs) for name, spec in specs.items()}

    frozen = frozen_seconds_per_image(weights)
    store = Store(out / "store.sqlite")
    trials = {name: store.trials(h) for name, h in hashes.items()}
    lines = [f"frozen pass: {frozen * 1e3:.1f} ms per image (one thread); rungs {halving['rungs']}, eta {args.eta:g}, "
             f"selection {args.selection}", "",
             "| task | method | full: choice | halving: choice | same | test full | test halving | delta | "
             "model-epochs full / halving | ratio | frozen passes per image full / halving |",
             "|---|---|---|---|---|--:|--:|--:|--:|--:|--:|"]
    spec = load_spec(specs["full"])
    for task in tasks:
        pool = len(spec.tasks[task].read().pool.samples)
        for method in methods:
            f, h = (summary([t for t in trials[n] if t.task == task and t.method == method], frozen, pool)
                    for n in ("full", "halving"))
            lines.append(f"| {task} | {method} | {describe(f['config'], method)} | {describe(h['config'], method)} | "
                         f"{'yes' if f['choice'] == h['choice'] else 'no'} | {100 * f['test']:.1f} | "
                         f"{100 * h['test']:.1f} | {100 * (h['test'] - f['test']):+.1f} | {f['model_epochs']} / "
                         f"{h['model_epochs']} | {f['model_epochs'] / h['model_epochs']:.1f}x | "
                         f"{f['passes']:.1f} / {h['passes']:.1f} |")
    write_text(out / "agreement.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
