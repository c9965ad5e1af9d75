"""Cut lists from a dataset's splits by a plan, and write them in the layout qtune reads.

The folder gets ``images/<key>`` (an original file linked or copied as is; an array rendered to PNG), one
``NAME.txt`` per list (``images/<key> label`` lines) and ``manifest.json`` (source, rule, seed, sizes and each
list's sha256). Every file is written to a temporary name and renamed, the lists and the manifest last, so an
interrupted run leaves no list that points at a missing image and resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ... import __version__
from ...errors import DataError
from ...io import atomic_write, file_sha256, write_json, write_text
from .raw import Item, Pool, Reader


@dataclass(frozen=True)
class Slice:
    """``split[start:stop]`` of a dataset's split; bounds are image counts, ``P%`` of the split's size, or ``P%+N``
    (VTAB writes ``train[{train_count}:{train_count}+200]`` with train_count = P * size // 100)."""

    split: str
    start: str = ""
    stop: str = ""

    @classmethod
    def parse(cls, text: str) -> "Slice":
        split, _, rest = text.partition("[")
        start, _, stop = rest.rstrip("]").partition(":")
        return cls(split, start, stop)

    def __str__(self) -> str:
        return f"{self.split}[{self.start}:{self.stop}]" if self.start or self.stop else self.split

    @staticmethod
    def _bound(text: str, size: int, default: int) -> int:
        if not text:
            return default
        pct, sign, extra = text.partition("%")
        return int(pct) * size // 100 + int(extra or 0) if sign else int(text)

    def take(self, items: list[Item]) -> list[Item]:
        n = len(items)
        start, stop = self._bound(self.start, n, 0), self._bound(self.stop, n, n)
        if stop > n:
            raise DataError(f"slice {self} needs {stop} images, the split has {n}")
        return items[start:stop]


@dataclass(frozen=True)
class Plan:
    name: str
    dataset: str
    read: Reader
    lists: dict[str, tuple[Slice, ...]]  # list name -> the slices it concatenates
    num_classes: int
    split_first: dict[str, tuple[int, ...]] | None = None
    note: str = ""

    def describe(self) -> dict[str, str]:
        return {name: " + ".join(map(str, slices)) for name, slices in self.lists.items()}


def generator(seed: int, split: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(split.encode())])


def order(pool: Pool, seed: int) -> Pool:
    """Each split sorted by key, then permuted with a generator of (seed, split name): deterministic anywhere."""
    out = {}
    for split, items in pool.items():
        items = sorted(items, key=lambda it: it.key)
        out[split] = [items[i] for i in generator(seed, split).permutation(len(items))]
    return out


