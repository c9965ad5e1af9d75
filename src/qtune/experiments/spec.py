"""A sweep spec (TOML): backbone, tasks, methods with their grids, the selection protocol, seeds.

```toml
[backbone]                 # qtune.backbones.BackboneSpec fields: name, weights ("demo", a file or folder), ...
weights = "demo"

[tasks]
offline = ["dsprites_loc", "mnist"]   # qtune's offline tasks, generated under the sweep's folder
offline_test_size = 500               # their test images
vtab = ["data/vtab-1k/cifar"]         # VTAB-1k task folders (train800, val200, train800val200, test lists)
[[tasks.fgvc]]                        # few-shot FGVC (NOAH lists): one task per shots x split seed
annotations = "data/fgvc/oxford-pets/annotations"
shots = [1, 2, 4, 8, 16]
seeds = [0, 1, 2]

[train]                    # TrainConfig fields for every method
epochs = 15

[protocol]
selection = "kfold"        # "kfold" on train800val200, or "val" (train800 -> val200)
folds = 5
seed = 0                   # folds and the shared batch order
seeds = [0, 1, 2]          # final runs of the chosen config
cache_dtype = "fp16"       # or fp32, bf16, int8 (storage of the K/V caches)
gpus_per_unit = 1          # GPUs a unit training on "cuda" asks Ray for (0.25: four units share one)
halving = { eta = 3, rungs = [0.1, 0.3] }   # successive halving of each grid (optional; see Halving)

[methods.synqt]
preset = "synqt:vtab/{task}"          # optional; VTAB tasks only
options = { tokens = 4 }
train = { lr = 1e-3 }
grid = { lr = [3e-3, 1e-3], "options.attn_scale" = [0.1, 1.0] }

[methods."synqt@112"]                 # a row of its own: the table's key is its label, ``method`` what it runs
method = "synqt"
tasks = ["dsprites_loc"]              # only on these tasks (default: every task)
model_args = { img_size = 112 }       # over [backbone]'s: this row's backbone (trained live, no cache)
input_size = 112                      # preprocessing input size of this row's backbone
grid = [{}, { "options.tokens" = 4, lr = 3e-3 }]   # a list of points instead of a product of values

[overrides.dsprites_loc.synqt]        # per task and method: options, train, grid
options = { tokens = 8 }
```
Every value is checked when the spec is read; an error names the file and the field.
"""
from __future__ import annotations

import itertools
import json
import math
import re
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..backbones import BackboneSpec
from ..data.layouts import VTAB_TASKS
from ..data.offline import ALL_TASKS
from ..engine.config import TrainConfig
from ..errors import ConfigError
from ..precision import check_cache_dtype
from ..methods import get_method
from .tasks import TaskSource, fgvc_sources

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SELECTIONS = ("kfold", "val")
TOP_LEVEL = ("name", "backbone", "tasks", "train", "protocol", "methods", "overrides")


@dataclass(frozen=True)
class Halving:
    """Synchronous successive halving of a method's grid on a task. Every candidate (with all its folds) trains to
    the first rung, a point in its own schedule (the fraction ``rungs[0]`` of its epochs; the learning-rate schedule
    is the full run's), and is scored on its held-out samples; the best ``1/eta`` of them, rounded up, go on from
    where they stopped to the next rung, and so on to the full schedule. Once one candidate is left it is the
    choice: it is not trained further for selection."""

    eta: float = 3.0
    rungs: tuple[float, ...] = (0.1, 0.3)

    def epochs(self, total: int) -> list[int]:
        """The epochs at which a run of ``total`` epochs is scored: each rung's, then the end."""
        return [min(total, max(1, round(f * total))) for f in self.rungs] + [total]

    def keep(self, n: int) -> int:
        return max(1, math.ceil(n / self.eta)) if n else 0

    def to_dict(self) -> dict[str, Any]:
        return {"eta": self.eta, "rungs": list(self.rungs)}


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


Grid = dict[str, list[Any]] | list[dict[str, Any]]  # values whose product is the grid, or the grid's points


@dataclass
class MethodSpec:
    name: str  # the row's label (the [methods.NAME] key)
    options: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    grid: Grid = field(default_factory=dict)
    preset: str | None = None
    method: str = ""  # what it runs (default: its name)
    tasks: list[str] | None = None  # the tasks it runs on (default: all)
    model_args: dict[str, Any] = field(default_factory=dict)  # over the spec's backbone's
    input_size: int | None = None  # the backbone's preprocessing input size

    def __post_init__(self) -> None:
        self.method = self.method or self.name

    def backbone(self, base: BackboneSpec) -> BackboneSpec:
        """The spec's backbone as this method's rows load it."""
        if not self.model_args and self.input_size is None:
            return base
        prep = {**base.preprocessing, **({"input_size": self.input_size} if self.input_size is not None else {})}
        return replace(base, model_args={**base.model_args, **self.model_args}, preprocessing=prep)


