"""`qtune sweep`: the papers' protocol as one resumable command.

Per task: side-path methods read one TapCache of train800val200 (one frozen pass), shared by every fold, config and
seed; stream methods train live. Hyper-parameters are chosen by stratified k-fold CV on train800val200 (or on
train800 -> val200), each fold a sample weighting of the same batches, so a whole structure group of a grid trains
in stacks (``engine.many``). The choice is retrained on train800val200 once per seed, and the test split is traced
once per task and read by every final model of that task at once.

Work runs in units (a cache, a stack of selection trials, a task's final runs) on an executor: in this process, a
local process pool, or Ray. Only the driver writes the store; a unit that fails marks its trials failed with the
error, and the sweep goes on. Run again, a sweep skips done trials and re-runs the others.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, replace
from pathlib import Path
from statistics import mean
from typing import Any, Iterator

from ..backbones.points import Point
from ..cache.manifest import backbone_key, digest
from ..data.offline import make_offline_benchmark
from ..errors import ConfigError, TrialsFailedError
from ..io import exclusive_folder
from ..memory.units import format_bytes
from ..methods import get_method
from .spec import Candidate, SweepSpec, canonical, load_spec
from .store import STORE_FILES, Store, Trial
from .tasks import TaskSource

EXECUTORS = ("local", "ray")
STORE_FILE = STORE_FILES[0]


def store_path(out: Path) -> Path:
    return out / STORE_FILE if out.suffix != ".sqlite" else out


# -- planning (driver) ----------------------------------------------------------------------------------------------

def _task_identity(source: TaskSource) -> str:
    """The task's data as the trials see it: its list files' bytes (the images are checked by the cache)."""
    if source.kind == "vtab":
        folder = Path(source.path)
        files = [folder / f for f in sorted(os.listdir(folder)) if f.endswith((".txt", ".json"))]
    else:
        folder = Path(source.path)
        files = [folder / f"train_meta.list.num_shot_{source.shots}.seed_{source.split_seed}",
                 folder / "val_meta.list", folder / "test_meta.list"]
    return digest(b"".join(f.read_bytes() for f in files))


class Plan:
    """Everything the driver decides from the spec: task folders, trial keys, units."""

    def __init__(self, spec: SweepSpec, out: Path):
        self.spec, self.out = spec, out
        offline = [t for t, d in spec.tasks.items() if d is None]
        made = (dict(zip(offline, make_offline_benchmark(out / "data", seed=0, tasks=offline,
                                                          test_size=spec.offline_test_size))) if offline else {})
        self.sources = {t: (s or TaskSource(t, "vtab", str(made[t]))) for t, s in spec.tasks.items()}
        # Every task's lists are read (and their files checked) here, before any work.
        self.num_classes = {t: s.read().num_classes for t, s in self.sources.items()}
        backbone = spec.backbone.load()  # a bad backbone fails here, before any work
        self.backbone_key = backbone_key(backbone)
        self.methods = {m.name: m for m in spec.methods}
        # A method whose backbone differs from the spec's (model_args, input_size) trains live, with its own key.
        self.backbone_keys = {m.name: backbone_key(m.backbone(spec.backbone).load()) if self.own_backbone(m.name)
                              else self.backbone_key for m in spec.methods}
        self.task_ids = {t: _task_identity(s) for t, s in self.sources.items()}
        self.candidates = {(t, m.name): spec.candidates(t, m) for t in spec.tasks for m in spec.methods_on(t)}
        self.reads = {t: self._reads(backbone, t) for t in spec.tasks}
        self.hash = digest(canonical({"backbone": self.backbone_key, "tasks": self.task_ids,
                                      "candidates": {f"{t}/{m}": [asdict(c) for c in cs]
                                                     for (t, m), cs in self.candidates.items()},
                                      "protocol": self.protocol, **self._variants()}).encode())[:16]

    def own_backbone(self, name: str) -> bool:
        m = self.methods[name]
        return m.backbone(self.spec.backbone) is not self.spec.backbone

    def reads_cache(self, name: str) -> bool:
        """Whether the method's trials read the task's cache: side-path methods on the spec's backbone."""
        return get_method(self.methods[name].method).reads_taps and not self.own_backbone(name)

    def _variants(self) -> dict[str, Any]:
        """What labelled rows and their backbones add to an identity (nothing for a spec without them)."""
        out = {name: {"method": m.method, "backbone": self.backbone_keys[name]} for name, m in self.methods.items()
               if m.method != name or self.own_backbone(name)}
        return {"variants": out} if out else {}

    @property
    def protocol(self) -> dict[str, Any]:
        s = self.spec
        return {"selection": s.selection, "folds": s.folds if s.selection == "kfold" else 1, "seed": s.seed,
                "cache_dtype": s.cache_dtype}

    @property
    def folds(self) -> list[int]:
        return list(range(self.spec.folds)) if self.spec.selection == "kfold" else [-1]

    def checkpoints(self, task: str) -> Path:
        return self.out / "checkpoints" / task

    def _reads(self, backbone: Any, task: str) -> tuple[tuple[int, ...], tuple[Point, ...]]:
        """The blocks (K/V) and block points the task's side-path candidates read: what its cache stores."""
        from ..cache import what_is_read

        return what_is_read(backbone, ((m.method, c.options) for m in self.spec.methods_on(task)
                                       if self.reads_cache(m.name) for c in self.candidates[(task, m.name)]),
                            self.num_classes[task])

    def cache_dir(self, task: str) -> Path:
        """Per task, dtype, backbone and what is stored: two specs sharing an output folder never compete for one
        cache. (A cache of every block's K/V and no points keeps the name it had before points existed.)"""
        blocks, points = self.reads[task]
        key = dict(self.backbone_key)
        if blocks != tuple(range(self.backbone_key["shape"]["depth"])):
            key["blocks"] = list(blocks)
        if points:
            key["points"] = [p.to_dict() for p in points]
        return self.out / "cache" / f"{task}-{self.spec.cache_dtype}-{digest(canonical(key).encode())[:8]}"

    def _key(self, task: str, name: str, c: Candidate, kind: str, fold: int, seed: int) -> str:
        method = self.methods[name].method
        label = {"label": name} if name != method else {}
        return digest(canonical({"backbone": self.backbone_keys[name], "task": [task, self.task_ids[task]],
                                 "method": method, **label, "options": c.options,
                                 "train": c.config(seed=seed, shuffle_seed=self.spec.seed).to_dict(), "kind": kind,
                                 "fold": fold, "protocol": self.protocol}).encode())[:20]

    def trial(self, task: str, name: str, c: Candidate, kind: str, fold: int, seed: int) -> Trial:
        """A trial of the method labelled ``name`` (its row in the tables; the method it runs is in its config)."""
        return Trial(self._key(task, name, c, kind, fold, seed), task, name, kind, fold, seed, c.index,
                     {"method": self.methods[name].method, "options": c.options,
                      "train": c.config(seed=seed, shuffle_seed=self.spec.seed).to_dict(),
                      "group": self.sources[task].group, "source": self.sources[task].to_dict()})

    def selection_trials(self) -> list[Trial]:
        """A method with one candidate on a task has nothing to choose: no selection trials."""
        seed = self.spec.seeds[0]
        return [self.trial(t, m, c, "fold", f, seed) for (t, m), cs in self.candidates.items() if len(cs) > 1
                for c in cs for f in self.folds]

    def final_trials(self, chosen: dict[tuple[str, str], Candidate]) -> list[Trial]:
        return [self.trial(t, m, c, "final", -1, s) for (t, m), c in chosen.items() for s in self.spec.seeds]

    def unit(self, kind: str, task: str, items: list[dict[str, Any]], threads: int,
             progress: bool = False) -> dict[str, Any]:
        """A unit of work on one backbone: the spec's (a cache; the methods that read it) or a method's own."""
        own = next((i["label"] for i in items if self.own_backbone(i["label"])), None)
        backbone = self.spec.backbone if own is None else self.methods[own].backbone(self.spec.backbone)
        return {"kind": kind, "task": task, "source": self.sources[task].to_dict(),
                "num_classes": self.num_classes[task], "backbone": asdict(backbone),
                "cache": str(self.cache_dir(task)) if own is None else None,
                "checkpoints": str(self.checkpoints(task)), "cache_dtype": self.spec.cache_dtype,
                "protocol": self.protocol, "items": items, "threads": threads, "progress": progress,
                "blocks": list(self.reads[task][0]), "points": [p.to_dict() for p in self.reads[task][1]]}


