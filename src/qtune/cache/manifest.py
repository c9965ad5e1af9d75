"""What a TapCache is keyed by, and the files it is made of: storage format, checksums, manifest and keys.
(Which images its rows are, and whether they changed: rows.py.)

A cache folder holds, for the union of the images of one or more listings under a common root:
  block_XXX.npy   (rows, 2, H, N, head_dim): K and V of backbone block XXX, one row per image, so gathering a batch
                  is one fancy-index per block;
  block_XXX.scale.npy  int8 caches only: the fp16 scales of block XXX's K/V, (rows, 2, H, N) (cache/quant.py);
  pooled.npy      (rows, D): the backbone's pooled final feature;
  point_P_XXX.npy (rows, ...): block point P (backbones/points.py: per token, or pooled) of block XXX, for the
                  methods that read more than K/V (Head2Toe, LST);
  rows.json       the row table: image ids (paths relative to the root), labels, file sizes and mtimes (or hashes);
  manifest.json   written last, by an atomic rename: its presence is what makes the folder a complete cache.
While a build runs (or after it was interrupted) the folder holds build.json (the plan) and progress.jsonl (one
line of per-file chunk checksums per finished chunk) instead of manifest.json.

A cache is used for a training run only when its key matches: backbone identity (name, weights hash, constructor
arguments), preprocessing, the blocks kept, and, per sample, the path, label and file size/mtime (or content hash).
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..backbones.points import Point
from ..errors import CacheError, CacheIncompleteError
from ..precision import CACHE_DTYPES
from .quant import SCALE_DTYPE, SCALE_LAYOUTS, check_layout, scale_shape

FORMAT = "qtune-tapcache"
# Version 2 adds int8 K/V with scale files; caches of the other dtypes are still written as version 1 (nothing in
# them changed), so that every qtune reads them and one that predates int8 refuses an int8 cache instead of
# taking its int8 values for floats.
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
PLAN = "build.json"
PROGRESS = "progress.jsonl"
ROWS = "rows.json"
POOLED = "pooled.npy"
MANIFEST_FIELDS = ("backbone", "preprocessing", "shape", "dtype", "blocks", "rows", "chunking", "files", "digests",
                   "file_bytes", "rows_digest", "bytes", "bytes_per_sample")

# Storage dtype name -> (numpy dtype on disk, torch dtype it stands for). numpy has no bfloat16: its bits go to disk
# as uint16 and are viewed back as torch.bfloat16 when read.
DISK = {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16), "bf16": np.dtype(np.uint16),
        "int8": np.dtype(np.int8)}
DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {name: (DISK[name], getattr(torch, CACHE_DTYPES[name]))
                                                   for name in CACHE_DTYPES}
# What an int8 cache stores besides K/V (the pooled feature, block points): these stay floats, in fp16.
INT8_FLOATS = "fp16"


def block_file(block: int) -> str:
    return f"block_{block:03d}.npy"


def scale_file(block: int) -> str:
    return f"block_{block:03d}.scale.npy"


def float_storage(dtype: str) -> str:
    """The storage dtype of a cache's float arrays (pooled feature, block points): its own, fp16 in an int8 cache."""
    return INT8_FLOATS if dtype == "int8" else dtype


def format_version(dtype: str) -> int:
    return 2 if dtype == "int8" else 1


def quantisation_record(layout: str = SCALE_LAYOUTS[0]) -> dict[str, Any]:
    """How an int8 cache stores K/V: recorded in its manifest, read back by ``TapCache``."""
    return {"scheme": "symmetric int8, q = round(x / s) in [-127, 127]", "scale_layout": check_layout(layout),
            "scale_dtype": str(SCALE_DTYPE), "scale_files": "block_XXX.scale.npy",
            "floats": INT8_FLOATS}


