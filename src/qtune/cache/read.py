"""Read a TapCache: memory-mapped arrays, batches gathered by row indices, and depth-streamed Taps.

Nothing is loaded up front: the arrays are memory maps, so the cache never has to fit in RAM. A batch is one
fancy-index per block file (rows in any order), with no Python work per sample. ``StreamedTaps`` goes further for
training: a block's K/V are read inside a checkpointed function, so in forward and in backward only one block's K/V
for the batch are resident at a time; backward re-reads them (from the page cache) instead of keeping them.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from ..backbones import Backbone, Point, QueryOutput, Taps
from ..backbones.vit import identity_difference
from ..data import Listing
from ..errors import CacheCorruptError, CacheError, CacheStaleError
from ..methods.masks import per_model_masks
from .manifest import (
    POOLED,
    ROWS,
    backbone_key,
    block_file,
    chunk_digest,
    file_digest,
    float_storage,
    from_storage,
    point_file,
    read_json,
    read_manifest,
    scale_file,
    stored_points,
)
from .quant import dequantise
from .rows import DatasetRows, file_changed, sample_id


class TapCache:
    """A complete cache folder, opened: its manifest, its row table and (lazily) its memory-mapped arrays.

    Opening checks what is cheap to check (format, file sizes, the row table's checksum); ``verify_cache`` also
    checks every chunk's checksum and whether the dataset or the weights changed since the build.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        for name, size in self.manifest["file_bytes"].items():
            f = self.path / name
            have = f.stat().st_size if f.is_file() else None
            if have is None:
                raise CacheCorruptError(f"{f}: cache file missing")
            if have != size:
                raise CacheCorruptError(f"{f}: truncated or resized ({have} bytes, the manifest says {size})")
        if file_digest(self.path / ROWS) != self.manifest["rows_digest"]:
            raise CacheCorruptError(f"{self.path / ROWS}: fails its checksum (corrupted)")
        self.rows = DatasetRows.from_dict(read_json(self.path / ROWS, "row table"))
        self._index: dict[str, int] | None = None
        self._arrays: dict[str, np.ndarray] = {}
        self._checked: set[tuple[str, int]] = set()  # (file, chunk) whose checksum this process has verified
        self._lock = threading.Lock()  # arrays are opened on first use, possibly from a prefetch thread

    # -- what it holds --
    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def blocks(self) -> tuple[int, ...]:
        return tuple(self.manifest["blocks"])

    @property
    def points(self) -> tuple[Point, ...]:
        return stored_points(self.manifest)

    @property
    def num_rows(self) -> int:
        return self.manifest["rows"]["count"]

    @property
    def nbytes(self) -> int:
        return self.manifest["bytes"]

    def array(self, name: str) -> np.ndarray:
        """The memory map of one cache file, opened read-only on first use."""
        with self._lock:
            if name not in self._arrays:
                try:
                    self._arrays[name] = np.load(self.path / name, mmap_mode="r")
                except (OSError, ValueError) as e:
                    raise CacheCorruptError(f"{self.path / name}: cannot be read as an array ({e})") from None
            return self._arrays[name]

    # -- does it match? --
    def mismatch(self, backbone: Backbone, blocks: Sequence[int], points: Sequence[Point] = ()) -> str | None:
        """Why this cache cannot serve ``backbone`` reading ``blocks`` and ``points`` (None if it can)."""
        want, have = backbone_key(backbone), self.manifest
        diff = identity_difference(have["backbone"], want["backbone"], "in the cache")
        if diff:
            return diff
        if want["preprocessing"] != have["preprocessing"]:
            return f"preprocessing {have['preprocessing']} in the cache, {want['preprocessing']} now"
        if want["shape"] != have["shape"]:
            return f"K/V shape {have['shape']} in the cache, {want['shape']} now"
        missing = sorted(set(blocks) - set(self.blocks))
        if missing:
            return f"blocks {missing} are read but not kept in the cache (kept: {list(self.blocks) or 'none'})"
        absent = [p.key for p in points if not any(q.covers(p) for q in self.points)]
        if absent:
            return (f"block points {', '.join(absent)} are read but not in the cache (it holds: "
                    f"{', '.join(q.key for q in self.points) or 'none'})")
        return None

    def rows_for(self, listing: Listing) -> np.ndarray:
        """Cache rows of a split's samples, in the split's order; CacheStaleError says which sample does not match."""
        if self._index is None:
            self._index = self.rows.index()
        root, lroot = Path(self.rows.root), Path(listing.root).resolve()
        out = np.empty(len(listing.samples), dtype=np.int64)
        for k, (rel, label) in enumerate(listing.samples):
            rid = sample_id(lroot, rel, root)
            row = self._index.get(rid)
            if row is None:
                raise CacheStaleError(f"{lroot / rel}: not in the cache (which covers {len(self.rows)} images "
                                      f"under {root})")
            if self.rows.labels[row] != label:
                raise CacheStaleError(f"{rid}: label {self.rows.labels[row]} in the cache, {label} in "
                                      f"{listing.source}")
            changed = file_changed(self.rows, row, root / rid)
            if changed:
                raise CacheStaleError(changed)
            out[k] = row
        return out

    # -- reading --
    def read_block(self, block: int, rows: np.ndarray, device: torch.device,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``block`` for ``rows``: one gather from the memory map, (B, H, N, hd) each. An int8 cache's
        rows and their scales are gathered as stored and multiplied into the one ``dtype`` tensor returned."""
        if self.dtype == "int8":
            kv = dequantise(self._rows(block_file(block), rows), self._rows(scale_file(block), rows),
                            self.manifest["quantisation"]["scale_layout"], device, dtype)
        else:
            kv = self._gather(block_file(block), rows, device, dtype)
        return kv[:, 0], kv[:, 1]

    def read_point(self, point: Point, block: int, rows: np.ndarray, device: torch.device,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._gather(point_file(point, block), rows, device, dtype)

    def read_pooled(self, rows: np.ndarray, device: torch.device,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._gather(POOLED, rows, device, dtype)

    def check_chunk(self, name: str, chunk: int) -> None:
        """CacheCorruptError unless the chunk's bytes match the checksum recorded when it was written."""
        size, n = self.manifest["chunking"]["rows_per_chunk"], self.num_rows
        start, end = chunk * size, min((chunk + 1) * size, n)
        if chunk_digest(self.array(name), start, end) != self.manifest["digests"][name][chunk]:
            raise CacheCorruptError(f"{self.path / name}: corrupted, chunk {chunk} (rows {start}-{end - 1}) fails "
                                    "its checksum")
        with self._lock:
            self._checked.add((name, chunk))

    def _rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """``rows`` of one file as stored: a numpy fancy index, one copy of the batch's rows."""
        # Each chunk is verified the first time this process reads from it: one pass over the cache's bytes per run,
        # and no training on bytes that fail their checksum.
        for chunk in np.unique(rows // self.manifest["chunking"]["rows_per_chunk"]).tolist():
            if (name, chunk) not in self._checked:
                self.check_chunk(name, chunk)
        return self.array(name)[rows]

    def _gather(self, name: str, rows: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """A float array's rows (K/V of a float cache, the pooled feature, block points) as ``dtype``."""
        return from_storage(self._rows(name, rows), float_storage(self.dtype)).to(device=device, dtype=dtype)

    def taps(self, rows: np.ndarray, blocks: Sequence[int], device: torch.device, stream: bool = False,
             dtype: torch.dtype = torch.float32, points: Sequence[Point] = ()) -> Taps:
        """Taps of a batch: every block's K/V read now, or (``stream``) each block's when the method asks for it;
        the block points always now."""
        pooled = self.read_pooled(rows, device, dtype)
        blocks = tuple(blocks)
        read = {p: [self.read_point(p, b, rows, device, dtype) for b in p.blocks] for p in points}
        if stream:
            return StreamedTaps(lambda b: self.read_block(b, rows, device, dtype), pooled, blocks, read)
        kv = [self.read_block(b, rows, device, dtype) for b in blocks]
        return Taps([k for k, _ in kv], [v for _, v in kv], pooled, blocks, read)


class _LazyBlocks(Sequence[torch.Tensor]):
    """keys or values of StreamedTaps: block j is read when indexed, and not kept."""

    def __init__(self, read: Callable[[int], tuple[torch.Tensor, torch.Tensor]], blocks: tuple[int, ...], part: int):
        self._read, self._blocks, self._part = read, blocks, part

    def __len__(self) -> int:
        return len(self._blocks)

    def __getitem__(self, j: Any) -> Any:
        if isinstance(j, slice):
            return [self[i] for i in range(*j.indices(len(self)))]
        return self._read(self._blocks[j])[self._part]


class StreamedTaps(Taps):
    """Taps whose K/V stay on disk until a block is queried; ``query`` runs that block under activation
    checkpointing with the read inside, so neither forward nor backward holds more than one block's K/V.
    ``run_block`` widens the checkpoint to a method's whole per-block unit (its trainable path and the query)."""

    def __init__(self, read: Callable[[int], tuple[torch.Tensor, torch.Tensor]], pooled: torch.Tensor,
                 blocks: tuple[int, ...], points: dict[Point, Sequence[torch.Tensor]] | None = None):
        super().__init__(_LazyBlocks(read, blocks, 0), _LazyBlocks(read, blocks, 1), pooled, blocks, points or {})
        self._read = read
        self._in_block = 0  # > 0 while run_block's unit runs: its query is already inside that checkpoint

    def kv(self, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        if block not in self.blocks:
            raise KeyError(f"block {block} is not among the taps' blocks {self.blocks}")
        return self._read(block)

    def _query(self, backbone: Backbone, block: int, tokens: torch.Tensor, drop_path: float = 0.0) -> QueryOutput:
        return backbone.query_block(block, tokens, *self.kv(block), drop_path=drop_path)

    def query(self, backbone: Backbone, block: int, tokens: torch.Tensor, drop_path: float = 0.0) -> QueryOutput:
        if self._in_block or not (torch.is_grad_enabled() and tokens.requires_grad):
            return self._query(backbone, block, tokens, drop_path)
        return QueryOutput(*checkpoint(self._query, backbone, block, tokens, drop_path, use_reentrant=False))

    def _unit(self, fn: Callable[..., Any], *args: Any) -> Any:
        self._in_block += 1
        try:
            return fn(*args)
        finally:
            self._in_block -= 1

    def run_block(self, fn: Callable[..., Any], *args: Any) -> Any:
        # Masks from per-model generators would differ when recomputed (the checkpoint rewinds the global RNG only).
        if not torch.is_grad_enabled() or per_model_masks():
            return fn(*args)
        return checkpoint(self._unit, fn, *args, use_reentrant=False)


class CachedBatches:
    """The loop's ``Batches`` for one split, served from a cache: yields (Taps, labels); the model's side path
    consumes the Taps through ``TunedModel.forward_taps``, the same module code as live training.

    ``prefetch`` gathers the next batch on a background thread while the current one trains (numpy and torch
    copies release the GIL), so reading overlaps compute; with ``stream`` the K/V are read inside the step instead.
    """

    def __init__(self, cache: TapCache, listing: Listing, blocks: Sequence[int], stream: bool = False,
                 prefetch: bool = True, points: Sequence[Point] = ()):
        self.cache = cache
        self.listing = listing
        self.blocks = tuple(blocks)
        self.points = tuple(points)
        self.stream = stream
        self.prefetch = prefetch and not stream
        self.rows = cache.rows_for(listing)
        self._labels = torch.tensor(listing.labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.rows)

    def labels(self) -> list[int]:
        return self.listing.labels

    def _batch(self, idx: np.ndarray, device: torch.device) -> tuple[Taps, torch.Tensor]:
        return (self.cache.taps(self.rows[idx], self.blocks, device, self.stream, points=self.points),
                self._labels[torch.from_numpy(idx)].to(device))

    def iterate(self, order: list[int], batch_size: int, device: torch.device) -> Iterator[tuple[Taps, torch.Tensor]]:
        order_a = np.asarray(order, dtype=np.int64)
        chunks = [order_a[s:s + batch_size] for s in range(0, len(order_a), batch_size)]
        if not self.prefetch or len(chunks) < 2:
            for idx in chunks:
                yield self._batch(idx, device)
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="qtune-cache") as pool:
            pending = pool.submit(self._batch, chunks[0], device)
            for nxt in chunks[1:] + [None]:
                batch = pending.result()
                if nxt is not None:
                    pending = pool.submit(self._batch, nxt, device)
                yield batch
                del batch  # the consumer's references decide when this batch's memory goes

    def forward(self, model: Any, taps: Taps) -> torch.Tensor:
        return model.forward_taps(taps)


def open_cache(path: str | Path) -> TapCache:
    """Open a complete cache; CacheIncompleteError for an unfinished build, CacheCorruptError for a damaged one."""
    return TapCache(path)


__all__ = ["CacheError", "CachedBatches", "StreamedTaps", "TapCache", "open_cache"]