@dataclass
class SweepSpec:
    path: Path
    name: str
    backbone: BackboneSpec
    tasks: dict[str, TaskSource | None]  # name -> where its data is; None: an offline task, generated by the sweep
    train: dict[str, Any]
    selection: str
    folds: int
    seed: int
    seeds: list[int]
    cache_dtype: str
    methods: list[MethodSpec]
    overrides: dict[str, dict[str, dict[str, Any]]]
    offline_test_size: int = 500
    gpus_per_unit: float = 1.0  # GPUs a unit training on "cuda" asks Ray for (placement: not part of any key)
    halving: Halving | None = None

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
        out = []
        for i, point in enumerate(grid_points(over.get("grid", method.grid))):
            out.append(Candidate(i, {**options, **{k[8:]: v for k, v in point.items() if k.startswith("options.")}},
                                 {**train, **{k: v for k, v in point.items() if not k.startswith("options.")}}))
        return out

    def methods_on(self, task: str) -> list[MethodSpec]:
        return [m for m in self.methods if m.tasks is None or task in m.tasks]


def grid_points(grid: Grid) -> list[dict[str, Any]]:
    """A grid's points: the listed ones, or the product of the values of each key."""
    if isinstance(grid, list):
        return [dict(p) for p in grid]
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def _table(d: Any, where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a table, got {type(d).__name__}")
    return d


def _check_keys(d: dict[str, Any], known: Any, where: str) -> None:
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(known)})")


