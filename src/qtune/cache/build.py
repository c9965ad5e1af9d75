"""Build a TapCache: one frozen pass over the images, written chunk by chunk, resumable, completed atomically.

The arrays are created at full size up front and filled in place through memory maps. After each chunk of rows the
maps are flushed and the chunk's checksum per file is appended (fsync'ed) to progress.jsonl; an interrupted build
re-checks the recorded chunks and continues at the first unfinished (or damaged) one. Chunks are whole batches, so a
resumed build traces every image in the same batch as an uninterrupted one and writes the same bytes. An int8 cache's
scale files (block_XXX.scale.npy) are files of the plan like the others: filled per chunk, checksummed, resumed. manifest.json
is written last by an atomic rename: until then no reader takes the folder for a complete cache.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..backbones import Backbone, Point
from ..data import ImageDataset, Listing
from ..errors import CacheError
from ..io import append_jsonl, write_json, write_text
from .manifest import (
    DTYPES,
    FORMAT,
    MANIFEST,
    PLAN,
    POOLED,
    PROGRESS,
    ROWS,
    backbone_key,
    block_file,
    bytes_per_row,
    chunk_digest,
    file_digest,
    float_storage,
    format_version,
    key_difference,
    key_of,
    kv_files,
    parse_blocks,
    point_file,
    quantisation_record,
    read_json,
    read_manifest,
    read_progress,
    scale_file,
    to_storage,
)
from .quant import quantise
from .rows import DatasetRows


@dataclass
class BuildReport:
    """What a build did: the manifest, and whether it reused a finished cache or resumed an interrupted one."""

    manifest: dict[str, Any]
    reused: bool = False
    resumed_at_chunk: int = 0


def plan_cache(backbone: Backbone, rows: DatasetRows, dtype: str, blocks: Sequence[int], batch_size: int,
               chunk_rows: int, backbone_source: dict[str, Any] | None = None,
               points: Sequence[Point] = ()) -> dict[str, Any]:
    """Everything a build will write, decided before it starts; a resumed build must find the same plan."""
    if dtype not in DTYPES:
        raise CacheError(f"dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    if batch_size < 1 or chunk_rows < 1:
        raise CacheError(f"batch_size and chunk_rows must be >= 1 (got {batch_size}, {chunk_rows})")
    key = backbone_key(backbone)
    shp = key["shape"]
    chunk_rows = math.ceil(chunk_rows / batch_size) * batch_size  # whole batches: resumed == uninterrupted bytes
    n = len(rows)
    files = kv_files(shp, n, dtype, blocks)  # int8: a scale file per block, filled and checksummed like the rest
    floats = str(DTYPES[float_storage(dtype)][0])
    files[POOLED] = {"shape": [n, shp.get("pooled_dim", shp["dim"])], "dtype": floats}
    backbone.check_points(points)
    for p in points:
        for b in p.blocks:
            files[point_file(p, b)] = {"shape": [n, *backbone.point_shape(p)], "dtype": floats}
    quantised = {"quantisation": quantisation_record()} if dtype == "int8" else {}
    return {"format": FORMAT, "format_version": format_version(dtype), **key, "dtype": dtype, **quantised,
            "blocks": list(blocks), "points": [p.to_dict() for p in points],
            "rows": {"count": n, "root": rows.root, "fingerprint": rows.fingerprint(),
                     "content_hash": rows.hashes is not None},
            "chunking": {"rows_per_chunk": chunk_rows, "batch_size": batch_size, "count": math.ceil(n / chunk_rows)},
            "files": files, "bytes_per_sample": bytes_per_row(files), "backbone_source": backbone_source}


def _chunk_range(plan: dict[str, Any], c: int) -> tuple[int, int]:
    size = plan["chunking"]["rows_per_chunk"]
    return c * size, min((c + 1) * size, plan["rows"]["count"])


def _chunk_digests(arrays: dict[str, np.ndarray], start: int, end: int) -> dict[str, str]:
    return {name: chunk_digest(a, start, end) for name, a in arrays.items()}


def _open_arrays(out: Path, plan: dict[str, Any], mode: str) -> dict[str, np.ndarray]:
    arrays = {}
    for name, f in plan["files"].items():
        if mode == "w+":
            arrays[name] = np.lib.format.open_memmap(out / name, mode="w+", dtype=np.dtype(f["dtype"]),
                                                     shape=tuple(f["shape"]))
        else:
            a = np.load(out / name, mmap_mode=mode)
            if list(a.shape) != f["shape"] or str(a.dtype) != f["dtype"]:
                raise ValueError(f"{name}: shape {a.shape} {a.dtype}")
            arrays[name] = a
    return arrays


def _remove_build_files(out: Path) -> None:
    for p in [out / MANIFEST, out / PLAN, out / PROGRESS, out / ROWS, out / POOLED, *out.glob("block_*.npy")]:
        p.unlink(missing_ok=True)


def _resume_point(out: Path, plan: dict[str, Any]) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]] | None:
    """Open an interrupted build of the same plan, keeping the recorded chunks whose bytes still match."""
    if not (out / PLAN).is_file():
        return None
    try:
        old = read_json(out / PLAN, "build plan")
        same = (key_difference(key_of(plan), key_of(old)) is None and old["chunking"] == plan["chunking"]
                and old["files"] == plan["files"])
        if not same:
            return None
        arrays = _open_arrays(out, plan, "r+")
    except (CacheError, KeyError, TypeError, ValueError, OSError):
        return None
    good = []
    for rec in read_progress(out / PROGRESS):
        start, end = _chunk_range(plan, rec["chunk"])
        if rec.get("digests") != _chunk_digests(arrays, start, end):
            break
        good.append(rec)
    write_text(out / PROGRESS, "".join(json.dumps(r) + "\n" for r in good))
    return arrays, good


def build_cache(out: str | Path, backbone: Backbone, listings: Sequence[Listing], *, dtype: str = "fp16",
                blocks: str | Sequence[int] | None = None, batch_size: int = 64, chunk_rows: int = 256,
                content_hash: bool = False, device: str | torch.device = "cpu", num_workers: int = 0,
                progress: bool = True, overwrite: bool = False, backbone_source: dict[str, Any] | None = None,
                on_chunk: Callable[[int], None] | None = None, points: Sequence[Point] = ()) -> BuildReport:
    """Trace every image of ``listings`` once and store K/V of ``blocks`` (default all), the pooled feature and the
    block ``points`` (none by default; Head2Toe and LST read them).

    A finished cache with the same key is reused as is. An interrupted build of the same plan resumes at its first
    unfinished chunk. A folder holding another cache is replaced only with ``overwrite``. ``backbone_source`` (the
    ``load_backbone`` arguments) lets ``verify_cache`` reload the backbone to check its weights hash later.
    ``on_chunk(c)`` is called after chunk ``c`` is durably recorded.
    """
    out = Path(out)
    rows = DatasetRows.from_listings(listings, content_hash)
    plan = plan_cache(backbone, rows, dtype, parse_blocks(blocks, backbone.depth), batch_size, chunk_rows,
                      backbone_source, points)
    if (out / MANIFEST).is_file():
        try:
            existing = read_manifest(out)
            diff = key_difference(key_of(plan), key_of(existing))
        except (CacheError, KeyError) as e:
            existing, diff = None, str(e)
        if diff is None and not overwrite:
            return BuildReport(existing, reused=True)
        if not overwrite:
            raise CacheError(f"{out}: holds another cache ({diff}); pass --overwrite to replace it")
        (out / MANIFEST).unlink()  # from here on the folder is not a complete cache
    elif out.is_dir() and any(out.iterdir()) and not (out / PLAN).is_file() and not overwrite:
        raise CacheError(f"{out}: folder exists and is not a qtune cache (choose another folder)")
    out.mkdir(parents=True, exist_ok=True)

    resumed = _resume_point(out, plan)
    if resumed is None:
        _remove_build_files(out)
        write_json(out / ROWS, rows.to_dict())
        arrays = _open_arrays(out, plan, "w+")
        write_json(out / PLAN, plan)
        records: list[dict[str, Any]] = []
    else:
        arrays, records = resumed
    first_chunk = len(records)
    start_row = _chunk_range(plan, first_chunk)[0]
    n = plan["rows"]["count"]
    keep = tuple(plan["blocks"])
    floats = float_storage(dtype)
    layout = plan.get("quantisation", {}).get("scale_layout")
    device = torch.device(device)
    backbone.to(device)
    dataset = ImageDataset(rows.listing(), backbone.preprocessing.transform())
    batches = [list(range(s, min(s + batch_size, n))) for s in range(start_row, n, batch_size)]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, generator=torch.Generator())
    begin = time.perf_counter()
    chunk = first_chunk
    bar = tqdm(total=n, initial=start_row, desc="cache build", unit="img", disable=not progress, dynamic_ncols=True)
    for images, _, index in loader:
        taps = backbone.trace(images.to(device), keep, points)
        s, e = int(index[0]), int(index[-1]) + 1
        for j, b in enumerate(keep):
            kv = torch.stack([taps.keys[j], taps.values[j]], dim=1)  # (B, 2, H, N, hd)
            if dtype == "int8":
                arrays[block_file(b)][s:e], arrays[scale_file(b)][s:e] = quantise(kv, layout)
            else:
                arrays[block_file(b)][s:e] = to_storage(kv, dtype)
        arrays[POOLED][s:e] = to_storage(taps.pooled, floats)
        for p, tensors in taps.points.items():
            for b, t in zip(p.blocks, tensors):
                arrays[point_file(p, b)][s:e] = to_storage(t, floats)
        bar.update(e - s)
        c_start, c_end = _chunk_range(plan, chunk)
        if e == c_end:
            for a in arrays.values():
                a.flush()
            rec = {"chunk": chunk, "rows": [c_start, c_end], "digests": _chunk_digests(arrays, c_start, c_end)}
            append_jsonl(out / PROGRESS, rec)
            records.append(rec)
            if on_chunk is not None:
                on_chunk(chunk)
            chunk += 1
    bar.close()
    if len(records) != plan["chunking"]["count"]:
        raise CacheError(f"{out}: build ended after {len(records)} of {plan['chunking']['count']} chunks")
    for a in arrays.values():
        a.flush()
    del arrays
    manifest = {**plan,
                "digests": {name: [r["digests"][name] for r in records] for name in plan["files"]},
                "file_bytes": {name: (out / name).stat().st_size for name in plan["files"]},
                "rows_digest": file_digest(out / ROWS),
                "build_seconds": time.perf_counter() - begin}
    manifest["bytes"] = sum(manifest["file_bytes"].values())
    write_json(out / MANIFEST, manifest)  # atomic: the cache is complete from here on
    (out / PLAN).unlink(missing_ok=True)
    (out / PROGRESS).unlink(missing_ok=True)
    return BuildReport(manifest, resumed_at_chunk=first_chunk)