def split_first(pool: Pool, how: dict[str, tuple[int, ...]]) -> Pool:
    """Make train / validation / test from a dataset released as one set of images (already in seeded order)."""
    (items,) = pool.values()
    kind, sizes = next(iter(how.items()))
    if kind == "per_class":  # the first k of each class (in the seeded order) train, the rest test
        seen: Counter = Counter()
        train, test = [], []
        for it in items:
            (train if seen[it.label] < sizes[0] else test).append(it)
            seen[it.label] += 1
        return {"train": train, "test": test}
    n = len(items)
    if kind == "percent":
        counts = [p * n // 100 for p in sizes[:-1]]
        counts.append(n - sum(counts))
    else:
        counts = list(sizes)
        if sum(counts) != n:
            raise DataError(f"the dataset has {n} images; the split expects {sum(counts)} ({counts})")
    edges = np.cumsum([0, *counts])
    return {name: items[a:b] for name, a, b in zip(("train", "validation", "test"), edges[:-1], edges[1:])}


def place(item: Item, dest: Path) -> None:
    """The image at ``dest``: an original file hard-linked (or copied) as is, an array rendered and encoded."""
    if not isinstance(item.image, Path):
        atomic_write(dest, lambda tmp: item.image().save(tmp, format="PNG" if dest.suffix == ".png" else "JPEG",
                                                         quality=72))
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(item.image, tmp)
    except OSError:  # another filesystem, or links not allowed
        shutil.copyfile(item.image, tmp)
    os.replace(tmp, dest)


def _manifest_request(plan: Plan, root: Path, seed: int) -> dict:
    return {"task": plan.name, "dataset": plan.dataset, "root": str(root.resolve()), "seed": seed,
            "rule": plan.describe(), "split_first": plan.split_first, "note": plan.note}


def write_plan(plan: Plan, out: Path, root: Path, download: bool, seed: int, overwrite: bool, say=print) -> Path:
    manifest_path = out / "manifest.json"
    request = _manifest_request(plan, root, seed)
    if manifest_path.is_file() and not overwrite:
        import json

        done = json.loads(manifest_path.read_text())
        if {k: done.get(k) for k in request} == request:
            say(f"{plan.name}: already prepared in {out} (manifest.json matches)")
            return out
        raise DataError(f"{out}: holds {done.get('task')} prepared otherwise (seed {done.get('seed')}, root "
                        f"{done.get('root')}); pass --overwrite to replace it")
    ours = {"images", *(f"{name}.txt" for name in plan.lists)}  # what an interrupted run of this plan leaves
    if out.exists() and not manifest_path.is_file() and not overwrite and any(
            p.name not in ours and not p.name.endswith(".tmp") for p in out.iterdir()):
        raise DataError(f"{out}: not empty and not a folder this command wrote; pass --overwrite to replace it")
    if overwrite and out.exists():
        shutil.rmtree(out)
    if not root.is_dir() and not download:
        raise DataError(f"{root}: raw data folder not found (--root)")
    say(f"{plan.name}: reading {plan.dataset} under {root}")
    pool = order(plan.read(root, download), seed)
    if plan.split_first:
        pool = split_first(pool, plan.split_first)
    lists: dict[str, list[Item]] = {}
    for name, slices in plan.lists.items():
        for s in slices:
            if s.split not in pool:
                raise DataError(f"{plan.name}: the dataset has no split {s.split!r} (has {', '.join(pool)})")
        lists[name] = [it for s in slices for it in s.take(pool[s.split])]
    bad = [f"{it.key} ({it.label})" for items in lists.values() for it in items
           if not 0 <= it.label < plan.num_classes]
    if bad:
        raise DataError(f"{plan.name}: {len(bad)} label(s) outside 0..{plan.num_classes - 1}: {', '.join(bad[:3])}")
    unique = {it.key: it for items in lists.values() for it in items}
    _write_images(plan.name, out, list(unique.values()), say)
    digests = {}
    for name, items in lists.items():
        path = out / f"{name}.txt"
        write_text(path, "".join(f"images/{it.key} {it.label}\n" for it in items))
        digests[name] = file_sha256(path)
    write_json(manifest_path, {
        **request, "qtune": __version__, "num_classes": plan.num_classes,
        "sizes": {name: len(items) for name, items in lists.items()},
        "source_sizes": {split: len(items) for split, items in pool.items()},
        "sha256": digests,
        "fingerprint": hashlib.sha256("".join(digests.values()).encode()).hexdigest()[:16],
    })
    say(f"{plan.name}: " + ", ".join(f"{name} {len(items)}" for name, items in lists.items()) + f" -> {out}")
    return out


def _write_images(name: str, out: Path, items: list[Item], say, every_s: float = 20.0) -> None:
    todo = [it for it in items if not (out / "images" / it.key).is_file()]
    if len(todo) < len(items):
        say(f"{name}: {len(items) - len(todo)} of {len(items)} images already written, resuming")
    last = time.monotonic()
    for i, it in enumerate(todo):
        place(it, out / "images" / it.key)
        if time.monotonic() - last > every_s:
            say(f"{name}: {i + 1}/{len(todo)} images written")
            last = time.monotonic()
