"""What a frozen backbone's features hold for each offline task: logistic-regression probes on raw pixels, on the
final pooled feature (what the linear probe reads), and on each probed block's values V_i flattened over tokens
(what side-path queries can attend to; the spatial layout is kept). Regularisation is chosen on train800 -> val200,
the choice refit on train800val200 and tested once, as in the demo.

    python benchmarks/feature_probe.py --weights src/qtune/assets/demo_vit --blocks 1,5,11

A task that is decodable from V_i but not from the pooled feature is one where queries can beat the linear probe.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from qtune.backbones import load_backbone
from qtune.data import ImageDataset
from qtune.data.layouts import read_vtab
from qtune.data.offline import ALL_TASKS, make_offline_benchmark
from qtune.demo import DEMO_TASKS

C_GRID = (0.01, 0.1, 1.0)


def features(backbone, listing, blocks: list[int]) -> dict[str, np.ndarray]:
    data = ImageDataset(listing, backbone.preprocessing.transform())
    images = torch.stack([data[i][0] for i in range(len(data))])
    out: dict[str, list[np.ndarray]] = {"pixels": [], "pooled": [], **{f"V{b}": [] for b in blocks}}
    with torch.no_grad():
        for s in range(0, len(images), 128):
            x = images[s:s + 128]
            taps = backbone.trace(x, blocks)
            out["pixels"].append(x.flatten(1).numpy())
            out["pooled"].append(taps.pooled.numpy())
            for b in blocks:
                out[f"V{b}"].append(taps.kv(b)[1].flatten(1).numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def probe(train: np.ndarray, y_train, val: np.ndarray, y_val, trainval, y_trainval, test, y_test) -> dict:
    def fit(c, x, y):
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000)).fit(x, y)

    scores = [fit(c, train, y_train).score(val, y_val) for c in C_GRID]
    best = C_GRID[int(np.argmax(scores))]  # ties: the smaller C (stronger regularisation)
    return {"C": best, "val": max(scores), "test": fit(best, trainval, y_trainval).score(test, y_test)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True, help="backbone folder or file")
    p.add_argument("--tasks", default=",".join(DEMO_TASKS), help="offline tasks (default: the demo's)")
    p.add_argument("--blocks", default="1,5,11", help="blocks whose V to probe")
    p.add_argument("--work", type=Path, default=Path("/tmp/qtune_probe"), help="offline benchmark folder")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args()
    torch.set_num_threads(1)
    backbone = load_backbone(None, args.weights)
    blocks = [int(b) for b in args.blocks.split(",")]
    tasks = args.tasks.split(",")
    dirs = make_offline_benchmark(args.work, seed=0, tasks=tasks, progress=False)
    results = {}
    for task, folder in zip(tasks, dirs):
        splits = read_vtab(folder, ALL_TASKS[task].num_classes)
        feats = {s: features(backbone, splits[s], blocks) for s in ("train800", "val200", "train800val200", "test")}
        labels = {s: np.asarray(splits[s].labels) for s in feats}
        results[task] = {k: probe(*(a for s in feats for a in (feats[s][k], labels[s]))) for k in feats["test"]}
        print(f"{task:<14} chance {1 / ALL_TASKS[task].num_classes:.3f}  "
              + "  ".join(f"{k} {r['test']:.3f}" for k, r in results[task].items()), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"weights": args.weights, "blocks": blocks, "tasks": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
