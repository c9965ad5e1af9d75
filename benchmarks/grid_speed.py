"""A grid of side-path models trained at once (fit_many) against one cached fit after another.

Part "demo": the shipped demo backbone on the offline dsprites_loc task (train800val200, 1000 images, fp16 cache):
wall time per config and epoch for linear, VQT and SynQT, sequential vs stacks of G models.
Part "vitb": a random-weight ViT-B/16 at 224 px on a subset of the same images (resized): the frozen pass, SynQT
sequential vs stacked, the paper's per-task protocol (5 folds x 8 configs + 1 final run, 50 epochs) in frozen
forward passes per image, and training memory against G at batch 64 with a budget that chunking keeps.

    python benchmarks/grid_speed.py --out /tmp/grid_speed --part demo
    python benchmarks/grid_speed.py --out /tmp/grid_speed --part vitb --threads 2

Time it alone: several processes on the same cores distort every figure.
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
from qtune.engine.loop import fit
from qtune.engine.many import fit_many, models_per_stack, step_bytes
from qtune.memory.units import format_bytes
from qtune.tuned import TunedModel

TASK = "dsprites_loc"
AUTHORS_PASSES_PER_RUN = 72  # one SynQT step of the authors' code = 1.44 frozen forwards, x 50 epochs
PROTOCOL_RUNS = 5 * 8 + 1


def _configs(g: int, epochs: int) -> list[TrainConfig]:
    """G configs of a grid: learning rates spread over a decade, a seed each, one shared batch order."""
    return [TrainConfig(epochs=epochs, batch_size=64, lr=1e-3 * 10 ** (k / max(g - 1, 1)), weight_decay=1e-2,
                        warmup_epochs=0.5, seed=k, shuffle_seed=0, progress=False) for k in range(g)]


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _batches(backbone, method, options, cache, listing):
    model = TunedModel.build(backbone, method, ALL_TASKS[TASK].num_classes, options)
    served, notes = cached_splits(cache, model, {"train": listing})
    if notes:
        raise SystemExit("\n".join(notes))
    return served["train"]


def per_config_epoch(backbone, method, options, batches, g: int, epochs: int, sequential: int) -> tuple[float, float]:
    """Seconds per config and epoch: ``sequential`` fits one after another, and one stack of ``g``."""
    classes = ALL_TASKS[TASK].num_classes
    cfgs = _configs(g, epochs)
    seq = sum(_timed(lambda c=c: fit(TunedModel.build(backbone, method, classes, options, seed=c.seed), batches, c))
              for c in cfgs[:sequential]) / (sequential * epochs)
    models = [TunedModel.build(backbone, method, classes, options, seed=c.seed) for c in cfgs]
    stacked = _timed(lambda: fit_many(models, batches, cfgs)) / (g * epochs)
    return seq, stacked


def demo_part(out: Path, gs: list[int], epochs: int, methods: list[str]) -> None:
    [task_dir] = make_offline_benchmark(out / "data", tasks=[TASK], test_size=100)
    listing = read_vtab(task_dir, ALL_TASKS[TASK].num_classes)["train800val200"]
    backbone = load_backbone(None, "demo")
    build_cache(out / "cache-demo", backbone, [listing], dtype="fp16", progress=False)
    print(f"demo backbone, {TASK} train800val200 ({len(listing.samples)} images, fp16 cache), batch 64, "
          f"{torch.get_num_threads()} thread(s); seconds per config and epoch")
    print(f"{'method':<8} {'G':>3} {'sequential':>11} {'fit_many':>9} {'speed-up':>9}")
    for method in methods:
        batches = _batches(backbone, method, {}, out / "cache-demo", listing)
        for g in gs:
            seq, stacked = per_config_epoch(backbone, method, {}, batches, g, epochs, sequential=min(g, 3))
            print(f"{method:<8} {g:>3} {seq:>11.3f} {stacked:>9.3f} {seq / stacked:>8.2f}x", flush=True)


def vitb_part(out: Path, gs: list[int], images: int, budget_models: int) -> None:
    [task_dir] = make_offline_benchmark(out / "data", tasks=[TASK], test_size=100)
    full = read_vtab(task_dir, ALL_TASKS[TASK].num_classes)["train800val200"]
    listing = dataclasses.replace(full, samples=full.samples[:images])
    backbone = load_backbone("vit_base_patch16_224")  # random weights: speed and memory only
    cache = out / f"cache-vitb-{images}"
    trace = _timed(lambda: build_cache(cache, backbone, [listing], dtype="fp16", progress=False, overwrite=True))
    per_image = trace / images
    print(f"ViT-B/16 (random weights), 224 px, {images} images, fp16 cache, {torch.get_num_threads()} thread(s): "
          f"frozen pass {per_image:.3f} s per image (cache build included)")
    batches = _batches(backbone, "synqt", {}, cache, listing)
    print(f"{'G':>3} {'sequential s/config/epoch':>26} {'fit_many':>9} {'speed-up':>9} {'protocol passes/image':>22}")
    for g in gs:
        seq, stacked = per_config_epoch(backbone, "synqt", {}, batches, g, 1, sequential=1)
        seq_units = 1 + PROTOCOL_RUNS * 50 * seq / images / per_image
        many_units = 1 + PROTOCOL_RUNS * 50 * stacked / images / per_image
        print(f"{g:>3} {seq:>26.2f} {stacked:>9.2f} {seq / stacked:>8.2f}x "
              f"{many_units:>10.1f} (sequential {seq_units:.1f})", flush=True)
    print(f"the authors' code: {PROTOCOL_RUNS} runs x {AUTHORS_PASSES_PER_RUN} = "
          f"{PROTOCOL_RUNS * AUTHORS_PASSES_PER_RUN} frozen passes per image")

    def build(seed: int) -> TunedModel:
        return TunedModel.build(backbone, "synqt", ALL_TASKS[TASK].num_classes, seed=seed)

    print("training memory of one stacked SynQT step at batch 64 (CPU account):")
    sizes = {}
    for g in (1, 2, 4, 8):
        sizes[g] = step_bytes([build(k) for k in range(g)], batches, 64)
        print(f"  G={g}: {format_bytes(sizes[g])}", flush=True)
    budget = (sizes[budget_models] + sizes[budget_models * 2]) // 2 if budget_models * 2 in sizes else sizes[4]
    chosen = models_per_stack(build, batches, 64, budget, most=64)
    used = step_bytes([build(k) for k in range(chosen)], batches, 64)
    print(f"budget {format_bytes(budget)}: {chosen} models per stack, measured {format_bytes(used)} "
          f"({'within' if used <= budget else 'OVER'} the budget)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="working folder (data and caches)")
    p.add_argument("--part", choices=("demo", "vitb", "all"), default="all")
    p.add_argument("--gs", default="1,8,24,40", help="stack sizes G (demo part)")
    p.add_argument("--vitb-gs", default="1,8", help="stack sizes G (ViT-B part)")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per run (demo part)")
    p.add_argument("--methods", default="linear,vqt,synqt")
    p.add_argument("--vitb-images", type=int, default=64)
    p.add_argument("--budget-models", type=int, default=2, help="ViT-B budget: between this many models and twice")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.part in ("demo", "all"):
        demo_part(args.out, [int(g) for g in args.gs.split(",")], args.epochs, args.methods.split(","))
    if args.part in ("vitb", "all"):
        vitb_part(args.out, [int(g) for g in args.vitb_gs.split(",")], args.vitb_images, args.budget_models)


if __name__ == "__main__":
    main()
