"""The sweep's planner: everything the driver decides from a spec before any work runs, and as results come in. Task
folders and their identities, trial keys, which selection trials share a stack, the units workers run, and the
choice of each method's candidate from its held-out scores."""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from statistics import mean
from typing import Any

from ..backbones.points import Point
from ..cache.manifest import backbone_key, digest
from ..data.offline import make_offline_benchmark
from ..engine.config import TrainConfig
from ..errors import ConfigError
from ..methods import get_method
from .spec import Candidate, Halving, SweepSpec, canonical
from .store import Trial
from .tasks import TaskSource
from .units import Item, Unit


def task_identity(source: TaskSource) -> str:
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
        self.task_ids = {t: task_identity(s) for t, s in self.sources.items()}
        self.candidates = {(t, m.name): spec.candidates(t, m) for t in spec.tasks for m in spec.methods_on(t)}
        # Side-path rows whose every candidate traces live while training (Method.live_only) read no cache.
        self.live_rows = {m.name for m in spec.methods if get_method(m.method).reads_taps and all(
            get_method(m.method).live_only(c.options) for (_, n), cs in self.candidates.items() if n == m.name
            for c in cs)}
        self.reads = {t: self._reads(backbone, t) for t in spec.tasks}
        self.hash = digest(canonical({"backbone": self.backbone_key, "tasks": self.task_ids,
                                      "candidates": {f"{t}/{m}": [asdict(c) for c in cs]
                                                     for (t, m), cs in self.candidates.items()},
                                      "protocol": self.protocol, **self._variants()}).encode())[:16]

    def own_backbone(self, name: str) -> bool:
        m = self.methods[name]
        return m.backbone(self.spec.backbone) is not self.spec.backbone

    def reads_cache(self, name: str) -> bool:
        """Whether the method's trials read the task's cache: side-path methods on the spec's backbone, unless all
        their candidates trace live."""
        return (get_method(self.methods[name].method).reads_taps and not self.own_backbone(name)
                and name not in self.live_rows)

    def _variants(self) -> dict[str, Any]:
        """What labelled rows and their backbones add to an identity (nothing for a spec without them)."""
        out = {name: {"method": m.method, "backbone": self.backbone_keys[name]} for name, m in self.methods.items()
               if m.method != name or self.own_backbone(name)}
        return {"variants": out} if out else {}

    @property
    def protocol(self) -> dict[str, Any]:
        s = self.spec
        out = {"selection": s.selection, "folds": s.folds if s.selection == "kfold" else 1, "seed": s.seed,
               "cache_dtype": s.cache_dtype}
        # Runs that train on one subset of the pool read only its samples (units.trained_samples); under
        # selection on val that is every run (k-fold's candidates read the whole pool, as they did before).
        if s.selection == "val":
            out["batches"] = "trained samples"
        if s.halving is not None:  # a trial stopped at a rung is not the trial that runs to the end
            out["halving"] = s.halving.to_dict()
        return out

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

    @property
    def states(self) -> Path:
        """Successive halving: the training state of each selection trial between its rungs."""
        return self.out / "rungs"

    def unit(self, kind: str, task: str, trials: list[Trial], threads: int, progress: bool = False,
             rung: int | None = None) -> Unit:
        """A unit of work on one backbone: the spec's (a cache; the methods that read it) or a method's own. A
        selection unit of successive halving trains its trials to rung ``rung``."""
        own = next((t.method for t in trials if self.own_backbone(t.method)), None)
        backbone = self.spec.backbone if own is None else self.methods[own].backbone(self.spec.backbone)
        halving = self.spec.halving
        items = tuple(item(t, None if rung is None else halving.epochs(t.config["train"]["epochs"])[rung])
                      for t in trials)
        return Unit(kind, task, self.sources[task], self.num_classes[task], backbone,
                    str(self.cache_dir(task)) if own is None else None, str(self.checkpoints(task)),
                    self.spec.cache_dtype, self.protocol, items, *self.reads[task],
                    threads=threads, progress=progress, states=None if rung is None else str(self.states))


def item(t: Trial, until: int | None = None) -> Item:
    """A stored trial as a worker runs it; its training config parsed here, once."""
    return Item(t.key, t.method, t.config["method"], t.config["options"], TrainConfig(**t.config["train"]), t.fold,
                until)