def _item(t: Trial) -> dict[str, Any]:
    return {"key": t.key, "label": t.method, "method": t.config["method"], "options": t.config["options"],
            "train": t.config["train"], "fold": t.fold}


def _groups(trials: list[Trial]) -> dict[tuple, list[Trial]]:
    """Selection trials that can share a stack: side-path trials of one task, method and structure; each
    stream-method trial alone."""
    groups: dict[tuple, list[Trial]] = {}
    for t in trials:
        method = get_method(t.config["method"])
        if method.reads_taps:
            structure = canonical(method.config_class.from_dict(t.config["options"]).structure())
            groups.setdefault((t.task, t.method, structure), []).append(t)
        else:
            groups[(t.task, t.method, t.key)] = [t]
    return groups


def _stack_sizes(plan: Plan, groups: dict[tuple, list[Trial]], budget: int, most: int) -> dict[tuple, int]:
    """Per side-path group, the most models whose stacked training step fits ``budget`` bytes, measured on the
    task's cache (``engine.many.models_per_stack``)."""
    from ..cache import cached_splits
    from ..engine.config import TrainConfig
    from ..engine.many import models_per_stack
    from ..tuned import TunedModel

    backbone = plan.spec.backbone.load()
    sizes = {}
    for key, trials in groups.items():
        t = trials[0]
        if not plan.reads_cache(t.method):
            continue

        def build(seed: int, t: Trial = t) -> TunedModel:
            return TunedModel.build(backbone, t.config["method"], plan.num_classes[t.task], t.config["options"],
                                    seed=seed)

        served, notes = cached_splits(plan.cache_dir(t.task), build(0), {"pool": plan.sources[t.task].read().pool})
        if "pool" not in served:
            raise ConfigError(f"--memory-budget: cannot measure {t.method} on {t.task}: {notes[0]}")
        sizes[key] = models_per_stack(build, served["pool"], TrainConfig(**t.config["train"]).batch_size, budget,
                                      most)
    return sizes


