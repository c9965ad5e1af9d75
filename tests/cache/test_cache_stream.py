"""Depth-streamed taps: in forward and in backward, at most one block's K/V of the batch are alive at a time."""
import weakref

import pytest
import torch
import torch.nn.functional as F

from qtune.backbones import load_backbone
from qtune.cache import TapCache
from qtune.data import read_split
from qtune.tuned import TunedModel
from tests.cache.cachedata import build
from tests.conftest import TINY, TINY_NAME

CPU = torch.device("cpu")


class AliveKV:
    """Counts the block K/V tensors read from the cache that are still alive, and the most alive at once."""

    def __init__(self, cache: TapCache):
        self.alive = self.peak = self.reads = 0
        read = cache.read_block

        def counted(*args, **kwargs):
            k, v = read(*args, **kwargs)
            base = k._base if k._base is not None else k  # k, v: views of one gathered (B, 2, H, N, hd) tensor
            self.alive += 1
            self.reads += 1
            self.peak = max(self.peak, self.alive)
            weakref.finalize(base, self._freed)
            return k, v

        cache.read_block = counted

    def _freed(self):
        self.alive -= 1


def _step(model, taps, y):
    F.cross_entropy(model.forward_taps(taps), y).backward()


@pytest.fixture
def deep(vtab, tmp_path):
    """A 6-block backbone and its cache."""
    bb = load_backbone(TINY_NAME, model_args={**TINY, "depth": 6})
    build(tmp_path / "deep", vtab, backbone=bb, backbone_source=None)
    return bb, TapCache(tmp_path / "deep"), read_split(vtab / "train.txt")


@pytest.mark.parametrize("method", ["vqt", "synqt"])
def test_one_block_of_kv_alive_at_a_time(deep, method):
    bb, cache, listing = deep
    rows = cache.rows_for(listing)[:16]
    y = torch.tensor(listing.labels[:16])
    model = TunedModel.build(bb, method, 4).train()

    counter = AliveKV(cache)
    _step(model, cache.taps(rows, range(bb.depth), CPU, stream=True), y)
    assert counter.peak == 1 and counter.alive == 0
    assert counter.reads == 2 * bb.depth  # each block read in forward, and again in backward

    counter = AliveKV(cache)
    _step(model, cache.taps(rows, range(bb.depth), CPU, stream=False), y)
    assert counter.peak == bb.depth  # without streaming every block's K/V lives until backward is done


def test_streamed_step_saves_no_kv_for_backward(deep):
    bb, cache, listing = deep
    rows = cache.rows_for(listing)[:16]
    y = torch.tensor(listing.labels[:16])
    model = TunedModel.build(bb, "synqt", 4).train()
    kv_shape = (16, bb.num_heads, bb.num_tokens, bb.dim // bb.num_heads)
    for stream in (False, True):
        shapes: list[tuple[int, ...]] = []

        def pack(t, shapes=shapes):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(model.forward_taps(cache.taps(rows, range(bb.depth), CPU, stream=stream)), y)
        loss.backward()
        # K and V of every block saved for backward (in whatever layout the attention's backward keeps them), or
        # none of them (re-read inside the checkpoint instead)
        kv_numel = torch.Size(kv_shape).numel()
        kv_saved = sum(torch.Size(s).numel() == kv_numel for s in shapes)
        assert kv_saved == (0 if stream else 2 * bb.depth)


def _queries_saved(model, taps, y):
    """How many (B, n, D) tensors (queries and their adapters' activations) autograd keeps outside checkpoints."""
    b, n, d = y.shape[0], model.method.config.tokens, model.backbone.dim
    count = 0

    def pack(t):
        nonlocal count
        count += tuple(t.shape) == (b, n, d)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model.forward_taps(taps), y)
    loss.backward()
    return count


def test_streamed_synqt_recomputes_each_blocks_side_path_instead_of_keeping_it(deep):
    """Streamed, a block's QSM, input projection and query run inside that block's checkpoint with its K/V read:
    backward recomputes them, and none of their (B, n, D) activations is kept; K/V are still read twice per block."""
    bb, cache, listing = deep
    rows = cache.rows_for(listing)[:16]
    y = torch.tensor(listing.labels[:16])
    model = TunedModel.build(bb, "synqt", 4).train()
    assert _queries_saved(model, cache.taps(rows, range(bb.depth), CPU, stream=False), y) >= 10 * bb.depth
    counter = AliveKV(cache)
    assert _queries_saved(model, cache.taps(rows, range(bb.depth), CPU, stream=True), y) == 0
    assert counter.peak == 1 and counter.reads == 2 * bb.depth


def test_streamed_synqt_with_per_model_masks_equals_plain_taps(deep):
    """Masks drawn from a model's own generator (a stack of one, engine.many) are not rewound by a checkpoint, so
    streamed taps then run the side path as is: the same masks, the same gradients as plain taps."""
    from qtune.methods.masks import per_model_generators

    bb, cache, listing = deep
    rows = cache.rows_for(listing)[:16]
    y = torch.tensor(listing.labels[:16])
    model = TunedModel.build(bb, "synqt", 4).train()
    grads = []
    for stream in (False, True):
        model.zero_grad(set_to_none=True)
        with per_model_generators([torch.Generator().manual_seed(5)]):
            F.cross_entropy(model.forward_taps(cache.taps(rows, range(bb.depth), CPU, stream=stream)), y).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