def groups(trials: list[Trial]) -> dict[tuple, list[Trial]]:
    """Selection trials that can share a stack: side-path trials of one task, method, structure and shared
    schedule (``engine.many.SHARED``) where the method gains from stacking on their device (``Method.stacks_on``)
    and the trial does not trace live (``Method.live_only``); every other trial alone, so the workers spread them."""
    from ..engine.many import SHARED

    groups: dict[tuple, list[Trial]] = {}
    for t in trials:
        method = get_method(t.config["method"])
        device = TrainConfig(**t.config["train"]).resolved_device().type
        if method.reads_taps and device in method.stacks_on and not method.live_only(t.config["options"]):
            structure = canonical(method.config_class.from_dict(t.config["options"]).structure())
            shared = canonical({k: t.config["train"].get(k) for k in SHARED})
            groups.setdefault((t.task, t.method, structure, shared), []).append(t)
        else:
            groups[(t.task, t.method, t.key)] = [t]
    return groups


def stack_sizes(plan: Plan, groups: dict[tuple, list[Trial]], budget: int, most: int) -> dict[tuple, int]:
    """Per side-path group, the most models whose stacked training step fits ``budget`` bytes, measured on the
    task's cache (``engine.many.models_per_stack``)."""
    from ..cache import cached_splits
    from ..engine.many import models_per_stack
    from ..tuned import TunedModel

    backbone = plan.spec.backbone.load()
    sizes = {}
    for key, trials in groups.items():
        t = trials[0]
        if not plan.reads_cache(t.method) or get_method(t.config["method"]).live_only(t.config["options"]):
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


def stacks(groups: dict[tuple, list[Trial]], sizes: dict[tuple, int], most: int) -> list[list[Trial]]:
    """Groups cut into stacks of their size (default ``most``); deterministic, so a rerun cuts the same stacks."""
    return [g[i:i + sizes.get(k, most)] for k, g in groups.items() for i in range(0, len(g), sizes.get(k, most))]


def rank(scores: dict[int, float]) -> list[int]:
    """Candidate indices, best mean held-out accuracy first (ties: the earlier in the grid)."""
    return sorted(scores, key=lambda c: (-scores[c], c))


def held_out_scores(trials: list[Trial], candidates: Any, rung: int | None = None) -> dict[int, float]:
    """Each candidate's mean held-out accuracy over its folds: at the end of its run, or at ``rung``."""
    def score(t: Trial) -> float:
        return t.metric if rung is None else t.rungs[rung]["metric"]
    return {c: mean(score(t) for t in trials if t.candidate == c) for c in candidates}


def halving_survivors(trials: list[Trial], halving: Halving) -> tuple[list[set[int]], bool]:
    """Successive halving replayed from the stored rung scores of one method's selection trials on one task: the
    candidates alive at each rung reached so far, and whether the choice is made (one left, or every survivor
    scored at the end of its schedule). Deterministic: a resumed sweep takes the decisions it took before."""
    alive = [set(t.candidate for t in trials)]
    for rung in range(len(halving.rungs) + 1):
        if len(alive[-1]) == 1:
            return alive, True
        at = [t for t in trials if t.candidate in alive[-1]]
        if any(len(t.rungs) <= rung for t in at):
            return alive, False  # this rung is still to be trained (or failed)
        if rung == len(halving.rungs):
            return alive, True
        ranked = rank(held_out_scores(at, alive[-1], rung))
        alive.append(set(ranked[:halving.keep(len(ranked))]))
    return alive, True  # pragma: no cover - the loop returns at the last rung


def choose(trials: list[Trial], candidates: list[Candidate]) -> tuple[Candidate, float] | None:
    """The candidate with the best mean held-out accuracy over its folds (ties: the earlier in the grid); None
    unless every selection trial of the method on the task is done. Under successive halving a candidate that
    reached a later rung beats every candidate stopped before it (its score is from a longer run)."""
    if len(candidates) == 1:
        return candidates[0], float("nan")
    if not trials or any(t.state != "done" for t in trials):
        return None
    reached = {c.index: max((len(t.rungs) for t in trials if t.candidate == c.index), default=0)
               for c in candidates}
    scores = held_out_scores(trials, [c.index for c in candidates])
    best = max(candidates, key=lambda c: (reached[c.index], scores[c.index], -c.index))
    return best, scores[best.index]

__all__ = ["Plan", "choose", "groups", "halving_survivors", "held_out_scores", "item", "rank",
           "stack_sizes", "stacks", "task_identity"]
