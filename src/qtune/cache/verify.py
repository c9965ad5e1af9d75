"""Check a cache: complete, intact (sizes and per-chunk checksums), and current (same dataset, same weights).

Each failure is one CacheError subclass with one line saying which: incomplete (a build that did not finish),
corrupt (a truncated file, or a chunk failing its checksum: named with its rows), or stale (the dataset's paths,
labels or files changed, or the backbone's weights no longer hash to what the cache was built from).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..backbones import Backbone, BackboneSpec
from ..backbones.vit import identity_difference
from ..errors import CacheStaleError, DataError
from .rows import DatasetRows, reread_sources, rows_difference
from .read import TapCache


def check_checksums(cache: TapCache, progress: bool = False) -> None:
    """Every chunk of every file against the checksum recorded when it was written."""
    m = cache.manifest
    total = len(m["files"]) * m["chunking"]["count"]
    with tqdm(total=total, desc="cache verify", unit="chunk", disable=not progress, leave=False) as bar:
        for name in m["files"]:
            for c in range(m["chunking"]["count"]):
                cache.check_chunk(name, c)
                bar.update(1)


def check_dataset(cache: TapCache) -> None:
    """The listings the cache was built from, read again: same images, labels and files."""
    try:
        now = DatasetRows.from_listings(reread_sources(cache.rows), cache.rows.hashes is not None)
    except DataError as e:
        raise CacheStaleError(f"{cache.path}: stale, dataset changed: {e}") from None
    diff = rows_difference(cache.rows, now)
    if diff:
        raise CacheStaleError(f"{cache.path}: stale, dataset changed: {diff}")


def check_backbone(cache: TapCache, backbone: Backbone) -> None:
    diff = identity_difference(cache.manifest["backbone"], backbone.identity.to_dict(), "in the cache")
    if diff:
        raise CacheStaleError(f"{cache.path}: stale, {diff}")


def source_backbone(cache: TapCache, weights: str | None = None) -> Backbone | None:
    """The backbone as the build loaded it (from the manifest's backbone_source); None if it was not recorded or
    came from the hub."""
    src = cache.manifest.get("backbone_source")
    if not src or (src.get("pretrained") and not (weights or src.get("weights"))):
        return None
    weights = weights or src.get("weights")
    # never from the hub: with a weights file in hand it is read; without one the build ran on random weights
    return BackboneSpec(src.get("name"), weights, model_args=src.get("model_args") or {},
                        preprocessing=src.get("preprocessing") or {}, init_seed=src.get("init_seed", 0),
                        random_init=not weights).load()


def verify_cache(path: str | Path, *, checksums: bool = True, dataset: bool = True, weights: bool = True,
                 backbone: Backbone | None = None, weights_file: str | None = None,
                 progress: bool = False) -> dict[str, Any]:
    """Raise a CacheError subclass naming the first problem; return a summary of the cache when all is well.

    Checks, in order: complete, file sizes, row table, per-chunk checksums (``checksums``), the dataset read again
    from the recorded listings (``dataset``), and the backbone's weights hash (``weights``): against ``backbone``,
    or the backbone reloaded as the build loaded it (with ``weights_file`` instead of the recorded weights file).
    The summary says which checks ran (weights cannot be reloaded for a hub backbone without ``weights_file``).
    """
    cache = TapCache(path)
    if checksums:
        check_checksums(cache, progress)
    if dataset:
        check_dataset(cache)
    bb = None
    if weights:
        bb = backbone if backbone is not None else source_backbone(cache, weights_file)
        if bb is not None:
            check_backbone(cache, bb)
    m = cache.manifest
    return {"path": str(cache.path), "rows": m["rows"]["count"], "blocks": m["blocks"], "depth": m["shape"]["depth"],
            "dtype": m["dtype"], "bytes": m["bytes"], "bytes_per_sample": m["bytes_per_sample"],
            "backbone": m["backbone"]["name"], "checksums_checked": checksums, "dataset_checked": dataset,
            "weights_checked": bb is not None}
