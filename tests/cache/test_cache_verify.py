"""`verify_cache` names what is wrong: incomplete, truncated, corrupted (which chunk), or stale (data or weights)."""
import os

import numpy as np
import torch
import pytest
from safetensors.torch import save_file

from qtune.backbones import load_backbone
from qtune.cache import TapCache, cached_splits, verify_cache
from qtune.cache.manifest import block_file
from qtune.data import read_split
from qtune.errors import CacheCorruptError, CacheIncompleteError, CacheStaleError
from qtune.tuned import TunedModel
from tests.cache.cachedata import CHUNK, build
from tests.conftest import TINY, TINY_NAME, tiny_backbone


def _flip(path, offset):
    with path.open("r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_a_sound_cache_verifies(cache_dir):
    r = verify_cache(cache_dir)
    assert r["rows"] == 80 and r["checksums_checked"] and r["dataset_checked"] and r["weights_checked"]


def test_truncated_file(cache_dir):
    path = cache_dir / block_file(1)
    size = path.stat().st_size
    os.truncate(path, size - 100)
    with pytest.raises(CacheCorruptError, match=rf"{block_file(1)}: truncated or resized \({size - 100} bytes"):
        verify_cache(cache_dir)


@pytest.mark.parametrize("name, row", [(block_file(2), 40), ("pooled.npy", 70)])
def test_flipped_bytes_name_the_chunk(cache_dir, name, row):
    arr = np.load(cache_dir / name, mmap_mode="r")
    offset = arr.offset + row * arr[0].nbytes + 5
    del arr
    _flip(cache_dir / name, offset)
    chunk = row // CHUNK
    rows = f"rows {chunk * CHUNK}-{min(chunk * CHUNK + CHUNK, 80) - 1}"
    with pytest.raises(CacheCorruptError, match=rf"{name}: corrupted, chunk {chunk} \({rows}\) fails its checksum"):
        verify_cache(cache_dir)


def test_changed_label_is_stale_and_training_falls_back(cache_dir, vtab):
    lines = (vtab / "trainval.txt").read_text().splitlines()
    path, label = lines[3].rsplit(maxsplit=1)
    lines[3] = f"{path} {(int(label) + 1) % 4}"
    (vtab / "trainval.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(CacheStaleError, match=rf"stale, dataset changed: {path}: label {label} in the cache, "
                                              rf"{(int(label) + 1) % 4} now"):
        verify_cache(cache_dir)
    bb = tiny_backbone()
    model = TunedModel.build(bb, "synqt", 4)
    served, notes = cached_splits(cache_dir, model, {"train": read_split(vtab / "trainval.txt"),
                                                     "test": read_split(vtab / "test.txt")})
    assert list(served) == ["test"]  # the unchanged split still reads the cache
    assert len(notes) == 1 and "not used for train" in notes[0] and "label" in notes[0]


def test_rewritten_image_is_stale(cache_dir, vtab):
    image = sorted((vtab / "images").iterdir())[5]
    image.write_bytes(image.read_bytes())  # same bytes, new mtime: the file is not the one traced
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(CacheStaleError, match=f"images/{image.name}: file modified since the cache was built"):
        verify_cache(cache_dir)


def test_content_hash_tells_a_touched_file_from_a_changed_one(vtab, tmp_path):
    build(tmp_path / "c", vtab, content_hash=True)
    image = sorted((vtab / "images").iterdir())[5]
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    verify_cache(tmp_path / "c")  # touched, same content: still current
    data = bytearray(image.read_bytes())
    data[-20] ^= 0xFF
    image.write_bytes(bytes(data))
    with pytest.raises(CacheStaleError, match=f"images/{image.name}: file (content|size) changed"):
        verify_cache(tmp_path / "c")


def test_removed_image_is_stale(cache_dir, vtab):
    lines = (vtab / "test.txt").read_text().splitlines()
    (vtab / "test.txt").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(CacheStaleError, match=r"no longer listed \(1 image\(s\) removed\)"):
        verify_cache(cache_dir)


def test_changed_weights_are_stale(vtab, tmp_path):
    weights = tmp_path / "w.safetensors"
    save_file(tiny_backbone().model.state_dict(), str(weights))
    source = {"name": TINY_NAME, "weights": str(weights), "pretrained": False, "model_args": TINY,
              "preprocessing": {}, "init_seed": 0}
    build(tmp_path / "c", vtab, backbone_source=source)
    verify_cache(tmp_path / "c")
    other = load_backbone(TINY_NAME, model_args=TINY, init_seed=1)
    save_file(other.model.state_dict(), str(weights))  # the same file, now holding other weights
    with pytest.raises(CacheStaleError, match=r"stale, backbone weights changed \(hash [0-9a-f]{12} in the cache, "):
        verify_cache(tmp_path / "c")
    assert verify_cache(tmp_path / "c", weights=False)["weights_checked"] is False
    assert "backbone weights changed" in TapCache(tmp_path / "c").mismatch(other, [0, 1, 2])


def test_incomplete_cache(vtab, tmp_path):
    def stop(chunk):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "c", vtab, on_chunk=stop)
    with pytest.raises(CacheIncompleteError, match="incomplete cache.*run `qtune cache build` again to resume"):
        verify_cache(tmp_path / "c")


def test_training_never_reads_a_chunk_that_fails_its_checksum(cache_dir, vtab):
    arr = np.load(cache_dir / block_file(1), mmap_mode="r")
    offset = arr.offset + 3 * arr[0].nbytes + 5  # a byte of row 3, in chunk 0
    del arr
    _flip(cache_dir / block_file(1), offset)
    bb = tiny_backbone()
    model = TunedModel.build(bb, "vqt", 4)
    served, _ = cached_splits(cache_dir, model, {"train": read_split(vtab / "trainval.txt")})
    order = list(range(len(served["train"])))
    batches = served["train"].iterate(order, 8, torch.device("cpu"))
    with pytest.raises(CacheCorruptError, match=rf"{block_file(1)}: corrupted, chunk 0"):
        next(batches)
