"""`qtune report STORE`: the paper's tables and figures from a results store alone, without retraining."""
from __future__ import annotations

from pathlib import Path
from statistics import mean, pstdev

from ..data.layouts import VTAB_GROUPS, VTAB_TASKS, vtab_task
from ..data.offline import ALL_TASKS
from ..experiments.store import Store, Trial
from ..io import write_text
from .tables import ResultRow, benchmark_table, format_markdown, format_table, plot_accuracy_vs_memory, write_results


def _task_order(tasks: list[str], group_of: dict[str, str]) -> list[str]:
    """Natural, Specialized, Structured (then others); within a group VTAB-1k tasks in the paper's Table 1 order,
    then the others in the order met."""
    order, groups = list(VTAB_TASKS), [*VTAB_GROUPS, "other"]

    def rank(t: str) -> tuple[int, int, int]:
        known = vtab_task(t)
        group = groups.index(group_of[t]) if group_of[t] in groups else len(groups)
        return group, order.index(known.name) if known else len(order), tasks.index(t)
    return sorted(dict.fromkeys(tasks), key=rank)


def _flat(t: Trial) -> dict:
    return {**t.config["train"], **{f"options.{k}": v for k, v in t.config["options"].items()}}


def _varied(trials: list[Trial]) -> list[str]:
    """The hyper-parameters that differ among a method's candidates on a task (what the choice is about)."""
    flat = [_flat(t) for t in trials]
    keys = sorted({k for f in flat for k in f})
    return [k for k in keys if len({repr(f.get(k)) for f in flat}) > 1 and k not in ("seed", "shuffle_seed")]


def _setting(t: Trial, keys: list[str]) -> dict:
    """A trial's values of the hyper-parameters the choice is about."""
    flat = _flat(t)
    return {k: flat.get(k) for k in keys}


def _method_order(spec_text: str) -> list[str]:
    """The methods in the order the spec lists them (the table's row order)."""
    from ..experiments.spec import tomllib

    try:
        return list(tomllib.loads(spec_text).get("methods", {}))
    except tomllib.TOMLDecodeError:
        return []


def sweep_rows(store: Store, spec_hash: str) -> tuple[list[ResultRow], list[dict]]:
    """One row per (task, method) from the final runs (mean over seeds), and the choices made."""
    trials = store.trials(spec_hash)
    rows, choices = [], []
    order = _method_order(store.sweep_spec(spec_hash))
    pairs = sorted(dict.fromkeys((t.task, t.method) for t in trials),
                   key=lambda p: order.index(p[1]) if p[1] in order else len(order))
    for task, method in pairs:
        mine = [t for t in trials if t.task == task and t.method == method]
        finals = [t for t in mine if t.kind == "final" and t.state == "done"]
        if not finals:
            continue
        folds = [t for t in mine if t.kind == "fold"]
        varied = _varied(folds) if folds else []
        chosen = finals[0]
        setting = _setting(chosen, varied)
        # by setting, not by the stored candidate index: a trial shared with another spec keeps that spec's index
        cv = [t.metric for t in folds if _setting(t, varied) == setting and t.state == "done"]
        accs = [t.metric for t in finals]
        stopped = _stopped(folds, varied, setting)
        hparams = {"chosen": setting, "selection_accuracy": mean(cv) if cv else None,
                   **({"stopped": stopped} if stopped else {}),
                   "seeds": [t.seed for t in finals], "seed_accuracies": accs, "std": pstdev(accs),
                   "source": chosen.config.get("source"),
                   **{k: chosen.metrics[k] for k in ("memory_batch_size", "recipe_batch_size", "recipe_memory_bytes")
                      if k in (chosen.metrics or {})}}
        group = chosen.config.get("group") or (ALL_TASKS[task].group if task in ALL_TASKS else "other")
        rows.append(ResultRow(method, task, group, mean(accs), chosen.trainable_parameters or 0,
                              chosen.memory_bytes or 0, chosen.memory_kind or "", mean(t.seconds or 0 for t in finals),
                              hparams))
        choices.append({"task": task, "method": method, **hparams})
    return rows, choices