def kv_files(shape: dict[str, int], rows: int, dtype: str, blocks: Sequence[int],
             layout: str = SCALE_LAYOUTS[0]) -> dict[str, dict[str, Any]]:
    """The K/V files (and, for int8, scale files) of ``blocks`` for a backbone of tap ``shape``: name -> shape, dtype."""
    if dtype not in DTYPES:
        raise CacheError(f"dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    kv = [rows, 2, shape["heads"], shape["tokens"], shape["head_dim"]]
    files = {}
    for b in blocks:
        files[block_file(b)] = {"shape": kv, "dtype": str(DTYPES[dtype][0])}
        if dtype == "int8":
            files[scale_file(b)] = {"shape": scale_shape(kv, layout), "dtype": str(SCALE_DTYPE)}
    return files


def bytes_per_row(files: dict[str, dict[str, Any]]) -> int:
    """Bytes one image takes in these files."""
    return sum(math.prod(f["shape"][1:]) * np.dtype(f["dtype"]).itemsize for f in files.values())


def point_file(point: Point, block: int) -> str:
    return f"point_{point.key}_{block:03d}.npy"


def stored_points(manifest: dict[str, Any]) -> tuple[Point, ...]:
    """The block points a cache holds (none in caches written before points existed)."""
    return tuple(Point.from_dict(d) for d in manifest.get("points", []))


def to_storage(t: torch.Tensor, dtype: str) -> np.ndarray:
    """A float tensor as the numpy array written to disk for storage dtype ``dtype``."""
    t = t.detach().to(device="cpu", dtype=DTYPES[dtype][1]).contiguous()
    return t.view(torch.int16).numpy().view(np.uint16) if dtype == "bf16" else t.numpy()


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    """The tensor a stored array stands for (shares the array's memory)."""
    if dtype == "bf16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def digest(data: Any) -> str:
    """blake2b (128 bits) of a bytes-like object: the per-chunk checksum."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def chunk_digest(array: np.ndarray, start: int, end: int) -> str:
    """The checksum of rows start..end-1 of a cache array, as recorded when the chunk was written."""
    return digest(memoryview(np.ascontiguousarray(array[start:end])).cast("B"))


def file_digest(path: Path, block_bytes: int = 1 << 22) -> str:
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        while chunk := f.read(block_bytes):
            h.update(chunk)
    return h.hexdigest()


def normalised(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists), so keys compare equal across a round trip."""
    return json.loads(json.dumps(obj, default=str))


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CacheError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{path}: corrupt {what} ({e})") from None


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a complete cache; a folder whose build has not finished is refused, never read."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        if (folder / PLAN).is_file():
            done = count_progress(folder)
            total = read_json(folder / PLAN, "build plan").get("chunking", {}).get("count", "?")
            raise CacheIncompleteError(f"{folder}: incomplete cache, the build stopped after {done} of {total} chunks "
                                       "(run `qtune cache build` again to resume)")
        if not folder.is_dir():
            raise CacheError(f"{folder}: cache folder not found")
        raise CacheError(f"{folder}: not a qtune cache ({MANIFEST} missing)")
    manifest = read_json(folder / MANIFEST, "cache manifest")
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{folder / MANIFEST}: not a qtune cache manifest (field 'format')")
    if manifest.get("format_version") not in READ_VERSIONS:
        raise CacheError(f"{folder / MANIFEST}: cache format version {manifest.get('format_version')} "
                         f"(this qtune reads {', '.join(map(str, READ_VERSIONS))}; rebuild the cache)")
    for key in MANIFEST_FIELDS + (("quantisation",) if manifest.get("dtype") == "int8" else ()):
        if key not in manifest:
            raise CacheError(f"{folder / MANIFEST}: field {key!r} missing")
    if manifest["dtype"] not in DTYPES:
        raise CacheError(f"{folder / MANIFEST}: storage dtype {manifest['dtype']!r} unknown to this qtune")
    return manifest


def count_progress(folder: Path) -> int:
    """Chunks recorded as finished in an unfinished build (a torn last line is not counted)."""
    return len(read_progress(folder / PROGRESS))


def read_progress(path: Path) -> list[dict[str, Any]]:
    """The finished-chunk records, in order, up to the first torn or out-of-order line."""
    if not path.is_file():
        return []
    out: list[dict[str, Any]] = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break
        if not isinstance(rec, dict) or rec.get("chunk") != len(out):
            break
        out.append(rec)
    return out


def key_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """The fields that decide whether two caches hold the same thing."""
    return {k: manifest[k] for k in ("format_version", "backbone", "preprocessing", "dtype", "blocks", "shape")} | {
        "rows": manifest["rows"]["fingerprint"], "root": manifest["rows"]["root"],
        "points": manifest.get("points", [])}


def key_difference(want: dict[str, Any], have: dict[str, Any]) -> str | None:
    """The first field where two cache keys differ, in words."""
    from ..backbones.vit import identity_difference

    diff = identity_difference(have["backbone"], want["backbone"], "there")
    if diff:
        return diff
    for field in ("preprocessing", "dtype", "blocks", "points", "root", "rows", "shape", "format_version"):
        if want[field] != have[field]:
            return f"{field} differs ({have[field]}, not {want[field]})" if field != "rows" else "dataset differs"
    return None


def backbone_key(backbone: Any) -> dict[str, Any]:
    """The backbone part of a cache key: identity, preprocessing and the shape of what a block's K/V look like."""
    return {"backbone": normalised(backbone.identity.to_dict()),
            "preprocessing": normalised(backbone.preprocessing.to_dict()),
            "shape": dict(backbone.tap_shape)}


def parse_blocks(spec: str | Sequence[int] | None, depth: int) -> tuple[int, ...]:
    """Blocks to keep: None or "all", "none", "0,3,11", or a sequence of indices; checked against the depth."""
    if spec is None or spec == "all":
        return tuple(range(depth))
    if spec == "none":
        return ()
    if isinstance(spec, str):
        try:
            spec = [int(s) for s in spec.split(",") if s.strip()]
        except ValueError:
            raise CacheError(f"blocks {spec!r}: expected all, none or comma-separated block indices") from None
    blocks = tuple(sorted({int(b) for b in spec}))
    bad = [b for b in blocks if not 0 <= b < depth]
    if bad:
        raise CacheError(f"blocks {bad}: out of range for a backbone of depth {depth}")
    return blocks
