"""The SynQT paper's per-task protocol (5 folds x 8 configs, then 1 final run; 50 epochs each) in frozen forward
passes per image: the authors' code, qtune's cached runs one after another, stacked (fit_many), and stacked with
successive halving (``[protocol] halving``).

Measured on a random-weight ViT-B/16 at 224 px: the frozen pass (the cache build) per image, and a SynQT
model-epoch per image at each stack size the protocol uses; the protocol's cost is then its model-epochs at those
sizes, planned with the sweep's own rule (``experiments.spec.Halving``, stacks of at most ``--max-stack``), over the
frozen pass, plus the one pass that built the cache.

    python benchmarks/protocol_cost.py --out /tmp/protocol_cost [--images 128] [--threads 1]

Time it alone: several processes on the same cores distort every figure (their ratio less so).
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from qtune.backbones import load_backbone
from qtune.cache import build_cache, cached_splits
from qtune.data.layouts import read_vtab
from qtune.data.offline import ALL_TASKS, make_offline_benchmark
from qtune.engine.config import TrainConfig
from qtune.engine.many import fit_many
from qtune.experiments.spec import Halving
from qtune.tuned import TunedModel

TASK = "dsprites_loc"
FOLDS, CONFIGS, EPOCHS = 5, 8, 50
AUTHORS_PASSES_PER_RUN = 72  # one SynQT step of the authors' code = 1.44 frozen forwards (backward through the
# frozen stream included), x 50 epochs


def stack_sizes(models: int, most: int) -> list[int]:
    """How the sweep cuts a group of ``models`` into stacks (planner.stacks: full stacks, then the rest)."""
    return [most] * (models // most) + ([models % most] if models % most else [])


def halving_plan(halving: Halving, most: int) -> list[tuple[int, int]]:
    """(stack size, epochs trained) per stack of the selection under successive halving."""
    plan, alive, done = [], CONFIGS, 0
    for rung, epoch in enumerate(halving.epochs(EPOCHS)):
        if alive == 1:
            break
        plan += [(g, epoch - done) for g in stack_sizes(alive * FOLDS, most)]
        done, alive = epoch, halving.keep(alive) if rung < len(halving.rungs) else alive
    return plan


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/protocol_cost")
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-stack", type=int, default=24, help="the sweep's --max-stack")
    p.add_argument("--eta", type=float, default=Halving.eta)
    p.add_argument("--rungs", default=",".join(str(f) for f in Halving.rungs))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    halving = Halving(args.eta, tuple(float(f) for f in args.rungs.split(",")))

    [task_dir] = make_offline_benchmark(out / "data", tasks=[TASK], test_size=100)
    full = read_vtab(task_dir, ALL_TASKS[TASK].num_classes)["train800val200"]
    listing = dataclasses.replace(full, samples=full.samples[:args.images])
    backbone = load_backbone("vit_base_patch16_224")  # random weights: cost only
    cache = out / f"cache-vitb-{args.images}"
    start = time.perf_counter()
    build_cache(cache, backbone, [listing], dtype="fp16", progress=False, overwrite=True)
    frozen = (time.perf_counter() - start) / args.images
    classes = ALL_TASKS[TASK].num_classes

    def build(seed: int) -> TunedModel:
        return TunedModel.build(backbone, "synqt", classes, {"tokens": 4}, seed=seed)

    served, notes = cached_splits(cache, build(0), {"train": listing})
    if notes:
        raise SystemExit("\n".join(notes))
    batches = served["train"]
    plans = {"stacked": [(g, EPOCHS) for g in stack_sizes(FOLDS * CONFIGS, args.max_stack)],
             "stacked + halving": halving_plan(halving, args.max_stack)}
    sizes = sorted({1} | {g for plan in plans.values() for g, _ in plan})
    cost = {}  # stack size -> frozen passes per image of one model-epoch
    for g in sizes:
        cfgs = [TrainConfig(epochs=1, batch_size=64, lr=1e-3 * 10 ** (k / max(g - 1, 1)), weight_decay=1e-2,
                            warmup_epochs=0.5, seed=k, shuffle_seed=0, progress=False) for k in range(g)]
        fit_many([build(c.seed) for c in cfgs], batches, cfgs)  # warm-up: the first epoch of a new stack size
        models = [build(c.seed) for c in cfgs]  # pays allocation and tracing that the protocol's 50 epochs do not
        start = time.perf_counter()
        fit_many(models, batches, cfgs)
        cost[g] = (time.perf_counter() - start) / g / args.images / frozen
        print(f"  SynQT model-epoch in a stack of {g:>2}: {cost[g]:.4f} frozen passes per image", flush=True)

    final = EPOCHS * cost[1]  # one final run (one seed) trains alone
    rows = {"the authors' code": (FOLDS * CONFIGS + 1) * EPOCHS, "cached, one run after another": None, **plans}
    print(f"\nViT-B/16 (random weights), 224 px, {args.images} images, fp16 cache, {args.threads} thread(s): frozen "
          f"pass {frozen * 1e3:.0f} ms per image. Protocol: {FOLDS} folds x {CONFIGS} configs + 1 final run, "
          f"{EPOCHS} epochs; halving eta {halving.eta:g}, rungs {list(halving.rungs)} (epochs "
          f"{halving.epochs(EPOCHS)}), stacks of at most {args.max_stack}\n")
    print("| protocol | model-epochs | frozen passes per image | x below the authors' |")
    print("|---|--:|--:|--:|")
    authors = (FOLDS * CONFIGS + 1) * AUTHORS_PASSES_PER_RUN
    for name, plan in rows.items():
        if name == "the authors' code":
            epochs, passes = plan, authors
        elif plan is None:
            epochs, passes = (FOLDS * CONFIGS + 1) * EPOCHS, 1 + (FOLDS * CONFIGS + 1) * EPOCHS * cost[1]
        else:
            epochs = sum(g * e for g, e in plan) + EPOCHS
            passes = 1 + sum(g * e * cost[g] for g, e in plan) + final
        print(f"| {name} | {epochs:,} | {passes:.1f} | {authors / passes:.0f}x |")
    print(f"\nthe authors' code: {FOLDS * CONFIGS + 1} runs x {AUTHORS_PASSES_PER_RUN} frozen-pass equivalents each "
          f"(a SynQT step back-propagates through the frozen stream: 1.44 passes, x {EPOCHS} epochs)")


if __name__ == "__main__":
    main()