def _stacks(groups: dict[tuple, list[Trial]], sizes: dict[tuple, int], most: int) -> list[list[Trial]]:
    """Groups cut into stacks of their size (default ``most``); deterministic, so a rerun cuts the same stacks."""
    return [g[i:i + sizes.get(k, most)] for k, g in groups.items() for i in range(0, len(g), sizes.get(k, most))]


def choose(trials: list[Trial], candidates: list[Candidate]) -> tuple[Candidate, float] | None:
    """The candidate with the best mean held-out accuracy over its folds (ties: the earlier in the grid); None
    unless every selection trial of the method on the task is done."""
    if len(candidates) == 1:
        return candidates[0], float("nan")
    if not trials or any(t.state != "done" for t in trials):
        return None
    scores = {c.index: mean(t.metric for t in trials if t.candidate == c.index) for c in candidates}
    best = max(candidates, key=lambda c: (scores[c.index], -c.index))
    return best, scores[best.index]


def _say(*args: Any, **kwargs: Any) -> None:
    """Progress on stdout. A reader that left (`qtune sweep ... | head`) does not stop the sweep: the rest of the
    output goes nowhere and the work goes on (its results are in the store)."""
    try:
        print(*args, **kwargs)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


# -- executors ------------------------------------------------------------------------------------------------------

