"""Markdown tables for docs/memory.md from the memory.json files of benchmarks/memory_vitb.sh and memory_stages.sh.

    python benchmarks/memory_tables.py benchmarks/results
"""
from __future__ import annotations

import json
from functools import partial
import sys
from pathlib import Path

from qtune.report.memory import budget_choice

GIB = 2**30
# SynQT paper, Table 1: GPU memory at batch 64 on ViT-B/16 (GB).
PAPER = {"linear": 2.5, "full": 11.1, "bitfit": 7.8, "vpt_deep": 8.1, "vqt": 3.2, "synqt": 3.4}


def training(data: dict, paper: dict[str, float] = PAPER) -> str:
    head = ("| method | trainable | parameters | gradients | AdamW state | inputs | saved for backward | step peak "
            "| **total** | x linear |" + (" paper (GB) | paper x linear |" if paper else ""))
    lines = [head, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|" + ("--:|--:|" if paper else "")]
    for r in data["training"]:
        ours = paper.get(r["method"]) if r["mode"] == "live" else None
        paper_ratio = "" if ours is None else f"{ours / paper['linear']:.2f}"
        cells = [f"{r[k] / GIB:.3f}" for k in ("parameters", "gradients", "optimizer_state", "inputs",
                                               "saved_for_backward", "step_peak")]
        lines.append(f"| {r['label']} | {r['trainable_parameters']:,} | " + " | ".join(cells) +
                     f" | **{r['total'] / GIB:.3f}** | {r['ratio_to_linear']:.2f} |" +
                     (f" {ours or ''} | {paper_ratio} |" if paper else ""))
    return "\n".join(lines)


def inference(data: dict) -> str:
    lines = ["| method | parameters | trainable | GFLOPs / image | images / s | inference memory (MiB) |",
             "|---|--:|--:|--:|--:|--:|"]
    for r in data["inference"]:
        lines.append(f"| {r['label']} | {r['parameters']:,} | {r['trainable_parameters']:,} | "
                     f"{r['flops_per_image'] / 1e9:.2f} | {r['images_per_second']:.1f} | "
                     f"{r['memory_bytes'] / 2**20:,.0f} |")
    return "\n".join(lines)


def budget(data: dict) -> str:
    lines = ["| method | chosen | measured total (GiB) | fits | next setting up (GiB) |", "|---|---|--:|---|---|"]
    for f in data["budget"]:
        chosen, nxt = budget_choice(f, lambda b: f"{b / GIB:.3f}")
        lines.append(f"| {f['method']} | {chosen} | {f['total'] / GIB:.3f} | {'yes' if f['fits'] else 'no'} | "
                     f"{nxt} |")
    return "\n".join(lines)


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
    stage_training = partial(training, paper={})  # Table 4 of the paper gives no memory figures
    for name, fn in (("memory_vitb_training", training), ("memory_vitb_inference", inference),
                     ("memory_vitb_budget_3GB", budget), ("memory_swin_training", stage_training),
                     ("memory_convnext_training", stage_training)):
        path = root / name / "memory.json"
        if path.is_file():
            print(f"### {name}\n\n{fn(json.loads(path.read_text()))}\n")


if __name__ == "__main__":
    main()
