"""The rows of a TapCache: which image each row is (path under the cache's root, label, file size and mtime or
content hash), which listings it was built from, and whether the dataset changed since."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..data import Listing, read_split
from ..errors import CacheError, DataError
from .manifest import digest, file_digest


@dataclass(frozen=True)
class DatasetRows:
    """The images a cache covers, one per row, and what identifies each file's content.

    ids are paths relative to ``root`` (the common folder of the listings' roots), so the splits of one dataset
    (e.g. VTAB's train800val200 and test) share one cache and each maps its samples to rows by path.
    """

    root: str
    ids: tuple[str, ...]
    labels: tuple[int, ...]
    sizes: tuple[int, ...]
    mtimes_ns: tuple[int, ...]
    hashes: tuple[str, ...] | None
    sources: tuple[dict[str, Any], ...]

    @classmethod
    def from_listings(cls, listings: Sequence[Listing], content_hash: bool = False) -> "DatasetRows":
        if not listings:
            raise CacheError("a cache needs at least one dataset listing")
        roots = [Path(lst.root).resolve() for lst in listings]
        root = Path(os.path.commonpath([str(r) for r in roots]))
        ids: list[str] = []
        labels: list[int] = []
        seen: dict[str, int] = {}
        for lst, lroot in zip(listings, roots):
            for rel, label in lst.samples:
                rid = sample_id(lroot, rel, root)
                if rid in seen:
                    if labels[seen[rid]] != label:
                        raise CacheError(f"{lst.source}: {rel} has label {label} here and {labels[seen[rid]]} in "
                                         "an earlier listing")
                    continue
                seen[rid] = len(ids)
                ids.append(rid)
                labels.append(label)
        sizes, mtimes, hashes = [], [], []
        for rid in ids:
            st = _stat(root / rid)
            sizes.append(st.st_size)
            mtimes.append(st.st_mtime_ns)
            if content_hash:
                hashes.append(file_digest(root / rid))
        sources = tuple({"path": str(Path(lst.source).resolve()), "root": str(r), "folder": Path(lst.source).is_dir()}
                        for lst, r in zip(listings, roots))
        return cls(str(root), tuple(ids), tuple(labels), tuple(sizes), tuple(mtimes),
                   tuple(hashes) if content_hash else None, sources)

    def __len__(self) -> int:
        return len(self.ids)

    def fingerprint(self) -> str:
        """Content identity of the rows (ids, labels, file sizes and mtimes or hashes); the root is not part of it."""
        ident = self.hashes if self.hashes is not None else self.mtimes_ns
        return digest(json.dumps([self.ids, self.labels, self.sizes, ident]).encode())

    def index(self) -> dict[str, int]:
        return {rid: i for i, rid in enumerate(self.ids)}

    def listing(self) -> Listing:
        """All rows as one listing under the common root (what the build traces)."""
        n = max(self.labels) + 1
        return Listing(Path(self.root), tuple(zip(self.ids, self.labels)), tuple(str(i) for i in range(n)),
                       Path(self.root))

    def to_dict(self) -> dict[str, Any]:
        return {"root": self.root, "ids": list(self.ids), "labels": list(self.labels), "sizes": list(self.sizes),
                "mtimes_ns": list(self.mtimes_ns), "hashes": list(self.hashes) if self.hashes is not None else None,
                "sources": list(self.sources)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DatasetRows":
        hashes = d.get("hashes")
        return cls(d["root"], tuple(d["ids"]), tuple(d["labels"]), tuple(d["sizes"]), tuple(d["mtimes_ns"]),
                   tuple(hashes) if hashes is not None else None, tuple(d["sources"]))


def sample_id(listing_root: Path, rel: str, cache_root: Path) -> str:
    """The row id of a listed file: its path relative to the cache root (posix, normalised)."""
    full = os.path.normpath(os.path.join(str(listing_root), rel))
    rid = os.path.relpath(full, str(cache_root))
    return Path(rid).as_posix()


def _stat(path: Path) -> os.stat_result:
    try:
        return path.stat()
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None


def file_changed(rows: DatasetRows, row: int, path: Path) -> str | None:
    """Why the file at ``path`` is no longer the one cached in ``row`` (None if it is)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return f"{rows.ids[row]}: file missing"
    if st.st_size != rows.sizes[row]:
        return f"{rows.ids[row]}: file size changed ({rows.sizes[row]} -> {st.st_size} bytes)"
    if rows.hashes is not None:
        if st.st_mtime_ns != rows.mtimes_ns[row] and file_digest(path) != rows.hashes[row]:
            return f"{rows.ids[row]}: file content changed"
    elif st.st_mtime_ns != rows.mtimes_ns[row]:
        return f"{rows.ids[row]}: file modified since the cache was built"
    return None


def rows_difference(cached: DatasetRows, now: DatasetRows) -> str | None:
    """The first difference between the cached rows and the dataset as it is now, in words (None if equal)."""
    if Path(cached.root) != Path(now.root):
        return f"dataset root is {now.root}, the cache was built from {cached.root}"
    old, new = cached.index(), now.index()
    added = [rid for rid in now.ids if rid not in old]
    if added:
        return f"{added[0]}: listed now but not in the cache ({len(added)} new image(s))"
    gone = [rid for rid in cached.ids if rid not in new]
    if gone:
        return f"{gone[0]}: in the cache but no longer listed ({len(gone)} image(s) removed)"
    for rid, j in new.items():
        i = old[rid]
        if cached.labels[i] != now.labels[j]:
            return f"{rid}: label {cached.labels[i]} in the cache, {now.labels[j]} now"
        if cached.sizes[i] != now.sizes[j]:
            return f"{rid}: file size changed ({cached.sizes[i]} -> {now.sizes[j]} bytes)"
        if cached.hashes is not None and now.hashes is not None:
            if cached.hashes[i] != now.hashes[j]:
                return f"{rid}: file content changed"
        elif cached.mtimes_ns[i] != now.mtimes_ns[j]:
            return f"{rid}: file modified since the cache was built"
    return None


def read_listings(paths: Sequence[str | Path], root: Path | None = None) -> list[Listing]:
    """Listings of the given list files / image folders. Image folders after the first folder use its class order,
    list files after the first list file its class count (as a training split's classes are used for val/test: a
    test list need not use every class)."""
    listings: list[Listing] = []
    classes, count = None, None
    for p in paths:
        p = Path(p)
        is_folder = p.is_dir()
        lst = read_split(p, classes=classes, root=root) if is_folder else read_split(p, num_classes=count, root=root)
        if is_folder:
            classes = classes or lst.classes
        else:
            count = count or len(lst.classes)
        listings.append(lst)
    return listings


def reread_sources(rows: DatasetRows) -> list[Listing]:
    """The listings a cache was built from, read again from their recorded paths (to detect a changed dataset)."""
    listings: list[Listing] = []
    classes, count = None, None
    for s in rows.sources:
        if s["folder"]:
            lst = read_split(s["path"], classes=classes)
            classes = classes or lst.classes
        else:
            lst = read_split(s["path"], num_classes=count, root=Path(s["root"]))
            count = count or len(lst.classes)
        listings.append(lst)
    return listings