def default_jobs() -> int:
    """One worker per available core: small models are overhead-bound, and intra-op threads only contend."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _init_worker(driver: int) -> None:
    import threading

    import torch

    torch.set_num_threads(1)
    threading.Thread(target=_exit_with_driver, args=(driver,), daemon=True).start()


def _exit_with_driver(driver: int) -> None:
    """A pool worker ends when its driver is gone (killed: nothing shuts the pool down), instead of holding its
    memory with nobody to read its result: an orphan is adopted by another process."""
    while os.getppid() == driver:
        time.sleep(1.0)
    os._exit(1)


def execute(units: list[dict[str, Any]], executor: str, jobs: int, address: str | None
            ) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(unit, outcome) as units finish. An outcome holds ``results`` (trial key -> result) or ``error``."""
    if not units:
        return
    if executor == "ray":
        try:
            import ray
        except ImportError:
            raise ConfigError("--executor ray needs Ray: pip install 'qtune[ray]'") from None
        if not ray.is_initialized():
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        remote = ray.remote(num_cpus=1, max_retries=0)(run_unit)
        pending = {remote.remote(u): u for u in units}
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            unit = pending.pop(ref)
            try:
                yield unit, ray.get(ref)
            except Exception as e:  # the worker died (Ray raises here instead of returning)
                yield unit, {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
        return
    if jobs == 1:
        for u in units:
            yield u, run_unit(u)
        return
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                             initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(run_unit, u): u for u in units}
        for f in as_completed(futures):
            try:
                yield futures[f], f.result()
            except Exception as e:  # the worker process died
                yield futures[f], {"error": f"{type(e).__name__}: {e}"}


# -- the driver -----------------------------------------------------------------------------------------------------

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


def _run_sweep(spec: SweepSpec, out: Path, executor: str, jobs: int, address: str | None, max_stack: int,
               memory_budget: int | None, threads: int, progress: bool) -> str:
    plan = Plan(spec, out)
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

    def run(units: list[dict[str, Any]], what: str) -> None:
        for unit, outcome in execute(units, executor, jobs, address):
            keys = [i["key"] for i in unit["items"]]
            if "error" in outcome:
                store.mark(keys, "failed", outcome["error"])
                say(f"  {unit['task']}: {what} failed: {outcome['error']}")
                continue
            for key, result in outcome["results"].items():
                store.record(key, result)
            if outcome.get("test_read"):
                store.count_test_read(plan.hash, unit["task"])
            if not keys:
                say(f"  {unit['task']}: {what} ready ({time.perf_counter() - start:.0f} s)", flush=True)
                continue
            done[0] += len(keys)
            methods = ", ".join(sorted({i["label"] for i in unit["items"]}))
            say(f"  [{done[0]}/{total}] {unit['task']} {methods}: {what} of {len(keys)} trial(s) done "
                f"({time.perf_counter() - start:.0f} s)", flush=True)

    needs_cache = {t.task for t in todo if plan.reads_cache(t.method)}
    run([plan.unit("cache", t, [], threads, progress) for t in side_tasks if t in needs_cache], "cache")
    groups = _groups(todo)
    sizes = _stack_sizes(plan, groups, memory_budget, max_stack) if memory_budget else {}
    for key, size in sizes.items():
        say(f"  {key[0]} {key[1]}: {min(size, len(groups[key]))} model(s) per stack within the "
            f"{format_bytes(memory_budget)} budget")
    units = [plan.unit("select", s[0].task, [_item(t) for t in s], threads, progress)
             for s in _stacks(groups, sizes, max_stack)]
    for u in units:
        store.mark([i["key"] for i in u["items"]], "running")
    run(units, "selection")

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
    units = [plan.unit("final", task, [_item(t) for t in ts], threads, progress)
             for (task, _), ts in per_task.items()]
    for u in units:
        store.mark([i["key"] for i in u["items"]], "running")
    run(units, "final runs and test")
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


# -- units (workers) ------------------------------------------------------------------------------------------------

