"""Building and reading a cache: the taps read back are the live trace's, for every split sharing the root."""
import json

import numpy as np
import pytest
import torch

from qtune.cache import CachedBatches, TapCache, cached_splits
from qtune.cache.manifest import MANIFEST, PLAN, block_file
from qtune.data import ImageDataset, read_split
from qtune.data.batches import ImageBatches
from qtune.errors import CacheError, CacheIncompleteError
from qtune.tuned import TunedModel
from tests.cache.cachedata import build
from tests.conftest import tiny_backbone

CPU = torch.device("cpu")


def _live_and_cached(cache, listing, order, backbone, stream=False):
    cached = CachedBatches(cache, listing, range(backbone.depth), stream=stream)
    live = ImageBatches(ImageDataset(listing, backbone.preprocessing.transform()))
    (taps, y), = cached.iterate(order, len(order), CPU)
    (images, y_live), = live.iterate(order, len(order), CPU)
    return taps, y, backbone.trace(images), y_live


@pytest.mark.parametrize("split", ["train.txt", "val.txt", "test.txt"])
def test_fp32_taps_equal_the_live_trace_for_every_split(cache_dir, vtab, split):
    bb = tiny_backbone()
    listing = read_split(vtab / split)
    order = list(np.random.default_rng(0).permutation(len(listing.samples))[:10])
    taps, y, live, y_live = _live_and_cached(TapCache(cache_dir), listing, order, bb)
    assert torch.equal(y, y_live)
    assert torch.equal(taps.pooled, live.pooled)
    for i in range(bb.depth):
        k, v = taps.kv(i)
        assert torch.equal(k, live.keys[i]) and torch.equal(v, live.values[i])


def test_splits_share_one_cache_by_path(cache_dir, vtab):
    cache = TapCache(cache_dir)
    assert cache.num_rows == 80  # trainval (48 + 16) + test (16): the union, each image once
    train, val = (CachedBatches(cache, read_split(vtab / f), ()) for f in ("train.txt", "val.txt"))
    trainval = CachedBatches(cache, read_split(vtab / "trainval.txt"), ())
    assert list(trainval.rows) == list(train.rows) + list(val.rows)


@pytest.mark.parametrize("dtype, tol", [("fp16", 2e-3), ("bf16", 1e-2)])
def test_half_precision_caches(vtab, tmp_path, dtype, tol):
    bb = tiny_backbone()
    report = build(tmp_path / dtype, vtab, dtype)
    m = report.manifest
    assert m["bytes_per_sample"] == bb.kv_bytes_per_sample(bytes_per_value=2) + 2 * bb.dim
    assert np.load(tmp_path / dtype / block_file(0), mmap_mode="r").dtype == (np.uint16 if dtype == "bf16"
                                                                              else np.float16)
    listing = read_split(vtab / "test.txt")
    taps, _, live, _ = _live_and_cached(TapCache(tmp_path / dtype), listing, list(range(16)), bb)
    assert taps.pooled.dtype == torch.float32  # the side path computes in fp32 whatever the storage
    for i in range(bb.depth):
        torch.testing.assert_close(taps.kv(i)[0], live.keys[i], rtol=tol, atol=tol)


def test_keep_only_the_blocks_a_method_reads(vtab, tmp_path):
    bb = tiny_backbone()
    m = build(tmp_path / "c", vtab, "fp16", blocks=[1]).manifest
    assert sorted(p.name for p in (tmp_path / "c").glob("*.npy")) == [block_file(1), "pooled.npy"]
    assert m["bytes_per_sample"] == bb.kv_bytes_per_sample([1], bytes_per_value=2) + 2 * bb.dim
    cache = TapCache(tmp_path / "c")
    assert cache.mismatch(bb, []) is None  # the linear probe reads no block
    assert "blocks [0, 2] are read but not kept" in cache.mismatch(bb, [0, 1, 2])
    model = TunedModel.build(bb, "synqt", 4)
    served, notes = cached_splits(tmp_path / "c", model, {"train": read_split(vtab / "train.txt")})
    assert not served and "not kept in the cache" in notes[0] and notes[0].endswith("tracing live")


def test_rebuild_reuses_and_other_keys_need_overwrite(cache_dir, vtab):
    assert build(cache_dir, vtab).reused
    with pytest.raises(CacheError, match="holds another cache .*dtype.*pass --overwrite"):
        build(cache_dir, vtab, "fp16")
    report = build(cache_dir, vtab, "fp16", overwrite=True)
    assert not report.reused and TapCache(cache_dir).dtype == "fp16"


def test_a_folder_that_is_not_a_cache_is_left_alone(vtab, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(CacheError, match="not a qtune cache"):
        build(tmp_path / "mine", vtab)


def test_an_unfinished_build_is_never_read_as_complete(vtab, tmp_path):
    def stop(chunk):
        if chunk == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "c", vtab, on_chunk=stop)
    assert (tmp_path / "c" / PLAN).is_file() and not (tmp_path / "c" / MANIFEST).exists()
    with pytest.raises(CacheIncompleteError, match="incomplete cache, the build stopped after 1 of 3 chunks"):
        TapCache(tmp_path / "c")
    bb = tiny_backbone()
    served, notes = cached_splits(tmp_path / "c", TunedModel.build(bb, "linear", 4),
                                  {"train": read_split(vtab / "train.txt")})
    assert not served and "incomplete cache" in notes[0]
    report = build(tmp_path / "c", vtab)
    assert report.resumed_at_chunk == 1
    assert json.loads((tmp_path / "c" / MANIFEST).read_text())["rows"]["count"] == 80
