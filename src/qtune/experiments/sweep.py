"""`qtune sweep`: the papers' protocol as one resumable command.

Per task: side-path methods read one TapCache of train800val200 (one frozen pass), shared by every fold, config and
seed; stream methods train live. Hyper-parameters are chosen by stratified k-fold CV on train800val200 (or on
train800 -> val200), each fold a sample weighting of the same batches, so a whole structure group of a grid trains
in stacks (``engine.many``). The choice is retrained on train800val200 once per seed, and the test split is traced
once per task and read by every final model of that task at once.

This module is the driver. The planner (``planner``) turns the spec into trials and units; units (a cache, a stack of
selection trials, a task's final runs: ``units``) run on an executor (``executors``): in this process, a local pool
of processes, or Ray. Only the driver writes the store; a unit that fails marks its trials failed with the error,
and the sweep goes on. Run again, a sweep skips done trials and re-runs the others.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from ..errors import ConfigError, TrialsFailedError
from ..io import exclusive_folder
from ..memory.units import format_bytes
from .cluster import check_nodes
from .executors import EXECUTORS, default_jobs, execute
from .planner import Plan, choose, groups, halving_survivors, stack_sizes, stacks
from .spec import Candidate, SweepSpec, load_spec
from .store import STORE_FILES, Store, Trial
from .units import Unit, say as _say

STORE_FILE = STORE_FILES[0]


def store_path(out: Path) -> Path:
    return out / STORE_FILE if out.suffix != ".sqlite" else out


def run_sweep(spec_path: str | Path, out: str | Path, executor: str = "local", jobs: int | None = None,
              address: str | None = None, max_stack: int = 24, memory_budget: int | None = None,
              threads: int = 1, progress: bool = True) -> str:
    """Run (or resume) a sweep; returns its spec hash. Results are in ``out/store.sqlite``. Side-path selection
    trials train in stacks of at most ``max_stack`` models, fewer where a stack's measured training step would
    exceed ``memory_budget`` bytes. Each unit runs on ``threads`` torch threads, whatever the executor, so results do
    not depend on it (float sums are ordered by the thread count)."""
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor {executor!r}: choose from {', '.join(EXECUTORS)}")
    if max_stack < 1:
        raise ConfigError(f"--max-stack must be >= 1 (got {max_stack})")
    if jobs is not None and jobs < 1:
        raise ConfigError(f"--jobs must be >= 1 (got {jobs})")
    jobs = jobs or default_jobs()
    spec = load_spec(spec_path)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: --out names a file; give a folder for the sweep")
    with exclusive_folder(out):  # one driver per sweep folder: two would run (and test) the same trials twice
        return _run_sweep(spec, out, executor, jobs, address, max_stack, memory_budget, threads, progress)


def _halving(plan: Plan, store: Store, selection: list[Trial], run: Callable, sizes: dict[tuple, int],
             max_stack: int, threads: int, progress: bool, say: Callable) -> None:
    """Selection by successive halving, one rung at a time over every task and method: the candidates alive at a
    rung (``halving_survivors``, replayed from the store, so a resumed sweep goes on at the rung it reached) train
    to it in stacks, each trial from its state at the previous rung, and are scored; a method's trials are done once
    its choice is made, and their states are deleted."""
    halving = plan.spec.halving
    by_method: dict[tuple[str, str], list[str]] = {}
    for t in selection:
        by_method.setdefault((t.task, t.method), []).append(t.key)
    index = {t.key: t.candidate for t in selection}

    def get(key: str) -> Trial:  # with this spec's candidate index (a shared trial keeps the first spec's)
        return replace(store.get(key), candidate=index[key])

    def record(key: str, result: dict) -> None:  # a rung's score: the trial goes on (or waits for the decision)
        before = store.get(key)
        rungs = [*before.rungs, {"epoch": result["metrics"]["epochs"], "metric": result["metric"]}]
        seconds = (before.seconds or 0.0) + result["seconds"] if before.rungs else result["seconds"]
        store.record(key, {**result, "seconds": seconds, "metrics": {**result["metrics"], "rungs": rungs}},
                     state="pending")

    for rung in range(len(halving.rungs) + 1):
        due = []
        for keys in by_method.values():
            trials = [get(k) for k in keys]
            if all(t.state == "done" for t in trials):
                continue
            alive, decided = halving_survivors(trials, halving)
            for t in trials:  # a stopped candidate's states are not needed again
                if t.candidate not in alive[-1]:
                    (plan.states / f"{t.key}.safetensors").unlink(missing_ok=True)
            if not decided and len(alive) == rung + 1:  # the method is at this rung
                due += [t for t in trials if t.candidate in alive[rung] and len(t.rungs) <= rung]
        grouped = groups(due)
        run([plan.unit("select", s[0].task, s, threads, progress, rung=rung)
             for s in stacks(grouped, {k: v for k, v in sizes.items() if k in grouped}, max_stack)],
            f"rung {rung + 1} of {len(halving.rungs) + 1}", record)
    for (task, method), keys in by_method.items():
        trials = [get(k) for k in keys]
        alive, decided = halving_survivors(trials, halving)
        if not decided or any(t.state == "failed" for t in trials):
            continue
        store.mark([k for k in keys if store.get(k).state != "done"], "done")
        for k in keys:
            (plan.states / f"{k}.safetensors").unlink(missing_ok=True)
        stopped = {r: len(alive[r - 1]) - len(alive[r]) for r in range(1, len(alive))}
        say(f"  {task} {method}: {len(alive[0])} candidates; stopped "
            + ", ".join(f"{n} at rung {r}" for r, n in stopped.items()) + f"; {len(alive[-1])} left")


def _run_sweep(spec: SweepSpec, out: Path, executor: str, jobs: int, address: str | None, max_stack: int,
               memory_budget: int | None, threads: int, progress: bool) -> str:
    plan = Plan(spec, out)
    if executor == "ray":  # every node can run the units: checked before the first one
        check_nodes(plan, address)
    store = Store(store_path(out))
    say = _say if progress else (lambda *a, **k: None)
    start = time.perf_counter()

    side_tasks = [t for t in spec.tasks if any(plan.reads_cache(m.name) for m in spec.methods_on(t))]
    selection = plan.selection_trials()
    store.add(selection)
    store.register(plan.hash, spec.name, spec.path.read_text(), [t.key for t in selection])
    todo = [t for t in selection if (store.get(t.key).state != "done")]
    total = len(selection) + sum(len(spec.seeds) for _ in plan.candidates)
    say(f"qtune sweep {spec.name} ({plan.hash}): {len(spec.tasks)} task(s), {len(spec.methods)} method(s), "
        f"{total} trials ({len(selection) - len(todo)} done before); {executor} executor, {jobs} worker(s)")

    done = [len(selection) - len(todo)]

    def run(units: list[Unit], what: str, record: Callable[[str, dict], None] | None = None) -> None:
        for unit in units:
            store.mark(unit.keys, "running")
        for unit, outcome in execute(units, executor, jobs, address, spec.gpus_per_unit):
            if outcome.error is not None:
                store.mark(unit.keys, "failed", outcome.error)
                say(f"  {unit.task}: {what} failed: {outcome.error}")
                continue
            for key, result in outcome.results.items():
                (record or store.record)(key, result)
            if outcome.test_read:
                store.count_test_read(plan.hash, unit.task)
            if not unit.items:
                say(f"  {unit.task}: {what} ready ({time.perf_counter() - start:.0f} s)", flush=True)
                continue
            methods = ", ".join(sorted({i.label for i in unit.items}))
            if record is None:  # a rung's trials are not done yet: counted when their method's choice is made
                done[0] += len(unit.items)
            say(f"  {'' if record else f'[{done[0]}/{total}] '}{unit.task} {methods}: {what} of {len(unit.items)} "
                f"trial(s) done ({time.perf_counter() - start:.0f} s)", flush=True)

    needs_cache = {t.task for t in todo if plan.reads_cache(t.method)}
    run([plan.unit("cache", t, [], threads, progress) for t in side_tasks if t in needs_cache], "cache")
    grouped = groups(todo)
    sizes = stack_sizes(plan, grouped, memory_budget, max_stack) if memory_budget else {}
    for key, size in sizes.items():
        say(f"  {key[0]} {key[1]}: {min(size, len(grouped[key]))} model(s) per stack within the "
            f"{format_bytes(memory_budget)} budget")
    if spec.halving is None:
        run([plan.unit("select", s[0].task, s, threads, progress) for s in stacks(grouped, sizes, max_stack)],
            "selection")
    else:
        _halving(plan, store, selection, run, sizes, max_stack, threads, progress, say)
        done[0] = sum(store.get(t.key).state == "done" for t in selection)

    chosen: dict[tuple[str, str], Candidate] = {}
    # a trial is shared by every spec that runs it; its candidate index is this spec's, not the one stored by the
    # spec that ran it first (whose grid may list the candidates in another order)
    selection = [replace(store.get(t.key), candidate=t.candidate) for t in selection]
    for (task, method), cands in plan.candidates.items():
        pick = choose([t for t in selection if t.task == task and t.method == method], cands)
        if pick is None:
            say(f"  {task} {method}: selection incomplete (failed trials); no final runs")
        else:
            chosen[(task, method)] = pick[0]
    finals = plan.final_trials(chosen)
    store.add(finals)
    store.register(plan.hash, spec.name, spec.path.read_text(), [t.key for t in finals])
    todo_finals = [t for t in finals if store.get(t.key).state != "done"]
    done[0] += len(finals) - len(todo_finals)
    per_task: dict[tuple[str, str | None], list[Trial]] = {}  # per task and backbone: one test pass each
    for t in todo_finals:
        per_task.setdefault((t.task, t.method if plan.own_backbone(t.method) else None), []).append(t)
    final_caches = {t.task for t in todo_finals if plan.reads_cache(t.method)} - needs_cache
    run([plan.unit("cache", t, [], threads, progress) for t in sorted(final_caches)], "cache")
    run([plan.unit("final", task, ts, threads, progress) for (task, _), ts in per_task.items()],
        "final runs and test")
    store.finish(plan.hash)
    trials = store.trials(plan.hash)
    failed = [t for t in trials if t.state == "failed"]
    say(f"qtune sweep {spec.name}: finished in {time.perf_counter() - start:.0f} s; "
        f"{len(failed)} failed trial(s); store {store.path}")
    store.close()
    if failed:
        first = failed[0]
        raise TrialsFailedError(f"sweep {spec.name}: {len(failed)} of {len(trials)} trial(s) failed (first: "
                                f"{first.task} {first.method}: {first.error}); the same command retries them",
                                plan.hash)
    return plan.hash


__all__ = ["run_sweep", "store_path"]
