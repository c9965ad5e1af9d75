"""Training from an fp32 cache is training live: same seed and batch order give the same weights and logits.

Both paths draw the same random numbers (dropout, DropFeat) in the same order: loading images must not consume the
global RNG (ImageBatches gives its DataLoader a private generator), or the masks would differ.
"""
import pytest
from safetensors.torch import load_file

from qtune.cache import CachedBatches, TapCache
from qtune.data import ImageDataset, read_split
from qtune.engine.job import BackboneSpec, DataSpec, JobSpec, train_job
from qtune.data.batches import ImageBatches
from qtune.engine.config import TrainConfig
from qtune.engine.loop import fit
from qtune.engine.predict import predict
from qtune.tuned import TunedModel
from tests.cache.cachedata import build
from tests.conftest import TINY, TINY_NAME, tiny_backbone

RTOL = 1e-5


def _train(method, train, val, test, backbone):
    model = TunedModel.build(backbone, method, 4, seed=0)
    cfg = TrainConfig(epochs=3, batch_size=16, lr=3e-3, warmup_epochs=1, eval_every=1, progress=False, seed=3)
    fit(model, train, cfg, val)  # validation every epoch: evaluation must not disturb the training RNG either
    [logits], _ = predict([model], test, cfg)
    return {k: v.detach().clone() for k, v in model.trainable_parameters().items()}, logits


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _batches(vtab, cache, bb, source, stream=False):
    listings = [read_split(vtab / f) for f in ("train.txt", "val.txt", "test.txt")]
    if source == "live":
        return [ImageBatches(ImageDataset(lst, bb.preprocessing.transform())) for lst in listings]
    return [CachedBatches(cache, lst, range(bb.depth), stream=stream) for lst in listings]


@pytest.mark.parametrize("method", ["linear", "vqt", "synqt"])
def test_cache_training_equals_live_training(cache_dir, vtab, method):
    bb = tiny_backbone()
    cache = TapCache(cache_dir)
    live_w, live_logits = _train(method, *_batches(vtab, cache, bb, "live"), bb)
    cached_w, cached_logits = _train(method, *_batches(vtab, cache, bb, "cache"), bb)
    assert set(live_w) == set(cached_w)
    for name in live_w:
        assert _rel(cached_w[name], live_w[name]) <= RTOL, name
    assert _rel(cached_logits, live_logits) <= RTOL
    if method != "linear":  # training moved the weights: the comparison is not between two untouched inits
        init = TunedModel.build(bb, method, 4, seed=0).trainable_parameters()
        assert any(_rel(live_w[n], init[n].detach()) > 1e-3 for n in live_w)


@pytest.mark.parametrize("method", ["vqt", "synqt"])
def test_depth_streamed_training_equals_cached_training(cache_dir, vtab, method):
    bb = tiny_backbone()
    cache = TapCache(cache_dir)
    plain_w, plain_logits = _train(method, *_batches(vtab, cache, bb, "cache"), bb)
    stream_w, stream_logits = _train(method, *_batches(vtab, cache, bb, "cache", stream=True), bb)
    for name in plain_w:
        assert _rel(stream_w[name], plain_w[name]) <= RTOL, name
    assert _rel(stream_logits, plain_logits) <= RTOL


def test_train_job_with_a_cache_writes_the_live_run_checkpoint(cache_dir, vtab, tmp_path, capsys):
    def spec(out, **kw):
        cfg = TrainConfig(epochs=2, batch_size=16, lr=3e-3, warmup_epochs=1, progress=False)
        data = DataSpec(str(vtab / "train.txt"), str(vtab / "val.txt"), str(vtab / "test.txt"))
        return JobSpec(BackboneSpec(TINY_NAME, model_args=TINY, random_init=True), data, "synqt", {}, cfg, str(out), **kw)

    live = train_job(spec(tmp_path / "live"))
    assert "qtune cache build" in capsys.readouterr().out  # the live run is told what a cache would save
    cached = train_job(spec(tmp_path / "cached", cache=str(cache_dir), stream_blocks=True))
    assert cached["cache_used"] == {"train": True, "val": True, "test": True}
    assert capsys.readouterr().out == ""  # nothing fell back
    assert cached["test_accuracy"] == live["test_accuracy"]
    a = load_file(str(tmp_path / "live" / "checkpoint" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "cached" / "checkpoint" / "adapter.safetensors"))
    for name in a:
        assert _rel(b[name], a[name]) <= RTOL, name


@pytest.mark.parametrize("method", ["head2toe", "lst", "dtl", "dtl_plus"])
def test_block_points_from_the_cache_train_as_live(vtab, tmp_path, method):
    """Methods that read block points (pooled or per token) train from a cache holding them as they train live;
    a cache without them is refused, with the points named."""
    bb = tiny_backbone()
    points = TunedModel.build(bb, method, 4).points_read()
    build(tmp_path / "plain", vtab, blocks="none")
    plain = TapCache(tmp_path / "plain")
    assert "block points" in plain.mismatch(bb, (), points) and points[0].key in plain.mismatch(bb, (), points)
    build(tmp_path / "points", vtab, blocks="none", points=points)
    cache = TapCache(tmp_path / "points")
    assert cache.mismatch(bb, (), points) is None and cache.points == points
    live_w, live_logits = _train(method, *_batches(vtab, cache, bb, "live"), bb)
    listings = [read_split(vtab / f) for f in ("train.txt", "val.txt", "test.txt")]
    cached = [CachedBatches(cache, lst, (), points=points) for lst in listings]
    cached_w, cached_logits = _train(method, *cached, bb)
    for name in live_w:
        assert _rel(cached_w[name], live_w[name]) <= RTOL, name
    assert _rel(cached_logits, live_logits) <= RTOL