def run_unit(unit: dict[str, Any]) -> dict[str, Any]:
    """Run one unit; never raises: an error comes back as ``{"error": ...}`` for the driver to record."""
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(unit["threads"])
        return {"cache": _cache_unit, "select": _select_unit, "final": _final_unit}[unit["kind"]](unit)
    except Exception as e:  # noqa: BLE001 - any failure of a unit is recorded, not raised
        where = traceback.extract_tb(e.__traceback__)[-1]
        return {"error": f"{type(e).__name__}: {e} ({Path(where.filename).name}:{where.lineno})"}
    finally:
        torch.set_num_threads(before)


def _load(unit: dict[str, Any]):
    from ..backbones import BackboneSpec

    return BackboneSpec(**unit["backbone"]).load(), TaskSource(**unit["source"]).read()


def _cache_unit(unit: dict[str, Any]) -> dict[str, Any]:
    from ..cache import build_cache

    backbone, data = _load(unit)
    build_cache(unit["cache"], backbone, [data.pool], dtype=unit["cache_dtype"], blocks=unit["blocks"], progress=False,
                on_chunk=_ticker(unit, f"cache of {len(data.pool.samples)} images", "chunk"),
                points=[Point.from_dict(p) for p in unit["points"]])
    return {"results": {}}


def _ticker(unit: dict[str, Any], what: str, step: str = "epoch", every: float = 20.0):
    """A callback, called with a step's number (an epoch, a cache chunk), printing a line at most every ``every``
    seconds (None without progress): no long stretch of a sweep is silent."""
    if not unit.get("progress"):
        return None
    last = [time.perf_counter()]

    def tick(epoch: int) -> None:
        if time.perf_counter() - last[0] >= every:
            last[0] = time.perf_counter()
            _say(f"    {unit['task']} {what}: {step} {epoch} done", flush=True)
    return tick


def _train_batches(model, unit: dict[str, Any], listing):
    from ..cache import batches_for

    batches, notes = batches_for(model, unit["cache"] if model.reads_taps else None, {"train": listing})
    if notes:
        _say("\n".join(notes))
    return batches["train"]


def _held_out(unit: dict[str, Any], data) -> "Any":
    """(folds, N) held-out masks over the pool: k stratified folds, or the validation samples as the one fold (-1).
    Outside the samples final runs train on (few-shot: the val list) a selection run never trains either."""
    from ..engine.many import fold_weights

    p = unit["protocol"]
    if p["selection"] == "kfold":
        return fold_weights(data.pool.labels, p["folds"], p["seed"])[1]
    return data.val.unsqueeze(0)


def _select_unit(unit: dict[str, Any]) -> dict[str, Any]:
    import torch

    from ..engine.config import TrainConfig
    from ..engine.loop import fit, predict
    from ..engine.many import accuracies, fit_many, predict_many
    from ..tuned import TunedModel

    backbone, data = _load(unit)
    held = _held_out(unit, data)
    items = unit["items"]
    cfgs = [TrainConfig(**i["train"]) for i in items]
    models = [TunedModel.build(backbone, i["method"], unit["num_classes"], i["options"], seed=c.seed)
              for i, c in zip(items, cfgs)]
    masks = torch.stack([held[max(i["fold"], 0)] for i in items])
    weights = (~masks & (data.final_train | data.val)).float()
    batches = _train_batches(models[0], unit, data.pool)
    t0 = time.perf_counter()
    tick = _ticker(unit, f"{items[0]['label']} selection x{len(items)}")
    if models[0].reads_taps:
        fit_many(models, batches, cfgs, sample_weights=weights, on_epoch=tick and (lambda e, _: tick(e)))
        logits, labels = predict_many(models, batches, cfgs[0])
    else:
        [model], [cfg] = models, cfgs
        fit(model, batches, cfg, sample_weight=weights[0], on_epoch=tick and (lambda r: tick(r["epoch"])),
            stop_on_nonfinite=False)  # as fit_many: a diverged candidate is scored, not a failed trial
        one, labels = predict(model, batches, cfg)
        logits = one.unsqueeze(0)
    seconds = (time.perf_counter() - t0) / len(models)
    accs = accuracies(logits, labels, masks)
    return {"results": {i["key"]: {"metric": a, "seconds": seconds, "trainable_parameters": m.num_trainable(),
                                   "metrics": {"held_out": int(k.sum())}}
                        for i, a, m, k in zip(items, accs, models, masks)}}


