"""SynQT's ``drop_path``: the authors' training-time stochastic depth (timm's 0 -> rate ramp over the blocks) on the
frozen stream and on the queries' A/M branches, traced live; nothing changes in eval mode or at drop_path = 0."""
from __future__ import annotations

import pytest
import timm
import torch

from qtune.cache import TapCache, batches_for, cached_splits, what_is_read
from qtune.data import ImageDataset, read_split
from qtune.data.batches import ImageBatches
from qtune.engine.config import TrainConfig
from qtune.engine.loop import fit
from qtune.engine.many import ModelStack, fit_many
from qtune.errors import ConfigError
from qtune.experiments.planner import Plan, groups
from qtune.experiments.spec import load_spec
from qtune.experiments.store import Store, Trial
from qtune.experiments.sweep import run_sweep
from qtune.tuned import TunedModel
from tests.backbones.test_stages import convnext
from tests.cache.cachedata import build, make_vtab
from tests.conftest import TINY, tiny_backbone
from tests.experiments.test_sweep import write_spec

SMALL = {"tokens": 2, "bottleneck": 8, "qsm_bottleneck": 4}


def _model(bb, seed=0, **options):
    return TunedModel.build(bb, "synqt", 4, {**SMALL, **options}, seed=seed)


def _images(n=8, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _logits(model, x, seed):
    torch.manual_seed(seed)
    return model(x)


def test_rates_follow_timms_ramp_over_the_blocks():
    bb = tiny_backbone(depth=5)
    m = _model(bb, drop_path=0.1).method
    timm_vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TINY, "depth": 5}, drop_path_rate=0.1)
    timm_rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in timm_vit.blocks]
    assert m.drop_rates == pytest.approx(timm_rates) and m.drop_rates == pytest.approx([0, 0.025, 0.05, 0.075, 0.1])
    assert _model(bb).method.drop_rates == (0.0,) * 5


def test_training_passes_each_blocks_rate_to_the_stream_and_the_queries_eval_none(monkeypatch):
    bb = tiny_backbone(depth=4)
    model = _model(bb, drop_path=0.3, trainable_blocks=3)
    traced, queried = [], []
    trace, query = bb.trace, bb.query_block
    monkeypatch.setattr(bb, "trace", lambda *a, **k: traced.append(k.get("drop_path")) or trace(*a, **k))
    monkeypatch.setattr(bb, "query_block", lambda i, *a, **k: queried.append((i, k["drop_path"])) or query(i, *a, **k))
    x = _images(4)
    model.train()
    model(x)
    assert traced == [pytest.approx((0.0, 0.1, 0.2, 0.3))]  # the whole stream ramps, queries or not
    assert queried == [(1, pytest.approx(0.1)), (2, pytest.approx(0.2)), (3, pytest.approx(0.3))]
    traced.clear()
    queried.clear()
    model.eval()
    model(x)
    assert traced == [None] and [r for _, r in queried] == [0.0, 0.0, 0.0]


def test_stream_drop_path_drops_whole_branches_per_sample_without_autograd():
    bb = tiny_backbone()
    x = bb.embed(_images(16))
    torch.manual_seed(0)
    out, _, _ = bb.block_forward(1, x, drop_path=0.5)
    unchanged = (out == x).flatten(1).all(1)  # both branches dropped: the sample's X_i is X_{i-1}
    assert unchanged.any() and not unchanged.all()
    assert torch.equal(bb.block_forward(1, x, drop_path=0.0)[0], bb.block_forward(1, x)[0])
    images = _images(16)
    plain = bb.trace(images)
    torch.manual_seed(0)
    dropped = bb.trace(images, drop_path=[0.0, 0.5, 0.5])
    # block 0's rate is 0, so X_1 and the K/V of blocks 0 and 1 are the plain stream's; block 2 reads a perturbed X_2
    for j in (0, 1):
        assert torch.equal(dropped.keys[j], plain.keys[j]) and torch.equal(dropped.values[j], plain.values[j])
    assert not torch.equal(dropped.keys[2], plain.keys[2])
    assert not any(t.requires_grad for t in (*dropped.keys, *dropped.values))
    with pytest.raises(ConfigError, match="2 rates for a 3-block backbone"):
        bb.trace(images, drop_path=[0.1, 0.1])


