"""fit_many's contract: each model of a stack ends exactly where fit of its config alone ends."""
from __future__ import annotations

from dataclasses import fields

import pytest
import torch

from qtune.backbones import Taps
from qtune.engine.config import TrainConfig
from qtune.engine.loop import fit
from qtune.engine.predict import predict
from qtune.engine.many import SHARED, fit_many, fold_weights, models_per_stack, step_bytes
from qtune.engine.predict import accuracies
from qtune.errors import ConfigError
from qtune.tuned import TunedModel
from tests.conftest import tiny_backbone

N, CLASSES = 40, 4


class TapBatches:
    """Taps of N random images traced once, served like a cache."""

    def __init__(self, backbone, blocks, points=()):
        g = torch.Generator().manual_seed(0)
        images = torch.randn(N, 3, 32, 32, generator=g)
        self.labels_t = torch.arange(N) % CLASSES
        self.taps = backbone.trace(images, blocks, points)

    def __len__(self) -> int:
        return N

    def iterate(self, order, batch_size, device):
        for s in range(0, len(order), batch_size):
            i = torch.tensor(order[s:s + batch_size])
            t = self.taps
            points = {p: [x[i] for x in xs] for p, xs in t.points.items()}
            taps = Taps([k[i] for k in t.keys], [v[i] for v in t.values], t.pooled[i], t.blocks, points)
            yield taps, self.labels_t[i]

    def forward(self, model, taps):
        return model.forward_taps(taps)


CASES = {
    "linear": [{}, {}, {}],
    "vqt": [{"tokens": 2, "dropout": 0.1}] * 3,
    "synqt": [{"tokens": 2, "dropout": 0.1, "drop_feat": 0.3, "attn_scale": s, "ffn_scale": s, "feat_scale": s,
               "bottleneck": 8, "qsm_bottleneck": 4} for s in (0.1, 1.0, 0.5)],
    "head2toe": [{"target_size": 96}] * 3,
    "lst": [{"reduction": 4}] * 3,
    "dtl_plus": [{"rank": 2}] * 3,
}
TRAIN = dict(epochs=3, batch_size=16, warmup_epochs=1, shuffle_seed=5, progress=False)
PER_MODEL = [dict(lr=1e-3, weight_decay=1e-2, seed=0), dict(lr=3e-3, weight_decay=0.0, seed=1, optimizer="adam"),
             dict(lr=1e-2, weight_decay=1e-4, seed=2, optimizer="sgd", min_lr=1e-4)]


def _pair(backbone, method, options, seeds):
    build = [lambda o=o, s=s: TunedModel.build(backbone, method, CLASSES, o, seed=s) for o, s in zip(options, seeds)]
    return [b() for b in build], [b() for b in build]


# The stack computes what each model computes alone, in another summation order (batched products). In float64 that
# leaves nothing visible. In float32 the logits agree to 1e-5, and so do the weights, except where Adam divides
# rounding noise by its own size: a gradient that is exactly zero (a QSM key bias, to which softmax is blind) or tiny
# becomes a full-size step either way, so such weights wander apart by up to about lr per step (measured: 1.9e-4
# after 9 steps at lr 3e-3), without any effect on the logits.
TOLERANCE = {torch.float64: (1e-9, 1e-9), torch.float32: (1e-3, 1e-5)}  # (weights, logits)


@pytest.fixture(params=[torch.float32, torch.float64], ids=["fp32", "fp64"])
def dtype(request):
    before = torch.get_default_dtype()
    torch.set_default_dtype(request.param)
    yield request.param
    torch.set_default_dtype(before)


def _assert_same(stacked, alone, batches, dtype=torch.float32):
    weights_tol, logits_tol = TOLERANCE[dtype]
    for a, b in zip(stacked, alone):
        pa, pb = a.trainable_parameters(), b.trainable_parameters()
        assert pa.keys() == pb.keys()
        for n in pa:
            assert torch.allclose(pa[n], pb[n], atol=weights_tol, rtol=0), n
    cfg = TrainConfig(progress=False, batch_size=16)
    logits, _ = predict(stacked, batches, cfg)
    for g, b in enumerate(alone):
        assert torch.allclose(logits[g], predict([b], batches, cfg)[0][0], atol=logits_tol, rtol=0)