def _stopped(folds: list[Trial], varied: list[str], chosen: dict) -> list[dict]:
    """Under successive halving: the candidates stopped before the end of their schedule (the choice aside, which
    is not trained further once it is the last one left), each with the epoch it reached and its mean held-out
    accuracy there; empty without halving."""
    by_setting: dict[str, list[Trial]] = {}
    for t in folds:
        setting = _setting(t, varied)
        if t.state == "done" and t.rungs and t.metrics["epochs"] < t.config["train"]["epochs"] and setting != chosen:
            by_setting.setdefault(_label(setting), []).append(t)
    return [{"setting": k, "epoch": ts[0].metrics["epochs"], "accuracy": mean(t.metric for t in ts)}
            for k, ts in by_setting.items()]


def _label(setting: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in setting.items())


def _choices_markdown(choices: list[dict]) -> str:
    lines = ["| task | method | chosen | CV / val accuracy | test (mean ± std over seeds) |", "|---|---|---|--:|--:|"]
    for c in choices:
        sel = "-" if c["selection_accuracy"] is None else f"{100 * c['selection_accuracy']:.1f}"
        test = f"{100 * mean(c['seed_accuracies']):.1f} ± {100 * c['std']:.1f} (n={len(c['seeds'])})"
        lines.append(f"| {c['task']} | {c['method']} | {_label(c['chosen']) or '(one candidate)'} | {sel} | {test} |")
    halved = [c for c in choices if c.get("stopped")]
    if halved:
        lines += ["", "Stopped by successive halving (epoch reached, mean held-out accuracy there):", ""]
        lines += [f"- {c['task']} {c['method']}: " + "; ".join(f"{s['setting']} at epoch {s['epoch']} "
                                                                f"({100 * s['accuracy']:.1f})" for s in c["stopped"])
                  for c in halved]
    return "\n".join(lines)


def fewshot_curves(rows: list[ResultRow]) -> dict[str, dict[str, dict[int, list[float]]]]:
    """Few-shot results as dataset -> method -> shots -> accuracies over the split seeds (each the mean of its
    final runs' seeds)."""
    curves: dict[str, dict[str, dict[int, list[float]]]] = {}
    for r in rows:
        src = r.hparams.get("source") or {}
        if src.get("kind") == "fgvc":
            per = curves.setdefault(src["dataset"], {}).setdefault(r.method, {})
            per.setdefault(src["shots"], []).append(r.accuracy)
    return curves