def test_query_branches_are_dropped_per_sample_and_rescaled():
    bb = tiny_backbone()
    taps = bb.trace(_images(16))
    t = torch.randn(16, 2, bb.dim, requires_grad=True)
    plain = taps.query(bb, 1, t)
    torch.manual_seed(0)
    a, m, h = taps.query(bb, 1, t, drop_path=0.5)
    dropped = (a == 0).flatten(1).all(1)  # all n tokens of a sample together
    assert dropped.any() and not dropped.all()
    torch.testing.assert_close(a[~dropped], plain.attn[~dropped] / 0.5)
    assert torch.equal(h, t + a + m)
    h.sum().backward()
    assert t.grad is not None and not any(p.grad is not None for p in bb.parameters())


def test_zero_adds_nothing_the_option_changes_training_only():
    bb = tiny_backbone()
    x = _images()
    plain, zero, dp = _model(bb), _model(bb, drop_path=0.0), _model(bb, drop_path=0.1)
    for m in (plain, zero, dp):
        m.train()
    # drop_path = 0: the plain trace and no extra random draw (the RNG ends where it ends without the option)
    torch.manual_seed(3)
    ref = plain.forward_taps(bb.trace(x, plain.blocks_read()))
    after = torch.get_rng_state()
    assert torch.equal(_logits(zero, x, 3), ref) and torch.equal(torch.get_rng_state(), after)
    # > 0: training outputs depend on the seed and differ from drop_path = 0 under the same seed
    assert torch.equal(_logits(dp, x, 3), _logits(dp, x, 3))
    assert not torch.equal(_logits(dp, x, 3), _logits(dp, x, 4))
    assert not torch.equal(_logits(dp, x, 3), ref)
    # eval: deterministic, exactly drop_path = 0's logits for the same weights
    assert all(torch.equal(p, q) for p, q in zip(dp.method.parameters(), plain.method.parameters()))
    dp.eval()
    plain.eval()
    assert torch.equal(dp(x), plain(x)) and torch.equal(dp(x), _logits(dp, x, 9))


def test_the_cache_is_refused_with_a_note_and_the_split_traced_live(shapes, tmp_path):
    vtab = make_vtab(tmp_path / "vtab", shapes)
    build(tmp_path / "cache", vtab)
    bb = tiny_backbone()
    splits = {"train": read_split(vtab / "train.txt")}
    served, notes = cached_splits(tmp_path / "cache", _model(bb), splits)
    assert "train" in served and not notes  # the same cache serves drop_path = 0
    batches, notes = batches_for(_model(bb, drop_path=0.1), tmp_path / "cache", splits)
    assert isinstance(batches["train"], ImageBatches)
    assert notes == [f"qtune: cache {tmp_path / 'cache'} not used: drop_path=0.1 needs live tracing (stochastic "
                     "depth changes the frozen stream's K/V every step); tracing live"]
    # a cache planned for such candidates stores nothing for them
    assert what_is_read(bb, [("synqt", {**SMALL, "drop_path": 0.1})], 4) == ((), ())
    assert what_is_read(bb, [("synqt", SMALL)], 4)[0] == (0, 1, 2)


def _live_batches(shapes):
    listing = read_split(shapes / "train")
    listing = listing.select([i % 6 == 0 for i in range(len(listing.samples))])  # 27 of the 160 images
    return ImageBatches(ImageDataset(listing, tiny_backbone().preprocessing.transform()))


TRAIN = dict(epochs=2, batch_size=8, warmup_epochs=1, lr=3e-3, shuffle_seed=5, progress=False)


def test_same_seed_same_weights_and_a_stack_trains_one_model_at_a_time(shapes):
    batches = _live_batches(shapes)
    bb = tiny_backbone()
    cfgs = [TrainConfig(**TRAIN, seed=s) for s in (0, 1)]
    alone = [_model(bb, seed=c.seed, drop_path=0.1) for c in cfgs]
    for m, c in zip(alone, cfgs):
        fit(m, batches, c)
    again = _model(bb, seed=0, drop_path=0.1)
    fit(again, batches, cfgs[0])
    weights = [m.trainable_parameters() for m in (*alone, again)]
    assert all(torch.equal(p, weights[2][n]) for n, p in weights[0].items())
    assert any(not torch.equal(p, weights[1][n]) for n, p in weights[0].items())
    # fit_many (a sweep's stack) trains such models one after another, each exactly as fit alone
    stacked = [_model(bb, seed=c.seed, drop_path=0.1) for c in cfgs]
    seen = []
    fit_many(stacked, batches, cfgs, on_epoch=lambda e, records: seen.append((e, len(records))))
    assert seen == [(1, 1), (2, 1)] * 2
    for m, ref in zip(stacked, weights):
        assert all(torch.equal(p, ref[n]) for n, p in m.trainable_parameters().items())
    with pytest.raises(ConfigError, match="drop_path=0.1 needs live tracing .* one at a time"):
        ModelStack(stacked).losses(_images(2), torch.tensor([0, 1]), None)