@pytest.mark.parametrize("method", CASES)
def test_stack_equals_sequential_fits(dtype, method):
    backbone = tiny_backbone()
    cfgs = [TrainConfig(**TRAIN, **hp) for hp in PER_MODEL]
    stacked, alone = _pair(backbone, method, CASES[method], [c.seed for c in cfgs])
    batches = TapBatches(backbone, stacked[0].blocks_read(), stacked[0].points_read())
    before = {n: p.clone() for n, p in stacked[0].trainable_parameters().items()}
    histories = fit_many(stacked, batches, cfgs)
    for model, cfg, history in zip(alone, cfgs, histories):
        reference = fit(model, batches, cfg)
        assert [round(h["train_loss"], 4) for h in history] == [round(h["train_loss"], 4) for h in reference]
    assert any(not torch.equal(before[n], p) for n, p in stacked[0].trainable_parameters().items())
    _assert_same(stacked, alone, batches, dtype)


@pytest.mark.parametrize("method", ["linear", "synqt"])
def test_folds_in_one_pass_equal_weighted_fits(backbone, method):
    weights, held = fold_weights((torch.arange(N) % CLASSES).tolist(), folds=4, seed=0)
    cfgs = [TrainConfig(**TRAIN, seed=3)] * 4
    options = [CASES[method][0]] * 4
    stacked, alone = _pair(backbone, method, options, [3] * 4)
    batches = TapBatches(backbone, stacked[0].blocks_read())
    fit_many(stacked, batches, cfgs, sample_weights=weights)
    for g, model in enumerate(alone):
        fit(model, batches, cfgs[g], sample_weight=weights[g])
    _assert_same(stacked, alone, batches)
    logits, labels = predict(stacked, batches, cfgs[0])
    acc = accuracies(logits, labels, held)
    assert acc == [(logits[g][held[g]].argmax(-1) == labels[held[g]]).float().mean().item() for g in range(4)]


def test_held_out_samples_do_not_train(backbone):
    """Changing a held-out sample's label changes nothing for the model that holds it out."""
    weights, held = fold_weights((torch.arange(N) % CLASSES).tolist(), folds=2, seed=1)
    runs = []
    for flip in (False, True):
        batches = TapBatches(backbone, ())
        if flip:
            batches.labels_t = torch.where(held[0], (batches.labels_t + 1) % CLASSES, batches.labels_t)
        models = [TunedModel.build(backbone, "linear", CLASSES, seed=0) for _ in range(2)]
        fit_many(models, batches, [TrainConfig(**TRAIN)] * 2, sample_weights=weights)
        runs.append([m.method.head.weight.detach().clone() for m in models])
    assert torch.equal(runs[0][0], runs[1][0])
    assert not torch.equal(runs[0][1], runs[1][1])


def test_folds_are_stratified_and_deterministic():
    labels = [0] * 30 + [1] * 20 + [2] * 10
    w1, held1 = fold_weights(labels, 5, seed=7)
    w2, held2 = fold_weights(labels, 5, seed=7)
    assert torch.equal(held1, held2) and torch.equal(w1, 1 - held1.float())
    assert torch.equal(held1.sum(0), torch.ones(60, dtype=torch.long))  # each sample held out exactly once
    y = torch.tensor(labels)
    for k in range(5):
        assert [int((y[held1[k]] == c).sum()) for c in range(3)] == [6, 4, 2]
    assert not torch.equal(held1, fold_weights(labels, 5, seed=8)[1])
    with pytest.raises(ConfigError, match="rarest has 1"):
        fold_weights([0, 0, 1], 2, seed=0)


def test_stack_refuses_mixed_structures_and_schedules(backbone):
    a = TunedModel.build(backbone, "vqt", CLASSES, {"tokens": 1})
    b = TunedModel.build(backbone, "vqt", CLASSES, {"tokens": 2})
    batches = TapBatches(backbone, a.blocks_read())
    with pytest.raises(ConfigError, match="share method"):
        fit_many([a, b], batches, [TrainConfig(**TRAIN)] * 2)
    c = TunedModel.build(backbone, "vqt", CLASSES, {"tokens": 1})
    with pytest.raises(ConfigError, match="share epochs"):
        fit_many([a, c], batches, [TrainConfig(**TRAIN), TrainConfig(**{**TRAIN, "epochs": 4})])
    with pytest.raises(ConfigError, match="share order_seed"):
        fit_many([a, c], batches, [TrainConfig(**{**TRAIN, "shuffle_seed": None}, seed=s) for s in (0, 1)])
    with pytest.raises(ConfigError, match="stream"):
        fit_many([TunedModel.build(backbone, "bitfit", CLASSES)], batches, [TrainConfig(**TRAIN)])
    assert set(SHARED) <= {f.name for f in fields(TrainConfig)}