def plot_fewshot(path: Path, curves: dict[str, dict[str, dict[int, list[float]]]], title: str) -> Path:
    """Accuracy against shots per dataset (SynQT paper, Fig. 4): mean over split seeds, the band one std."""
    from .figures import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.4), dpi=150, squeeze=False)
    for ax, (dataset, methods) in zip(axes[0], curves.items()):
        for method, per in methods.items():
            shots = sorted(per)
            m = [100 * mean(per[k]) for k in shots]
            sd = [100 * pstdev(per[k]) for k in shots]
            ax.plot(shots, m, marker="o", markersize=3, label=method)
            ax.fill_between(shots, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)], alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({k for per in methods.values() for k in per}))
        ax.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
        ax.set_title(dataset, fontsize=9)
        ax.set_xlabel("training images per class")
        ax.set_ylabel("top-1 on test (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    from ..io import atomic_write

    # tight: one dataset's panel is narrower than the sweep's title, which would be cut at the figure's edge
    atomic_write(path, lambda p: fig.savefig(p, format="png", bbox_inches="tight"))
    plt.close(fig)
    return path


def _fewshot_markdown(curves: dict[str, dict[str, dict[int, list[float]]]]) -> str:
    shots = sorted({k for methods in curves.values() for per in methods.values() for k in per})
    lines = ["| dataset | method | " + " | ".join(f"{k}-shot" for k in shots) + " |",
             "|---|---|" + "--:|" * len(shots)]
    for dataset, methods in curves.items():
        for method, per in methods.items():
            cells = [f"{100 * mean(per[k]):.1f} ± {100 * pstdev(per[k]):.1f}" if k in per else "-" for k in shots]
            lines.append(f"| {dataset} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _figures(store: Store, spec_hash: str, out: Path, root: Path) -> list[Path]:
    """Fig. 5 and Fig. 7 per task from the first seed's final checkpoints of the side-path methods with a head of
    their own (the linear probe's head reads the pooled feature, which the t-SNE shows anyway), on the test split."""
    from ..engine.checkpoint import load_checkpoints
    from ..experiments.tasks import TaskSource
    from ..methods import get_method
    from .figures import task_figures

    finals = [t for t in store.trials(spec_hash) if t.kind == "final" and t.state == "done"
              and t.method != "linear" and get_method(t.method).reads_taps]
    paths = []
    for task in dict.fromkeys(t.task for t in finals):
        first: dict[str, Trial] = {}
        for t in sorted((t for t in finals if t.task == task), key=lambda t: t.seed):
            first.setdefault(t.method, t)
        ckpts = {m: Path(t.metrics.get("checkpoint", "")) for m, t in first.items()}
        ckpts = {m: c for m, c in ckpts.items() if (c / "adapter_config.json").is_file()}
        if not ckpts:
            continue
        _, loaded = load_checkpoints(list(ckpts.values()))
        test = TaskSource(**next(iter(first.values())).config["source"]).read().test
        paths += task_figures(out, task, [(m, model) for m, (model, _) in zip(ckpts, loaded)], test)
    return paths


def write_report(store_path: str | Path, out: str | Path | None = None, spec_hash: str | None = None,
                 figures: bool = False, quiet: bool = False) -> list[dict]:
    """table.md / table.txt / summary.csv / summary.json / results.json, chosen.md and accuracy_vs_memory.png for one
    sweep of the store (default: the latest), in ``out`` (default: ``report/`` beside the store); with ``figures``,
    also the t-SNE and feature-weight plots of the final checkpoints (``_figures``). Returns the table's rows: per
    method, per-task accuracy, group means and their mean."""
    store_path = Path(store_path)
    if store_path.is_dir():
        store_path = store_path / "store.sqlite"
    if not store_path.is_file():
        from ..errors import ConfigError

        raise ConfigError(f"{store_path}: no results store here (run qtune sweep first)")
    store = Store(store_path)
    spec_hash = spec_hash or store.latest_sweep()
    name = store.sweep_name(spec_hash)
    rows, choices = sweep_rows(store, spec_hash)
    out = Path(out) if out else store_path.parent / "report"
    out.mkdir(parents=True, exist_ok=True)
    curves = fewshot_curves(rows)
    if curves:  # few-shot tasks: their own table and Fig. 4, not columns of the VTAB table
        write_text(out / "fewshot.md", _fewshot_markdown(curves) + "\n")
        plot_fewshot(out / "fewshot.png", curves, f"sweep {name}: few-shot accuracy against shots")
        rows = [r for r in rows if r.group != "fgvc"]
    drawn = _figures(store, spec_hash, out, store_path.parent) if figures else []
    store.close()
    write_text(out / "chosen.md", _choices_markdown(choices) + "\n")
    summary = _vtab_table(out, rows, f"{name}: top-1 on test", quiet) if rows else []
    if not quiet:
        print(f"report of sweep {name} ({spec_hash}) written to {out}"
              + (f" with {len(drawn)} figure(s)" if figures else ""))
    return summary


def _vtab_table(out: Path, rows: list[ResultRow], title: str, quiet: bool) -> list[dict]:
    """The paper's Table 1 layout (tasks in its order, group means, their mean) and Fig. 3 (accuracy against
    training memory)."""
    group_of = {r.task: r.group for r in rows}
    tasks = _task_order([r.task for r in rows], group_of)
    groups = [g for g in (*VTAB_GROUPS, "other") if g in group_of.values()]
    summary = benchmark_table(rows, groups, {t: group_of[t] for t in tasks})
    batches = {r.hparams.get("memory_batch_size") for r in rows}
    batch = batches.pop() if len(batches) == 1 else None  # one stated batch size, or none where rows differ
    text = format_table(summary, tasks, groups, batch)
    write_results(out, rows, summary, text, format_markdown(summary, tasks, groups, batch))
    kinds = sorted({r.memory_kind for r in rows if r.memory_kind})
    chance = None
    if all(t in ALL_TASKS for t in tasks):
        chance = mean(mean(1 / ALL_TASKS[t].num_classes for t in tasks if group_of[t] == g) for g in groups)
    plot_accuracy_vs_memory(out, summary, ", ".join(kinds), title, chance, batch)
    if not quiet:
        print("\n" + text)
    return summary
