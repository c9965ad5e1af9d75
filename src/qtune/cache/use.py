"""Serve a training run's splits from a cache when it matches, and say in one line why not when it does not: the one
place where a run's batches are chosen, cached or live (``batches_for``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..backbones import Backbone, Point
from ..data import ImageDataset, Listing
from ..data.batches import ImageBatches
from ..errors import CacheCorruptError, CacheError
from ..tuned import TunedModel
from .read import CachedBatches, TapCache


def cached_splits(path: str | Path, model: TunedModel, splits: Mapping[str, Listing],
                  stream: bool = False, fallback: bool = False) -> tuple[dict[str, CachedBatches], list[str]]:
    """The splits the cache can serve for ``model``, and a one-line note for each split traced live instead.

    A split is served only if the model can read a cache at all (``MethodConfig.live_only``), the backbone
    identity, preprocessing and kept blocks match and every one of its samples is in the cache with the same label
    and an unchanged file; anything else falls back to live tracing,
    except a corrupt cache (truncated, failing a checksum): that is a CacheCorruptError unless ``fallback``.
    """
    def live(reason: str, split: str | None = None) -> str:
        where = f" for {split}" if split else ""
        return f"qtune: cache {path} not used{where}: {reason}; tracing live"

    def corrupt(e: CacheCorruptError) -> CacheCorruptError:
        return CacheCorruptError(f"{e}; rebuild the cache (qtune cache build), or pass --cache-fallback to trace live")

    if not model.reads_taps:
        return {}, [live(f"method {model.method.name!r} trains the stream, it does not read taps")]
    if model.live_only:
        return {}, [live(model.live_only)]
    try:
        cache = TapCache(path)
    except CacheCorruptError as e:
        if not fallback:
            raise corrupt(e) from None
        return {}, [live(str(e))]
    except CacheError as e:
        return {}, [live(str(e))]
    blocks, points = model.blocks_read(), model.points_read()
    why = cache.mismatch(model.backbone, blocks, points)
    if why:
        return {}, [live(why)]
    served: dict[str, CachedBatches] = {}
    notes: list[str] = []
    for name, listing in splits.items():
        try:
            served[name] = CachedBatches(cache, listing, blocks, stream=stream, points=points)
        except CacheCorruptError as e:
            if not fallback:
                raise corrupt(e) from None
            notes.append(live(str(e), name))
        except CacheError as e:
            notes.append(live(str(e), name))
    return served, notes


def batches_for(model: TunedModel, cache: str | Path | None, listings: Mapping[str, Listing], *,
                stream: bool = False, fallback: bool = False, num_workers: int = 0,
                ) -> tuple[dict[str, CachedBatches | ImageBatches], list[str]]:
    """Each split's batches for ``model``: read from ``cache`` where it serves them (``cached_splits``), decoded
    images traced live otherwise; and a one-line note for each split a given cache did not serve."""
    served, notes = cached_splits(cache, model, listings, stream, fallback) if cache else ({}, [])
    transform = model.backbone.preprocessing.transform()
    return {k: served[k] if k in served else ImageBatches(ImageDataset(v, transform), num_workers)
            for k, v in listings.items()}, notes


def what_is_read(backbone: Backbone, candidates: Iterable[tuple[str, dict[str, Any]]], num_classes: int,
                 ) -> tuple[tuple[int, ...], tuple[Point, ...]]:
    """The blocks (K/V) and block points that side-path ``(method, options)`` candidates read from a cache: what a
    cache serving them stores (nothing for those that trace live, ``MethodConfig.live_only``). What is read depends on
    the options only, so one model is built per distinct (method, options)."""
    from ..methods import get_method

    blocks: set[int] = set()
    points: dict[Point, None] = {}
    distinct = {(m, json.dumps(o, sort_keys=True, default=str)): (m, o) for m, o in candidates}
    for method, options in distinct.values():
        if get_method(method).reads_taps:
            model = TunedModel.build(backbone, method, num_classes, options)
            if model.live_only:
                continue
            blocks.update(model.blocks_read())
            points.update(dict.fromkeys(model.points_read()))
    return tuple(sorted(blocks)), tuple(points)
