"""Tables, CSV/JSON and a plot of ``qtune memory`` results (training memory, budget fitting, inference cost)."""
from __future__ import annotations

import json
from pathlib import Path
from statistics import mean
from typing import Any, Callable

from ..errors import ConfigError
from ..io import atomic_write, write_csv, write_json

GIB = 2**30
_PARTS = ("parameters", "gradients", "optimizer_state", "inputs", "saved_for_backward", "step_peak", "total")


def _unit(result: dict[str, Any]) -> tuple[str, int]:
    """GiB for ViT-B-sized figures, MiB for small models, so that small figures do not print as 0.000."""
    totals = [r["total"] for r in result["training"]] + [f["total"] for f in result["budget"]]
    return ("GiB", GIB) if max(totals, default=0) >= GIB else ("MiB", 2**20)


def _g(n: float | None, scale: int = GIB) -> str:
    return "-" if n is None else f"{n / scale:.3f}"


def format_training(result: dict[str, Any]) -> str:
    """Training memory per method, GiB, with the ratio of each total to the live linear probe's."""
    rows = result["training"]
    if not rows:
        return ""
    s = result["settings"]
    unit, scale = _unit(result)
    cpu = result["kind"] == "cpu_account"
    what = ("CPU account: total = parameters + optimizer state + inputs + step peak (gradients, saved tensors and "
            "every transient are inside the step peak)" if cpu else
            "CUDA peak allocated over forward, backward and optimiser step")
    width = max(12, *(len(r["label"]) for r in rows))
    head = (f"{'method':<{width}} {'trainable':>11} {'params':>7} {'grads':>7} {'optim':>7} {'inputs':>7} "
            f"{'saved':>7} {'peak':>7} {'total':>7} {'x linear':>8}")
    title = (f"{s['backbone']['name']}, batch {s['batch_size']}, {result['dtype']}, {result['device']} "
             f"({result['threads']} threads); {unit}. {what}")
    lines = [title, head]
    for r in rows:
        ratio = "-" if r.get("ratio_to_linear") is None else f"{r['ratio_to_linear']:.2f}"
        lines.append(f"{r['label']:<{width}} {r['trainable_parameters']:>11,} " +
                     " ".join(f"{_g(r[k], scale):>7}" for k in _PARTS) + f" {ratio:>8}")
    return "\n".join(lines)


def budget_choice(fit: dict[str, Any], size: Callable[[int], str]) -> tuple[str, str]:
    """What a budget fit chose per knob, and the measured total of the next setting up (``size`` formats bytes)."""
    chosen = ", ".join(f"{k['key']}={k['value'] if k['value'] is not None else 'none fits'}"
                       for k in fit["knobs"]) or "(no knob)"
    nxt = "; ".join(f"{k['key']}={k['value'] + 1}: {size(k['next_total'])}" for k in fit["knobs"]
                    if k["next_total"] is not None) or "-"
    return chosen, nxt


def format_budget(result: dict[str, Any]) -> str:
    if not result["budget"]:
        return ""
    budget = result["budget"][0]["budget"]
    unit, scale = _unit(result)
    kind = "CPU account" if result["kind"] == "cpu_account" else "CUDA peak"
    title = (f"memory budget {budget / scale:.3f} {unit} ({budget:,} bytes), {kind}: per method, the largest "
             f"setting whose measured training step fits")
    lines = [title,
             f"{'method':<14} {'fits':<5} {'chosen':<36} {'total ' + unit:>9}  next setting up (measured)"]
    for f in result["budget"]:
        chosen, nxt = budget_choice(f, lambda b: f"{_g(b, scale)} {unit}")
        lines.append(f"{f['method']:<14} {'yes' if f['fits'] else 'no':<5} {chosen:<36} {_g(f['total'], scale):>9}"
                     f"  {nxt}")
    return "\n".join(lines)


def format_inference(result: dict[str, Any]) -> str:
    if not result["inference"]:
        return ""
    rows = result["inference"]
    width = max(12, *(len(r["label"]) for r in rows))
    title = (f"inference, batch {result['settings']['inference_batch_size']}, {result['dtype']}, "
             f"{result['device']} ({result['threads']} threads)")
    lines = [title,
             f"{'method':<{width}} {'params':>12} {'trainable':>11} {'GFLOPs/img':>10} {'img/s':>8} {'memory MiB':>10}"]
    for r in rows:
        lines.append(f"{r['label']:<{width}} {r['parameters']:>12,} {r['trainable_parameters']:>11,} "
                     f"{r['flops_per_image'] / 1e9:>10.2f} {r['images_per_second']:>8.1f} "
                     f"{r['memory_bytes'] / 2**20:>10.1f}")
    return "\n".join(lines)


def format_memory(result: dict[str, Any]) -> str:
    return "\n\n".join(t for t in (format_training(result), format_budget(result), format_inference(result)) if t)


