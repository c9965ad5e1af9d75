"""int8 caches: K/V quantised with per-token fp16 scales, scale files built, resumed and verified like the others, and a
trained model reading them gives nearly the logits it gives from an fp32 cache."""
import json

import numpy as np
import pytest
import torch

from qtune.cache import CachedBatches, TapCache, verify_cache
from qtune.cache.manifest import MANIFEST, block_file, read_manifest, scale_file
from qtune.cache.quant import SCALE_LAYOUTS, quantise, roundtrip, scale_shape
from qtune.cli import main
from qtune.data import read_split
from qtune.engine.config import TrainConfig
from qtune.engine.loop import fit
from qtune.engine.predict import predict
from qtune.errors import CacheCorruptError, CacheError
from qtune.memory.units import format_bytes
from qtune.tuned import TunedModel
from tests.cache.cachedata import CHUNK, build
from tests.cache.test_cache_build import _live_and_cached
from tests.cache.test_cache_cli import _build, _error, _train
from tests.cache.test_cache_resume import _data_files
from tests.cache.test_cache_verify import _flip
from tests.conftest import tiny_backbone


def _kv(seed: int = 0) -> torch.Tensor:
    """K/V-like values (B, 2, H, N, hd): unit noise, one outlier channel per head, one loud token, an all-zero
    token (its scale is 0)."""
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(4, 2, 3, 17, 16, generator=g)
    kv[..., 5] *= 20
    kv[:, :, :, 3] *= 8
    kv[:, :, :, 9] = 0
    return kv


@pytest.mark.parametrize("layout", SCALE_LAYOUTS)
def test_roundtrip_error_is_at_most_half_a_step(layout):
    kv = _kv()
    q, s = quantise(kv, layout)
    assert q.dtype == np.int8 and s.dtype == np.float16
    assert list(s.shape) == scale_shape(list(kv.shape), layout) and np.abs(q).max() == 127
    back = roundtrip(kv, layout)
    assert back.dtype == torch.float32 and back.shape == kv.shape
    step = torch.from_numpy(s).float().unsqueeze(3 if layout == "channel" else 4)
    assert ((back - kv).abs() <= step / 2 * (1 + 1e-6) + 1e-12).all()
    if layout == "token":
        assert torch.equal(back[:, :, :, 9], kv[:, :, :, 9])  # a zero token stays zero
    # relative to each group's largest value: within half of one of 254 steps
    rel = (back - kv).abs().amax() / kv.abs().amax()
    assert rel <= 0.5 / 127 * 1.01


def test_int8_cache_builds_reads_and_sizes(vtab, tmp_path):
    bb = tiny_backbone()
    m = build(tmp_path / "c", vtab, "int8").manifest
    assert m["dtype"] == "int8" and m["format_version"] == 2 and m["quantisation"]["scale_layout"] == "token"
    names = sorted(p.name for p in (tmp_path / "c").glob("*.npy"))
    assert names == sorted([block_file(b) for b in range(3)] + [scale_file(b) for b in range(3)] + ["pooled.npy"])
    assert set(m["digests"]) == set(names)  # every file, scales too, checksummed per chunk
    scales = 2 * bb.num_heads * bb.num_tokens * 2  # per block: K/V x heads x tokens, fp16
    assert m["bytes_per_sample"] == bb.kv_bytes_per_sample(bytes_per_value=1) + bb.depth * scales + 2 * bb.dim
    assert m["bytes"] == sum((tmp_path / "c" / n).stat().st_size for n in names)
    assert np.load(tmp_path / "c" / "pooled.npy", mmap_mode="r").dtype == np.float16  # floats stay fp16
    fp32 = build(tmp_path / "f", vtab, "fp32").manifest
    assert fp32["format_version"] == 1 and "quantisation" not in fp32  # other caches are written as before

    listing = read_split(vtab / "test.txt")
    taps, _, live, _ = _live_and_cached(TapCache(tmp_path / "c"), listing, list(range(16)), bb)
    assert taps.pooled.dtype == torch.float32
    torch.testing.assert_close(taps.pooled, live.pooled.half().float())
    for i in range(bb.depth):
        got, want = torch.stack(taps.kv(i), 1), torch.stack([live.keys[i], live.values[i]], 1)
        assert got.dtype == torch.float32
        assert torch.equal(got, roundtrip(want, "token"))  # the build's quantisation, read back exactly
        assert (got - want).abs().amax() <= 0.5 / 127 * want.abs().amax() * 1.01