def _grid(grid: Any, where: str) -> Grid:
    """A table of non-empty lists (their product), or a non-empty list of tables (the points)."""
    if isinstance(grid, list):
        if not grid:
            raise ConfigError(f"{where}: a list of points must not be empty")
        return [_table(p, f"{where}.{i}") for i, p in enumerate(grid)]
    for k, v in _table(grid, where).items():
        if not isinstance(v, list) or not v:
            raise ConfigError(f"{where}.{k}: must be a non-empty list (got {v!r})")
    return grid


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
    try:
        backbone = BackboneSpec(**bb)
    except ConfigError as e:
        raise ConfigError(f"{where('backbone')}: {e}") from None

    tasks_raw = _table(raw.get("tasks", {}), where("tasks"))
    _check_keys(tasks_raw, ("offline", "offline_test_size", "vtab", "fgvc"), where("tasks"))
    test_size = tasks_raw.get("offline_test_size", 500)
    if not isinstance(test_size, int) or isinstance(test_size, bool) or test_size < 1:
        raise ConfigError(f"{where('tasks', 'offline_test_size')}: a whole number >= 1 (got {test_size!r})")
    tasks: dict[str, TaskSource | None] = {}
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
        tasks[p.name] = TaskSource(p.name, "vtab", str(p))
    for n, entry in enumerate(tasks_raw.get("fgvc", [])):
        for source in fgvc_sources(_table(entry, where("tasks", "fgvc", str(n))), path.parent,
                                   where("tasks", "fgvc", str(n))):
            if source.name in tasks:
                raise ConfigError(f"{where('tasks')}: task {source.name!r} listed twice")
            tasks[source.name] = source
    if not tasks:
        raise ConfigError(f"{where('tasks')}: no task (give tasks.offline and/or tasks.vtab)")

    train = _table(raw.get("train", {}), where("train"))
    _check_train(train, where("train"))

    proto = _table(raw.get("protocol", {}), where("protocol"))
    _check_keys(proto, ("selection", "folds", "seed", "seeds", "cache_dtype", "gpus_per_unit", "halving"),
                where("protocol"))
    selection = proto.get("selection", "kfold")
    if selection not in SELECTIONS:
        raise ConfigError(f"{where('protocol', 'selection')}: {selection!r} (choose from {', '.join(SELECTIONS)})")
    if selection == "kfold" and any(t is not None and t.kind == "fgvc" for t in tasks.values()):
        raise ConfigError(f"{where('protocol', 'selection')}: few-shot tasks select on their val list; "
                          "use selection = \"val\"")
    folds = proto.get("folds", 5)
    if not isinstance(folds, int) or folds < 2:
        raise ConfigError(f"{where('protocol', 'folds')}: must be a whole number >= 2 (got {folds!r})")
    seeds = proto.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"{where('protocol', 'seeds')}: must be a non-empty list of integers (got {seeds!r})")
    cache_dtype = check_cache_dtype(proto.get("cache_dtype", "fp16"), where("protocol", "cache_dtype"))
    gpus = proto.get("gpus_per_unit", 1)
    if isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or not 0 < gpus < float("inf") \
            or (gpus > 1 and gpus != int(gpus)):
        raise ConfigError(f"{where('protocol', 'gpus_per_unit')}: must be a number > 0, a fraction up to 1 or "
                          f"a whole number (got {gpus!r})")

    halving = _halving(proto["halving"], where("protocol", "halving")) if "halving" in proto else None

    methods = []
    for name, m in _table(raw.get("methods", {}), where("methods")).items():
        m = _table(m, where("methods", name))
        _check_keys(m, ("method", "options", "train", "grid", "preset", "tasks", "model_args", "input_size"),
                    where("methods", name))
        method = m.get("method", name)
        try:
            get_method(method)
        except ConfigError as e:
            raise ConfigError(f"{where('methods', name)}: {e}") from None
        on = m.get("tasks")
        if on is not None and (not isinstance(on, list) or not on or any(t not in tasks for t in on)):
            raise ConfigError(f"{where('methods', name, 'tasks')}: a non-empty list of the spec's tasks "
                              f"({', '.join(tasks)}); got {on!r}")
        size = m.get("input_size")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
            raise ConfigError(f"{where('methods', name, 'input_size')}: a whole number >= 1 (got {size!r})")
        methods.append(MethodSpec(name, _table(m.get("options", {}), where("methods", name, "options")),
                                  _table(m.get("train", {}), where("methods", name, "train")),
                                  _grid(m.get("grid", {}), where("methods", name, "grid")), m.get("preset"), method,
                                  on, _table(m.get("model_args", {}), where("methods", name, "model_args")), size))
    if not methods:
        raise ConfigError(f"{where('methods')}: no method (add a [methods.NAME] table)")
    overrides = _table(raw.get("overrides", {}), where("overrides"))
    for task, per in overrides.items():
        if task not in tasks:
            raise ConfigError(f"{where('overrides', task)}: not one of the spec's tasks ({', '.join(tasks)})")
        for mname, o in _table(per, where("overrides", task)).items():
            _check_keys(_table(o, where("overrides", task, mname)), ("options", "train", "grid"),
                        where("overrides", task, mname))
            if "grid" in o:
                _grid(o["grid"], where("overrides", task, mname, "grid"))
    spec = SweepSpec(path, str(raw.get("name", path.stem)), backbone, tasks, train, selection, folds,
                     int(proto.get("seed", 0)), seeds, cache_dtype, methods, overrides, test_size, float(gpus),
                     halving)
    devices: dict[str, str] = {}
    for task in tasks:  # every candidate's options and schedule are valid before anything runs
        for m in spec.methods_on(task):
            for c in spec.candidates(task, m):
                label = where("methods", m.name) + f" (task {task}, grid point {c.index})"
                _check_train(c.train, label)
                devices.setdefault(c.config().device, label)
                try:
                    get_method(m.method).config_class.from_dict(c.options)
                except ConfigError as e:
                    raise ConfigError(f"{label}: {e}") from None
    for device, label in devices.items():  # each device asked for is probed once: there, or an error now
        try:
            TrainConfig(device=device).resolved_device()
        except ConfigError as e:
            raise ConfigError(f"{label}: {e}") from None
    return spec


def _halving(raw: Any, at: str) -> Halving:
    table = _table(raw, at)
    _check_keys(table, ("eta", "rungs"), at)
    eta = table.get("eta", Halving.eta)
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 1 < eta < float("inf"):
        raise ConfigError(f"{at}.eta: a number > 1 (got {eta!r})")
    rungs = table.get("rungs", list(Halving.rungs))
    if (not isinstance(rungs, list) or not rungs or any(isinstance(f, bool) or not isinstance(f, (int, float))
                                                         or not 0 < f < 1 for f in rungs)
            or sorted(set(rungs)) != rungs):
        raise ConfigError(f"{at}.rungs: increasing fractions of the schedule between 0 and 1, such as [0.2, 0.4] "
                          f"(got {rungs!r})")
    return Halving(float(eta), tuple(float(f) for f in rungs))


def canonical(obj: Any) -> str:
    """The one JSON form that identities are hashed from."""
    return json.dumps(obj, sort_keys=True, default=str)


def toml_value(value: Any) -> str:
    """``value`` written as TOML (inline tables and arrays): how specs are written from code."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def toml_key(key: str) -> str:
    """A key as TOML reads it back: bare where it can be, quoted otherwise (``"options.tokens"`` is one key)."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else toml_value(key)