def _csv_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for r in result["training"]:
        out.append({"part": "training", "label": r["label"], "method": r["method"], "mode": r["mode"],
                    "options": json.dumps(r["options"]), "kind": r["kind"], "dtype": r["precision"],
                    "batch_size": r["batch_size"], "trainable_parameters": r["trainable_parameters"],
                    **{k: r[k] for k in _PARTS}, "ratio_to_linear": r.get("ratio_to_linear")})
    for f in result["budget"]:
        out.append({"part": "budget", "label": f["method"], "method": f["method"], "mode": "live",
                    "options": json.dumps(f["options"]), "kind": result["kind"], "dtype": result["dtype"],
                    "batch_size": result["settings"]["batch_size"], "total": f["total"], "budget": f["budget"],
                    "fits": f["fits"]})
    for r in result["inference"]:
        out.append({"part": "inference", "label": r["label"], "method": r["method"], "mode": "eval",
                    "options": json.dumps(r["options"]), "kind": r["memory_kind"], "dtype": result["dtype"],
                    "batch_size": r["batch_size"], "trainable_parameters": r["trainable_parameters"],
                    "total": r["memory_bytes"], "parameters_count": r["parameters"],
                    "flops_per_image": r["flops_per_image"], "images_per_second": r["images_per_second"],
                    "threads": r["threads"]})
    return out


def read_accuracies(path: Path) -> dict[str, float]:
    """Mean accuracy per method from qtune results: a demo's summary.json (mean of group means) or results.json
    (mean over its rows), a folder holding either, or a run's result JSON (``test_accuracy``/``val_accuracy``)."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in ("summary.json", "results.json", "result.json") if (path / n).is_file()]
        if not found:
            raise ConfigError(f"{path}: no summary.json, results.json or result.json in this folder")
        path = found[0]
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: results file not found") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a readable results JSON ({e})") from None
    rows = data if isinstance(data, list) else [data]
    acc: dict[str, list[float]] = {}
    for r in rows:
        if not isinstance(r, dict) or "method" not in r:
            continue
        for key in ("mean_of_groups", "accuracy", "test_accuracy", "val_accuracy"):
            if isinstance(r.get(key), (int, float)):
                acc.setdefault(r["method"], []).append(float(r[key]))
                break
    if not acc:
        raise ConfigError(f"{path}: no per-method accuracies found")
    return {m: mean(v) for m, v in acc.items()}


def plot_memory(path: Path, result: dict[str, Any], accuracies: dict[str, float] | None = None) -> Path:
    """PNG: training memory against accuracy where accuracies are given, else training memory per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["training"] or [{"label": f["method"], "method": f["method"], "total": f["total"]}
                                  for f in result["budget"]]
    kind = "CPU account" if result["kind"] == "cpu_account" else "CUDA peak"
    what = "training memory per step"
    if not rows:  # an inference-only run: plot inference memory
        rows = [{"label": r["label"], "method": r["method"], "total": r["memory_bytes"]} for r in result["inference"]]
        what = f"inference memory, batch {result['settings']['inference_batch_size']}"
    unit, scale = _unit({"training": rows, "budget": []})
    batch = f", batch {result['settings']['batch_size']}" if result["training"] or result["budget"] else ""
    title = f"{result['settings']['backbone']['name']}{batch}, {result['dtype']}"
    points = [(r, accuracies[r["method"]]) for r in rows if accuracies and r["method"] in accuracies]
    colors = {"live": "tab:blue", "cached": "tab:green", "cached_stream": "tab:olive"}
    if points:
        fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=150)
        for r, a in points:
            x, y = r["total"] / scale, 100 * a
            ax.scatter([x], [y], s=40, color=colors.get(r.get("mode"), "tab:blue"))
            ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
        ax.set_xlabel(f"{what} ({unit}, {kind})")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    else:
        fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(rows) + 1.4), dpi=150)
        labels = [r["label"] for r in rows][::-1]
        totals = [r["total"] / scale for r in rows][::-1]
        bars = ax.barh(labels, totals, color=[colors.get(r.get("mode"), "tab:blue") for r in rows[::-1]])
        for b, r in zip(bars, rows[::-1]):
            ratio = f"  {r['ratio_to_linear']:.2f}x linear" if r.get("ratio_to_linear") else ""
            ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" {b.get_width():.2f}{ratio}", va="center",
                    fontsize=7)
        ax.set_xlabel(f"{what} ({unit}, {kind})")
        ax.set_xlim(0, max(totals) * 1.35 if totals else 1)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return path


def write_memory(out: Path, result: dict[str, Any], accuracies: dict[str, float] | None = None) -> list[Path]:
    """memory.json (everything, with settings and provenance), memory.csv (one row per figure), memory.png."""
    out = Path(out)
    write_json(out / "memory.json", result)
    write_csv(out / "memory.csv", _csv_rows(result))
    return [out / "memory.json", out / "memory.csv", plot_memory(out / "memory.png", result, accuracies)]