def _final_unit(unit: dict[str, Any]) -> dict[str, Any]:
    from ..data import ImageDataset
    from ..data.batches import ImageBatches
    from ..engine.checkpoint import save_adapter
    from ..engine.config import TrainConfig
    from ..engine.heads import predict_heads
    from ..engine.loop import fit
    from ..engine.many import fit_many
    from ..memory.step import COMPARED_BATCH, step_memory
    from ..tuned import TunedModel

    backbone, data = _load(unit)
    # Few-shot tasks: final runs train on the k shots only (weight 0 on the pool's val samples).
    weight = None if bool(data.final_train.all()) else data.final_train.float()
    by_method: dict[str, list[dict[str, Any]]] = {}
    for i in unit["items"]:
        by_method.setdefault(i["label"], []).append(i)
    results: dict[str, dict[str, Any]] = {}
    trained: list[tuple[dict[str, Any], TunedModel]] = []
    measure = []
    for items in by_method.values():
        method = items[0]["method"]
        cfgs = [TrainConfig(**i["train"]) for i in items]
        models = [TunedModel.build(backbone, method, unit["num_classes"], i["options"], seed=c.seed)
                  for i, c in zip(items, cfgs)]
        batches = _train_batches(models[0], unit, data.pool)
        t0 = time.perf_counter()
        tick = _ticker(unit, f"{items[0]['label']} final x{len(models)}")
        if models[0].reads_taps:
            fit_many(models, batches, cfgs, None if weight is None else weight.expand(len(models), -1),
                     on_epoch=tick and (lambda e, _: tick(e)))
        else:
            for m, c in zip(models, cfgs):
                fit(m, batches, c, sample_weight=weight, on_epoch=tick and (lambda r: tick(r["epoch"])))
        seconds = (time.perf_counter() - t0) / len(models)
        for i, m in zip(items, models):
            save_adapter(Path(unit["checkpoints"]) / i["key"], m, data.pool.classes,
                         {"backbone_weights": unit["backbone"]["weights"], "trial": i["key"]})
            results[i["key"]] = {"seconds": seconds, "trainable_parameters": m.num_trainable()}
            trained.append((i, m))
        measure.append((items, models[0], batches, cfgs[0].batch_size))
    # The test split, traced once: every final model of the task reads each traced batch.
    batch = max(TrainConfig(**i["train"]).batch_size for i in unit["items"])
    images = ImageBatches(ImageDataset(data.test, backbone.preprocessing.transform()))
    logits, labels = predict_heads(backbone, [m for _, m in trained], images,
                                   TrainConfig(batch_size=batch, progress=False))
    for (i, _), out in zip(trained, logits):
        results[i["key"]].update(metric=(out.argmax(-1) == labels).float().mean().item(),
                                 metrics={"test_images": len(labels), "test_evaluations": 1,
                                          "checkpoint": str(Path(unit["checkpoints"]) / i["key"])})
    # Memory last: measuring takes a training step, which changes the model it measures. Methods compare at one
    # batch size; the recipe's own batch is kept beside it.
    for items, model, batches, batch_size in measure:
        compared, own_batch = (min(b, len(batches)) for b in (COMPARED_BATCH, batch_size))  # a task may be smaller
        step = step_memory(model, batches, compared)
        own = step if own_batch == compared else step_memory(model, batches, own_batch)
        for i in items:
            results[i["key"]].update(memory_bytes=step.total, memory_kind=step.kind)
            results[i["key"]]["metrics"].update(memory_batch_size=compared, recipe_batch_size=own_batch,
                                                recipe_memory_bytes=own.total)
    return {"results": results, "test_read": True}
