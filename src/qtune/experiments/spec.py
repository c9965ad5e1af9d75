"""A sweep spec (TOML): backbone, tasks, methods with their grids, the selection protocol, seeds.

```toml
[backbone]                 # qtune.engine.job.BackboneSpec fields: name, weights ("demo", a file or folder), ...
weights = "demo"

[tasks]
offline = ["dsprites_loc", "mnist"]   # qtune's offline tasks, generated under the sweep's folder
vtab = ["data/vtab-1k/cifar"]         # VTAB-1k task folders (train800, val200, train800val200, test lists)

[train]                    # TrainConfig fields for every method
epochs = 15

[protocol]
selection = "kfold"        # "kfold" on train800val200, or "val" (train800 -> val200)
folds = 5
seed = 0                   # folds and the shared batch order
seeds = [0, 1, 2]          # final runs of the chosen config
cache_dtype = "fp16"

[methods.synqt]
preset = "synqt:vtab/{task}"          # optional; VTAB tasks only
options = { tokens = 4 }
train = { lr = 1e-3 }
grid = { lr = [3e-3, 1e-3], "options.attn_scale" = [0.1, 1.0] }

[overrides.dsprites_loc.synqt]        # per task and method
options = { tokens = 8 }
```
Every value is checked when the spec is read; an error names the file and the field.
"""
from __future__ import annotations

import itertools
import json
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..data.benchmarks import VTAB_TASKS, vtab_task
from ..data.offline import ALL_TASKS
from ..engine.config import TrainConfig
from ..engine.job import BackboneSpec
from ..errors import ConfigError
from ..methods import get_method

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SELECTIONS = ("kfold", "val")
TOP_LEVEL = ("name", "backbone", "tasks", "train", "protocol", "methods", "overrides")


@dataclass(frozen=True)
class Candidate:
    """One point of a method's grid on one task: its options and full training config."""

    index: int
    options: dict[str, Any]
    train: dict[str, Any]

    def config(self, **changes: Any) -> TrainConfig:
        return TrainConfig(**{**self.train, **changes})

    def label(self, varied: list[str]) -> dict[str, Any]:
        """The values this candidate sets among the grid's varied keys."""
        merged = {**self.train, **{f"options.{k}": v for k, v in self.options.items()}}
        return {k: merged.get(k) for k in varied}


@dataclass
class MethodSpec:
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    preset: str | None = None


@dataclass
class SweepSpec:
    path: Path
    name: str
    backbone: BackboneSpec
    tasks: dict[str, Path | None]  # name -> VTAB folder, or None for an offline task
    train: dict[str, Any]
    selection: str
    folds: int
    seed: int
    seeds: list[int]
    cache_dtype: str
    methods: list[MethodSpec]
    overrides: dict[str, dict[str, dict[str, Any]]]

    def group(self, task: str) -> str:
        known = ALL_TASKS.get(task) or vtab_task(task)
        return known.group if known else "other"

    def candidates(self, task: str, method: MethodSpec) -> list[Candidate]:
        """The method's grid on ``task``: preset < spec [train] < method < override < grid point."""
        base_train, base_options = dict(self.train), {}
        if method.preset and task in VTAB_TASKS:
            from ..methods.presets import get_preset

            preset = get_preset(method.preset.format(task=task))
            base_train, base_options = {**base_train, **preset.train}, dict(preset.options)
        over = self.overrides.get(task, {}).get(method.name, {})
        train = {**base_train, **method.train, **over.get("train", {}), "progress": False}
        options = {**base_options, **method.options, **over.get("options", {})}
        keys = list(method.grid)
        out = []
        for i, values in enumerate(itertools.product(*(method.grid[k] for k in keys))):
            point = dict(zip(keys, values))
            out.append(Candidate(i, {**options, **{k[8:]: v for k, v in point.items() if k.startswith("options.")}},
                                 {**train, **{k: v for k, v in point.items() if not k.startswith("options.")}}))
        return out


def _table(d: Any, where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a table, got {type(d).__name__}")
    return d


def _check_keys(d: dict[str, Any], known: Any, where: str) -> None:
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(known)})")


