"""Benchmark tables the way the papers report them: top-1 per task, group means, and the mean of the group means."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import mean
from typing import Mapping, Sequence

from ..io import atomic_write, write_csv, write_json, write_text


@dataclass
class ResultRow:
    method: str
    task: str
    group: str
    accuracy: float
    trainable_parameters: int
    memory_bytes: int
    memory_kind: str
    train_seconds: float
    hparams: dict


def benchmark_table(rows: Sequence[ResultRow], groups: Sequence[str],
                    tasks: Mapping[str, str] | None = None) -> list[dict]:
    """One summary per method: per-task accuracy, per-group means, their mean, parameters, memory, time.

    With ``tasks`` (task -> group), a method's group mean needs every one of them in that group, and the mean of
    group means every group, so that a method run on fewer tasks is not averaged over others.
    """
    group_of = {r.task: r.group for r in rows} | dict(tasks or {})
    out = []
    for method in dict.fromkeys(r.method for r in rows):
        mine = [r for r in rows if r.method == method]
        accs = {r.task: r.accuracy for r in mine}
        group_means = {}
        for g in groups:
            members = [t for t in (tasks or accs) if group_of.get(t) == g]
            if members and all(t in accs for t in members):
                group_means[g] = mean(accs[t] for t in members)
        complete = bool(group_means) and (tasks is None or len(group_means) == len(groups))
        out.append({
            "method": method,
            **accs,
            **{f"mean_{g}": v for g, v in group_means.items()},
            **({"mean_of_groups": mean(group_means.values())} if complete else {}),
            "trainable_parameters": max(r.trainable_parameters for r in mine),
            "memory_bytes": max(r.memory_bytes for r in mine),
            "train_seconds": sum(r.train_seconds for r in mine),
        })
    return out


def format_table(summary: list[dict], tasks: Sequence[str], groups: Sequence[str], memory_batch: int | None = None
                 ) -> str:
    """A fixed-width text table, accuracies in percent; ``memory_batch``: the batch size memory was measured at."""
    cols = [*tasks, *(f"mean_{g}" for g in groups), "mean_of_groups"]
    heads = [*tasks, *groups, "mean of groups"]
    widths = [max(7, len(h)) for h in heads]
    name = max(8, *(len(s["method"]) for s in summary))
    lines = ["method".ljust(name) + " " + " ".join(h.rjust(w) for h, w in zip(heads, widths))
             + "     params   memory  seconds" + (f"  (memory: one step at batch {memory_batch})" if memory_batch else "")]
    for s in summary:
        accs = " ".join(f"{100 * s[c]:.1f}".rjust(w) if c in s else "-".rjust(w) for c, w in zip(cols, widths))
        lines.append(f"{s['method']:<{name}} {accs} {s['trainable_parameters']:>10,} "
                     f"{s['memory_bytes'] / 2**20:>7.1f}M {s['train_seconds']:>8.1f}")
    return "\n".join(lines)


def format_markdown(summary: list[dict], tasks: Sequence[str], groups: Sequence[str], memory_batch: int | None = None
                    ) -> str:
    """The same table in Markdown (for docs): top-1 (%), group means in bold, parameters, memory, seconds."""
    cols = [*tasks, *(f"mean_{g}" for g in groups), "mean_of_groups"]
    memory = f"memory / step at batch {memory_batch}" if memory_batch else "memory / step"
    head = ["method", *tasks, *groups, "mean of groups", "trainable params", memory, "train s"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "--:|" * (len(head) - 1)]
    for s in summary:
        accs = [(f"{100 * s[c]:.1f}" if c in s else "-") for c in cols]
        accs = [a if c in tasks or a == "-" else f"**{a}**" for a, c in zip(accs, cols)]
        lines.append("| " + " | ".join([s["method"], *accs, f"{s['trainable_parameters']:,}",
                                        f"{s['memory_bytes'] / 2**20:.1f} MiB", f"{s['train_seconds']:.0f}"]) + " |")
    return "\n".join(lines)


def write_results(out: Path, rows: Sequence[ResultRow], summary: list[dict], text: str, markdown: str = "") -> None:
    """results.json (every run), summary.csv / summary.json (per method), table.txt (as printed), table.md."""
    write_json(out / "results.json", [asdict(r) for r in rows])
    write_json(out / "summary.json", summary)
    write_csv(out / "summary.csv", summary)
    write_text(out / "table.txt", text + "\n")
    if markdown:
        write_text(out / "table.md", markdown + "\n")


def plot_accuracy_vs_memory(out: Path, summary: list[dict], memory_label: str, title: str = "",
                            chance: float | None = None, memory_batch: int | None = None) -> Path:
    """PNG scatter of mean accuracy against training memory, one labelled point per method; ``chance`` (a fraction)
    is drawn as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=150)
    points = [(s["memory_bytes"] / 2**20, 100 * s["mean_of_groups"], s["method"]) for s in summary
              if "mean_of_groups" in s]  # methods run on every group
    for x, y, name in points:
        ax.scatter([x], [y], s=40)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8, annotation_clip=True)
    if chance is not None:
        ax.axhline(100 * chance, color="grey", linestyle="--", linewidth=1)
        ax.annotate("chance", (0.01, 100 * chance), xycoords=("axes fraction", "data"), textcoords="offset points",
                    xytext=(0, 3), fontsize=7, color="grey")
    if points:  # room for the labels inside the frame
        xs, ys = [p[0] for p in points], [p[1] for p in points] + ([100 * chance] if chance is not None else [])
        ax.set_xlim(0, max(xs) * 1.35)
        ax.set_ylim(max(0.0, min(ys) - 5), min(100.0, max(ys) + 5))
    ax.set_title(title or "accuracy against training memory", fontsize=9)
    at = f" at batch {memory_batch}" if memory_batch else ""
    ax.set_xlabel(f"training memory per step{at} (MiB, {memory_label})")
    ax.set_ylabel("mean of group means, top-1 (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "accuracy_vs_memory.png"
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return path
