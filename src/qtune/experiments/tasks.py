"""The tasks a sweep runs, as one shape: a pool of training images (what the cache holds), the pool's validation
samples, the samples final runs train on, and the test split. A run reads the pool's samples it trains on; k-fold
candidates read the whole pool, each weighting its own held-out fold by 0 (``units.trained_samples``).

- VTAB-1k: the pool is train800val200; val200 is the validation fold; final runs train on the whole pool.
- Few-shot FGVC (NOAH lists): the pool is the k-shot train list plus val; final runs train on the k shots only, so
  the few-shot budget holds; selection is on val (k-fold would need k samples of every class per fold).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import Listing
from ..data.layouts import FGVC_TASKS, read_fgvc, read_vtab, vtab_task
from ..data.offline import ALL_TASKS
from ..errors import DataError

KINDS = ("vtab", "fgvc")


@dataclass(frozen=True)
class TaskSource:
    name: str  # unique in a sweep: the VTAB folder's name, or DATASET-Kshot-seedS
    kind: str  # "vtab" or "fgvc"
    path: str  # the VTAB task folder, or the FGVC annotations folder
    images: str | None = None  # FGVC image root (default: the folder above the annotations)
    shots: int | None = None
    split_seed: int | None = None
    dataset: str | None = None  # FGVC: the dataset's name, shared by its shots and seeds

    @property
    def group(self) -> str:
        if self.kind == "fgvc":
            return "fgvc"
        known = ALL_TASKS.get(self.name) or vtab_task(self.name)
        return known.group if known else "other"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def read(self) -> "TaskData":
        if self.kind == "vtab":
            known = ALL_TASKS.get(self.name)
            splits = read_vtab(self.path, known.num_classes if known else None)
            pool = splits["train800val200"]
            val = set(splits["val200"].sample_ids)
            return TaskData(pool, torch.tensor([s in val for s in pool.sample_ids]),
                            torch.ones(len(pool.samples), dtype=torch.bool), splits["test"])
        splits = read_fgvc(self.path, self.images, self.shots, self.split_seed)
        train, val = splits["train"], splits["val"]
        overlap = set(train.sample_ids) & set(val.sample_ids)
        if overlap:
            raise DataError(f"{self.path}: {len(overlap)} image(s) in both the train and the val list "
                            f"(e.g. {sorted(overlap)[0]})")
        pool = Listing(train.root, train.samples + val.samples, train.classes, train.source)
        is_val = torch.arange(len(pool.samples)) >= len(train.samples)
        return TaskData(pool, is_val, ~is_val, splits["test"])


@dataclass
class TaskData:
    pool: Listing
    val: torch.Tensor  # (N,) bool: the pool's validation samples
    final_train: torch.Tensor  # (N,) bool: what final runs train on
    test: Listing

    @property
    def num_classes(self) -> int:
        return len(self.pool.classes)


def fgvc_sources(entry: dict[str, Any], base: Path, where: str) -> list[TaskSource]:
    """The tasks of one ``[[tasks.fgvc]]`` entry: one per (shots, split seed)."""
    from ..data.layouts import FGVC_SEEDS, FGVC_SHOTS
    from ..errors import ConfigError

    unknown = sorted(set(entry) - {"annotations", "images", "name", "shots", "seeds"})
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)} (known: annotations, images, name, "
                          "shots, seeds)")
    if "annotations" not in entry:
        raise ConfigError(f"{where}: needs annotations (the dataset's annotations folder)")
    ann = (base / entry["annotations"]).resolve()
    if not ann.is_dir():
        raise ConfigError(f"{where}.annotations: {ann} is not a folder")
    images = str((base / entry["images"]).resolve()) if entry.get("images") else None
    known = next((t.name for t in FGVC_TASKS.values() if ann.parent.name.lower() in (t.name, *t.aliases)), None)
    dataset = str(entry.get("name") or known or ann.parent.name)
    shots, seeds = entry.get("shots", list(FGVC_SHOTS)), entry.get("seeds", list(FGVC_SEEDS))
    for field, values, allowed in (("shots", shots, FGVC_SHOTS), ("seeds", seeds, FGVC_SEEDS)):
        if not isinstance(values, list) or not values or any(v not in allowed for v in values):
            raise ConfigError(f"{where}.{field}: a list of values in {list(allowed)} (got {values!r})")
    return [TaskSource(f"{dataset}-{k}shot-seed{s}", "fgvc", str(ann), images, k, s, dataset)
            for k in shots for s in seeds]