def test_refused_where_it_cannot_act():
    with pytest.raises(ConfigError, match=r"drop_path must be in \[0, 1\) \(got 1.0\)"):
        _model(tiny_backbone(), drop_path=1.0)
    with pytest.raises(ConfigError, match="vpt_deep\\+synqt: drop_path=0.1 needs live tracing .* from the vpt_deep "
                                          "stream; use it with synqt alone"):
        TunedModel.build(tiny_backbone(), "vpt_deep+synqt", 4, {"synqt.drop_path": 0.1})
    with pytest.raises(ConfigError, match="drop_path=0.1 needs a plain ViT's block stream, not backbone "
                                          "'convnext_tiny' \\(convnext\\); use drop_path=0 there"):
        TunedModel.build(convnext(), "synqt", 4, {"drop_path": 0.1})


def _trial(key, options, **train):
    return Trial(key, "t", "synqt", "fold", 0, 0, 0,
                 {"method": "synqt", "options": options, "train": {"device": "cpu", "epochs": 3, **train}})


def test_a_sweep_neither_stacks_nor_caches_for_it(task, tmp_path):
    trials = [_trial("a", {"drop_path": 0.1}, lr=0.1), _trial("b", {"drop_path": 0.1}, lr=0.01),
              _trial("c", {}, lr=0.1), _trial("d", {}, lr=0.01)]
    assert sorted(sorted(t.key for t in g) for g in groups(trials).values()) == [["a"], ["b"], ["c", "d"]]
    options = "options = { tokens = 1, bottleneck = 8, qsm_bottleneck = 4, drop_path = 0.1 }"
    spec = write_spec(tmp_path / "s.toml", task, epochs=1, selection="val", methods=f"""
[methods.linear]
[methods.synqt]
{options}
grid = {{ lr = [0.01, 0.001] }}
""")
    plan = Plan(load_spec(spec), tmp_path / "plan")
    assert not plan.reads_cache("synqt") and plan.reads_cache("linear")
    assert plan.reads["shapes4"] == ((), ())  # the task's cache holds what the linear probe reads, no K/V
    h = run_sweep(spec, tmp_path / "run", jobs=1, progress=False)
    trials = Store(tmp_path / "run" / "store.sqlite").trials(h)
    assert all(t.state == "done" for t in trials)
    assert sorted(t.method for t in trials if t.kind == "final") == ["linear"] * 2 + ["synqt"] * 2
    assert TapCache(Plan(load_spec(spec), tmp_path / "run").cache_dir("shapes4")).blocks == ()


def test_qtune_train_with_a_cache_traces_live_and_says_why(shapes, tmp_path, capsys):
    from qtune.cli import main
    from tests.test_cli import BACKBONE, _train

    assert main(["cache", "build", *BACKBONE, "--data", str(shapes / "train"), "--out", str(tmp_path / "c"),
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(_train(shapes, tmp_path, "-O", "tokens=2", "-O", "drop_path=0.1", "--cache", str(tmp_path / "c"))) == 0
    out = capsys.readouterr().out
    assert f"qtune: cache {tmp_path / 'c'} not used: drop_path=0.1 needs live tracing" in out
    assert "qtune cache build" not in out  # no advice to cache what a cache cannot serve
    ckpt = str(tmp_path / "run" / "checkpoint")
    evals = []
    for _ in range(2):  # eval mode: no drop path, the same accuracy every time
        assert main(["eval", "--checkpoint", ckpt, "--data", str(shapes / "test"), "--quiet"]) == 0
        evals.append(capsys.readouterr().out)
    assert evals[0] == evals[1]