def test_budget_bounds_the_stack(backbone):
    def build(seed):
        return TunedModel.build(backbone, "synqt", CLASSES, CASES["synqt"][0], seed=seed)

    batches = TapBatches(backbone, build(0).blocks_read())
    one, three = step_bytes([build(0)], batches, 16), step_bytes([build(g) for g in range(3)], batches, 16)
    assert three > one
    g = models_per_stack(build, batches, 16, budget=three, most=64)
    assert 2 <= g <= 4  # the two-point line predicts three models' bytes to within about one model
    assert models_per_stack(build, batches, 16, budget=1, most=64) == 1
    assert models_per_stack(build, batches, 16, budget=10**12, most=5) == 5


@pytest.mark.parametrize("method", ["vqt", "synqt"])
def test_a_stack_of_one_is_its_own_fit(backbone, method):
    """A stack of one runs without vmap and draws its dropout masks from its own generator, seeded as fit seeds the
    global RNG: the same weights and logits as fit, bit for bit."""
    cfg = TrainConfig(**TRAIN, **PER_MODEL[0])
    [stacked], [alone] = _pair(backbone, method, CASES[method][:1], [cfg.seed])
    batches = TapBatches(backbone, stacked.blocks_read())
    fit_many([stacked], batches, [cfg])
    fit(alone, batches, cfg)
    for name, p in stacked.trainable_parameters().items():
        assert torch.equal(p, alone.trainable_parameters()[name]), name
    assert torch.equal(predict([stacked], batches, cfg)[0][0], predict([alone], batches, cfg)[0][0])


@pytest.mark.parametrize("method", ["linear", "synqt"])
def test_stopped_at_a_rung_and_continued_in_a_smaller_stack(dtype, method, tmp_path):
    """Successive halving's contract: models stopped after epoch 1 of 3 (their states saved) and continued, some of
    them, in a smaller stack, end where the uninterrupted stack ends; a fresh start ignores states that disagree."""
    backbone = tiny_backbone()
    cfgs = [TrainConfig(**TRAIN, **hp) for hp in PER_MODEL]
    options = CASES[method]
    full, rung = _pair(backbone, method, options, [c.seed for c in cfgs])
    batches = TapBatches(backbone, full[0].blocks_read(), full[0].points_read())
    whole = fit_many(full, batches, cfgs)
    states = [tmp_path / f"{g}.safetensors" for g in range(3)]
    fit_many(rung, batches, cfgs, states=states, until=1)
    assert all(p.is_file() for p in states)
    survivors = [0, 2]
    rest = fit_many([rung[g] for g in survivors], batches, [cfgs[g] for g in survivors],
                    states=[states[g] for g in survivors])
    assert [len(h) for h in rest] == [3, 3]  # the history goes on from the saved one
    assert [round(h["train_loss"], 4) for h in rest[1]] == [round(h["train_loss"], 4) for h in whole[2]]
    _assert_same([rung[g] for g in survivors], [full[g] for g in survivors], batches, dtype)
    # a model stopped at epoch 1 scores differently from one trained to the end: the rung is a real stop
    assert not torch.allclose(rung[1].trainable_parameters()[next(iter(rung[1].trainable_parameters()))],
                              full[1].trainable_parameters()[next(iter(full[1].trainable_parameters()))])
    fresh, _ = _pair(backbone, method, options[:2], [c.seed for c in cfgs[:2]])
    states[1].unlink()  # one state lost: both start from the beginning, as the uninterrupted run did
    fit_many(fresh, batches, cfgs[:2], states=states[:2])
    _assert_same(fresh[:1], full[:1], batches, dtype)


def test_fit_stops_at_a_rung_and_goes_on(backbone, tmp_path):
    cfg = TrainConfig(**TRAIN, **PER_MODEL[0])
    a, b = _pair(backbone, "vqt", CASES["vqt"][:1], [cfg.seed])
    batches = TapBatches(backbone, a[0].blocks_read())
    fit(a[0], batches, cfg)
    state = tmp_path / "state.safetensors"
    assert len(fit(b[0], batches, cfg, state=state, until=2)) == 2
    assert len(fit(b[0], batches, cfg, state=state)) == 3
    for name, p in b[0].trainable_parameters().items():
        assert torch.equal(p, a[0].trainable_parameters()[name]), name
