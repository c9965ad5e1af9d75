"""Bytes autograd saves for backward in one training forward, for every registered method and its
memory-constrained variants (``trainable_blocks``), on a random-weight backbone (default ViT-B/16, batch 64).

Exact CPU accounting (``qtune.memory.SavedTensors``): every tensor saved for backward, counted once per storage;
parameters (frozen or trainable) are reported apart, since they are held anyway. Only the forward runs.

    python benchmarks/saved_bytes.py                       # ViT-B/16, batch 64, blocks 1, 4, 12: ~45 min on CPU
    python benchmarks/saved_bytes.py --batch-size 8 --methods lora,vpt_deep --blocks 1,12 --json out.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch

from qtune.backbones import Backbone, load_backbone
from qtune.memory import SavedTensors
from qtune.methods import get_method, method_names
from qtune.tuned import TunedModel

GIB = 2**30


def variants(name: str, blocks: list[int], depth: int) -> list[tuple[str, dict[str, Any]]]:
    """(label, options) to measure for ``name``: defaults, plus each ``trainable_blocks`` where it applies."""
    cls = get_method(name)
    if "+" in name:  # a combination: constrain its stream part
        key = f"{name.split('+')[0]}.trainable_blocks"
    elif any(f == "trainable_blocks" for f in cls.config_class.__dataclass_fields__):
        key = "trainable_blocks"
    else:
        return [("", {})]
    return [(f"{k} of {depth}", {key: k}) for k in blocks if k < depth] + [(f"{depth} of {depth} (all)", {})]


def measure(backbone: Backbone, name: str, options: dict[str, Any], batch: int, num_classes: int) -> dict[str, Any]:
    """One method's saved bytes for one forward (``build`` copies the backbone for stream methods, which change it)."""
    model = TunedModel.build(backbone, name, num_classes, options, seed=0).train()
    torch.manual_seed(0)  # the images
    images = torch.randn(batch, 3, *backbone.preprocessing.input_size)
    start = time.perf_counter()
    with SavedTensors(model.parameters()) as rec:
        model(images)
    return {"method": name, "options": options, "trainable": model.num_trainable(),
            "saved_bytes": rec.activation_bytes, "saved_parameter_bytes": rec.parameter_bytes,
            "seconds": time.perf_counter() - start}


def _measure_fresh(backbone_name: str, name: str, options: dict[str, Any], batch: int, num_classes: int,
                   threads: int) -> dict[str, Any]:
    """``measure`` in a process of its own: the allocator's high-water mark of one row never burdens the next."""
    torch.set_num_threads(threads)
    return measure(load_backbone(backbone_name), name, options, batch, num_classes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="vit_base_patch16_224")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--methods", help="comma-separated method names (default: every registered method)")
    p.add_argument("--blocks", default="1,4,12", help="trainable_blocks values to measure besides the default")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    depth = load_backbone(args.backbone).depth  # random weights, seeded: nothing is downloaded
    names = args.methods.split(",") if args.methods else method_names()
    blocks = [int(b) for b in args.blocks.split(",") if b]
    print(f"{args.backbone} (random weights), batch {args.batch_size}, {args.num_classes} classes; "
          f"saved-for-backward bytes of one training forward, GiB (parameters excluded)")
    print(f"{'method':<19} {'trainable blocks':<18} {'trainable':>12} {'saved GiB':>10} {'seconds':>8}", flush=True)
    rows = []
    spawn = multiprocessing.get_context("spawn")
    for name in names:
        for label, options in variants(name, blocks, depth):
            with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
                r = pool.submit(_measure_fresh, args.backbone, name, options, args.batch_size, args.num_classes,
                                args.threads).result()
            r["trainable_blocks"] = label
            rows.append(r)
            print(f"{name:<19} {label or '-':<18} {r['trainable']:>12,} {r['saved_bytes'] / GIB:>10.3f} "
                  f"{r['seconds']:>8.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"backbone": args.backbone, "batch_size": args.batch_size, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
