"""TapCache: one frozen pass writes every image's per-block K/V and pooled feature to memory-mapped files; then
every epoch, fold and hyper-parameter setting of a side-path method trains from them (see docs/cache.md)."""
from .build import BuildReport, build_cache, plan_cache
from .manifest import DTYPES, parse_blocks, read_manifest
from .read import CachedBatches, StreamedTaps, TapCache, open_cache
from .rows import DatasetRows, read_listings
from .use import batches_for, cached_splits, what_is_read
from .verify import verify_cache

__all__ = ["DTYPES", "BuildReport", "CachedBatches", "DatasetRows", "StreamedTaps", "TapCache", "batches_for",
           "build_cache", "cached_splits", "open_cache", "parse_blocks", "plan_cache", "read_listings", "read_manifest",
           "verify_cache", "what_is_read"]
