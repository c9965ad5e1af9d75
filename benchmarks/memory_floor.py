"""One row of docs/memory.md's training table, and what it is made of: the CPU account of a side-path method's
training step (default: cached with --stream-blocks), plus, with ``--breakdown``, the tensors saved for backward
(shape, dtype, where saved) and the allocations alive at the step's peak (size, the op and the code that made them).

    python benchmarks/memory_floor.py                                   # synqt and vqt, ViT-B/16, batch 64: ~2 min
    python benchmarks/memory_floor.py --methods synqt --breakdown --json benchmarks/results/memory_vitb_floor.json

The step is the one ``qtune memory`` measures (``qtune.memory.training.measure_training``): random weights, AdamW,
cross-entropy, the second of two steps; run it single-threaded (``--threads 1``, the default) as the tables are.
"""
from __future__ import annotations

import argparse
import collections
import json
import tempfile
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from qtune.backbones import BackboneSpec
from qtune.engine.provenance import provenance
from qtune.memory.training import _stream_taps, measure_training
from qtune.tuned import TunedModel

GIB, MIB = 2**30, 2**20
PARTS = ("parameters", "gradients", "optimizer_state", "inputs", "saved_for_backward", "step_peak", "total")


def _where(limit: int = 3) -> str:
    frames = [f for f in traceback.extract_stack()[:-2] if "/qtune/" in f.filename]
    return " < ".join(f"{Path(f.filename).stem}.{f.name}:{f.lineno}" for f in frames[-limit:][::-1])


def breakdown(backbone, method: str, batch_size: int, mode: str, top: int = 15) -> dict:
    """The same step as the row, with the saved tensors and the allocations alive at the peak listed."""
    model = TunedModel.build(backbone, method, 100, {}, seed=0).train()
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, *model.backbone.preprocessing.input_size, generator=gen)
    labels = torch.randint(0, 100, (batch_size,), generator=gen)
    taps = model.trace(images)
    if mode == "cached_stream":
        taps, _ = _stream_taps(taps, tuple(model.blocks_read()))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-2)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, tuple] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in params and key not in saved:
            saved[key] = (t.untyped_storage().nbytes(), str(tuple(t.shape)), str(t.dtype), _where())
        return t

    def step(record: bool = False) -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if record else torch.enable_grad():
            loss = F.cross_entropy(model.forward_taps(taps), labels)
        loss.backward()
        opt.step()

    step()
    step(record=True)
    groups: dict[tuple, list[int]] = collections.defaultdict(lambda: [0, 0])
    for nbytes, shape, dtype, where in saved.values():
        groups[(shape, dtype, where)][0] += 1
        groups[(shape, dtype, where)][1] += nbytes
    saved_rows = [{"count": n, "bytes": b, "shape": k[0], "dtype": k[1], "where": k[2]}
                  for k, (n, b) in sorted(groups.items(), key=lambda kv: -kv[1][1])]

    opt.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, with_stack=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as d:
        prof.export_chrome_trace(f"{d}/trace.json")
        events = json.loads(Path(f"{d}/trace.json").read_text())["traceEvents"]
    mem = sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0),
                 key=lambda e: e["ts"])
    spans = [e for e in events if e.get("ph") == "X"]
    level = peak = 0
    live: dict[int, tuple[int, float]] = {}
    at_peak: dict[int, tuple[int, float]] = {}
    for e in mem:
        level += e["args"]["Bytes"]
        if e["args"]["Bytes"] > 0:
            live[e["args"]["Addr"]] = (e["args"]["Bytes"], e["ts"])
        else:
            live.pop(e["args"]["Addr"], None)
        if level > peak:
            peak, at_peak = level, dict(live)

    def made_by(ts: float) -> str:
        inside = sorted((s for s in spans if s["ts"] <= ts <= s["ts"] + s["dur"]), key=lambda s: s["dur"])
        op = next((s["name"] for s in inside if s.get("cat") == "cpu_op"), "?")
        code = [s["name"].split("/")[-1] for s in inside if s.get("cat") == "python_function" and "qtune" in s["name"]]
        return f"{op} in {' < '.join(code[:2]) or 'autograd / optimiser'}"

    alive: dict[tuple, list[int]] = collections.defaultdict(lambda: [0, 0])
    for nbytes, ts in at_peak.values():
        alive[(nbytes, made_by(ts))][0] += 1
        alive[(nbytes, made_by(ts))][1] += nbytes
    peak_rows = [{"count": n, "bytes": b, "each": k[0], "made_by": k[1]}
                 for k, (n, b) in sorted(alive.items(), key=lambda kv: -kv[1][1])]
    print(f"  saved for backward: {sum(r['bytes'] for r in saved_rows) / MIB:.1f} MiB")
    for r in saved_rows[:top]:
        print(f"    {r['bytes'] / MIB:7.2f} MiB  {r['count']:3d} x {r['dtype']} {r['shape']}  {r['where']}")
    print(f"  alive at the step's peak ({peak / MIB:.1f} MiB):")
    for r in peak_rows[:top]:
        print(f"    {r['bytes'] / MIB:7.2f} MiB  {r['count']:3d} x {r['each'] / MIB:.3f} MiB  {r['made_by']}")
    return {"saved": saved_rows, "peak_bytes": peak, "alive_at_peak": peak_rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="vit_base_patch16_224")
    ap.add_argument("--methods", default="synqt,vqt")
    ap.add_argument("--mode", default="cached_stream", choices=("live", "cached", "cached_stream"))
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--breakdown", action="store_true", help="list saved tensors and allocations alive at the peak")
    ap.add_argument("--json", help="write the rows (and breakdowns) here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    backbone = BackboneSpec(args.backbone, random_init=True).load()
    rows = []
    for method in args.methods.split(","):
        row = measure_training(backbone, method, {}, batch_size=args.batch_size, num_classes=100, mode=args.mode)
        print(f"{method} ({args.mode}), GiB: " + ", ".join(f"{k} {row[k] / GIB:.3f}" for k in PARTS) +
              f"; total {row['total'] / 1e9:.3f} GB")
        if args.breakdown:
            row["breakdown"] = breakdown(backbone, method, args.batch_size, args.mode)
        rows.append(row)
    if args.json:
        out = {"backbone": args.backbone, "batch_size": args.batch_size, "num_classes": 100, "dtype": "fp32",
               "threads": torch.get_num_threads(), "rows": rows, "provenance": provenance(torch.device("cpu"))}
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