def test_int8_build_resumes_to_the_same_bytes_and_redoes_a_damaged_scale_chunk(vtab, tmp_path):
    def stop(chunk):
        if chunk == 1:
            raise KeyboardInterrupt

    out = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        build(out, vtab, "int8", on_chunk=stop)
    scales = np.load(out / scale_file(1), mmap_mode="r+")
    scales[40] = 0  # row 40 is in chunk 1, which was recorded
    scales.flush()
    del scales
    report = build(out, vtab, "int8")
    assert report.resumed_at_chunk == 1
    whole = build(tmp_path / "whole", vtab, "int8")
    assert _data_files(out) == _data_files(tmp_path / "whole")
    assert json.loads((out / MANIFEST).read_text())["digests"] == whole.manifest["digests"]


def test_verify_checks_the_scale_files(vtab, tmp_path):
    out = tmp_path / "c"
    build(out, vtab, "int8")
    assert verify_cache(out)["dtype"] == "int8"
    arr = np.load(out / scale_file(2), mmap_mode="r")
    offset = arr.offset + 70 * arr[0].nbytes + 3  # row 70: chunk 2
    del arr
    _flip(out / scale_file(2), offset)
    with pytest.raises(CacheCorruptError, match=rf"{scale_file(2)}: corrupted, chunk 2 \(rows {2 * CHUNK}-79\)"):
        verify_cache(out)
    _flip(out / scale_file(2), offset)
    verify_cache(out)
    path = out / scale_file(0)
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(CacheCorruptError, match=rf"{scale_file(0)}: truncated or resized"):
        TapCache(out)


def test_a_cache_of_an_unknown_format_version_is_refused(cache_dir):
    m = json.loads((cache_dir / MANIFEST).read_text())
    (cache_dir / MANIFEST).write_text(json.dumps({**m, "format_version": 3}))
    with pytest.raises(CacheError, match="cache format version 3 \\(this qtune reads 1, 2; rebuild the cache\\)"):
        read_manifest(cache_dir)


def _train_and_predict(method, cache, vtab, bb, test_cache=None):
    listings = {s: read_split(vtab / f"{s}.txt") for s in ("train", "test")}
    model = TunedModel.build(bb, method, 4, seed=0)
    cfg = TrainConfig(epochs=4, batch_size=16, lr=3e-3, warmup_epochs=1, progress=False, seed=3)
    fit(model, CachedBatches(cache, listings["train"], range(bb.depth)), cfg)
    out = []
    for c in (cache, test_cache or cache):
        [logits], _ = predict([model], CachedBatches(c, listings["test"], range(bb.depth)), cfg)
        out.append(logits)
    return out


@pytest.mark.parametrize("method", ["vqt", "synqt"])
def test_a_trained_model_reads_int8_nearly_as_fp32(vtab, tmp_path, method):
    bb = tiny_backbone()
    build(tmp_path / "f", vtab, "fp32")
    build(tmp_path / "q", vtab, "int8")
    fp32, int8 = TapCache(tmp_path / "f"), TapCache(tmp_path / "q")
    # the same weights, test K/V read from either cache
    from_fp32, from_int8 = _train_and_predict(method, fp32, vtab, bb, test_cache=int8)
    scale = from_fp32.abs().amax()
    assert (from_int8 - from_fp32).abs().amax() <= 0.02 * scale
    assert torch.equal(from_int8.argmax(1), from_fp32.argmax(1))
    # trained on int8 too: the weights move a little, the logits stay close
    trained_int8, _ = _train_and_predict(method, int8, vtab, bb)
    assert (trained_int8 - from_fp32).abs().amax() <= 0.05 * scale


def test_cli_builds_int8_and_rejects_int8_training(vtab, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(_build(vtab, cache, "--method", "synqt", "--dtype", "int8")) == 0
    out = capsys.readouterr().out
    per_image = TapCache(cache).manifest["bytes_per_sample"]  # K/V, scales and pooled feature
    assert "80 images, blocks 0-2 (3 of 3), int8" in out and f"{format_bytes(per_image)} per image" in out
    assert main(["cache", "verify", str(cache), "--quiet"]) == 0
    assert "int8" in capsys.readouterr().out
    assert main(_train(vtab, tmp_path / "run", "--cache", str(cache))) == 0
    assert json.loads((tmp_path / "run" / "result.json").read_text())["cache_used"]["train"] is True
    capsys.readouterr()
    err = _error(capsys, _train(vtab, tmp_path / "r2", "--precision", "int8"))
    assert "precision 'int8': choose from fp32, bf16, fp16" in err