def _check_train(d: dict[str, Any], where: str) -> None:
    _check_keys(d, [f.name for f in fields(TrainConfig)], where)
    try:
        TrainConfig(**{k: v for k, v in d.items()})
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from None


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check a sweep spec; ConfigError names the file and the field for anything wrong."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: sweep spec not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    _check_keys(raw, TOP_LEVEL, str(path))
    where = lambda *keys: f"{path}: {'.'.join(keys)}"  # noqa: E731
    bb = _table(raw.get("backbone", {}), where("backbone"))
    _check_keys(bb, [f.name for f in fields(BackboneSpec)], where("backbone"))
    backbone = BackboneSpec(**bb)

    tasks_raw = _table(raw.get("tasks", {}), where("tasks"))
    _check_keys(tasks_raw, ("offline", "vtab"), where("tasks"))
    tasks: dict[str, Path | None] = {}
    for name in tasks_raw.get("offline", []):
        if name not in ALL_TASKS:
            raise ConfigError(f"{where('tasks', 'offline')}: unknown offline task {name!r} "
                              f"(available: {', '.join(ALL_TASKS)})")
        tasks[name] = None
    for folder in tasks_raw.get("vtab", []):
        p = (path.parent / folder).resolve()
        if not p.is_dir():
            raise ConfigError(f"{where('tasks', 'vtab')}: {p} is not a folder")
        if p.name in tasks:
            raise ConfigError(f"{where('tasks')}: task {p.name!r} listed twice")
        tasks[p.name] = p
    if not tasks:
        raise ConfigError(f"{where('tasks')}: no task (give tasks.offline and/or tasks.vtab)")

    train = _table(raw.get("train", {}), where("train"))
    _check_train(train, where("train"))

    proto = _table(raw.get("protocol", {}), where("protocol"))
    _check_keys(proto, ("selection", "folds", "seed", "seeds", "cache_dtype"), where("protocol"))
    selection = proto.get("selection", "kfold")
    if selection not in SELECTIONS:
        raise ConfigError(f"{where('protocol', 'selection')}: {selection!r} (choose from {', '.join(SELECTIONS)})")
    folds = proto.get("folds", 5)
    if not isinstance(folds, int) or folds < 2:
        raise ConfigError(f"{where('protocol', 'folds')}: must be a whole number >= 2 (got {folds!r})")
    seeds = proto.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"{where('protocol', 'seeds')}: must be a non-empty list of integers (got {seeds!r})")
    cache_dtype = proto.get("cache_dtype", "fp16")
    if cache_dtype not in ("fp16", "bf16", "fp32"):
        raise ConfigError(f"{where('protocol', 'cache_dtype')}: {cache_dtype!r} (choose fp16, bf16 or fp32)")

    methods = []
    for name, m in _table(raw.get("methods", {}), where("methods")).items():
        m = _table(m, where("methods", name))
        _check_keys(m, ("options", "train", "grid", "preset"), where("methods", name))
        try:
            get_method(name)
        except ConfigError as e:
            raise ConfigError(f"{where('methods', name)}: {e}") from None
        grid = _table(m.get("grid", {}), where("methods", name, "grid"))
        for k, v in grid.items():
            if not isinstance(v, list) or not v:
                raise ConfigError(f"{where('methods', name, 'grid', k)}: must be a non-empty list (got {v!r})")
        methods.append(MethodSpec(name, _table(m.get("options", {}), where("methods", name, "options")),
                                  _table(m.get("train", {}), where("methods", name, "train")), grid, m.get("preset")))
    if not methods:
        raise ConfigError(f"{where('methods')}: no method (add a [methods.NAME] table)")
    overrides = _table(raw.get("overrides", {}), where("overrides"))
    for task, per in overrides.items():
        if task not in tasks:
            raise ConfigError(f"{where('overrides', task)}: not one of the spec's tasks ({', '.join(tasks)})")
        for mname, o in _table(per, where("overrides", task)).items():
            _check_keys(_table(o, where("overrides", task, mname)), ("options", "train"),
                        where("overrides", task, mname))
    spec = SweepSpec(path, str(raw.get("name", path.stem)), backbone, tasks, train, selection, folds,
                     int(proto.get("seed", 0)), seeds, cache_dtype, methods, overrides)
    for task in tasks:  # every candidate's options and schedule are valid before anything runs
        for m in methods:
            for c in spec.candidates(task, m):
                label = where("methods", m.name) + f" (task {task}, grid point {c.index})"
                _check_train(c.train, label)
                try:
                    get_method(m.name).config_class.from_dict(c.options)
                except ConfigError as e:
                    raise ConfigError(f"{label}: {e}") from None
    return spec


def canonical(obj: Any) -> str:
    """The one JSON form that identities are hashed from."""
    return json.dumps(obj, sort_keys=True, default=str)
