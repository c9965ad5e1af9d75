"""DTL and DTL+: the frozen prefix read from block points plus the live blocks compute what the authors' single loop
over the whole stream computes; the side information starts at zero; options are checked."""
import pytest
import torch

from qtune.errors import ConfigError
from qtune.methods import create_method
from qtune.tuned import TunedModel
from tests.conftest import tiny_backbone


def _authors_loop(method, backbone, images):
    """The authors' forward, written independently of the method's: one pass over timm's own blocks, each block's
    low-rank map reading its input, the running sum fed back after every block from ``add_from`` on."""
    model = backbone.model
    x = backbone.embed(images)
    r = 0.0
    for i, blk in enumerate(model.blocks):
        r = r + x @ method.down[i].weight.T @ method.up[i].weight.T
        x = blk(x)
        if i >= method.add_from:
            z = r * torch.sigmoid(method.config.beta * r)
            if method.fuse is not None:
                b, n, d = z.shape
                side = int((n - 1) ** 0.5)
                grid = method.fuse(z[:, 1:].transpose(1, 2).reshape(b, d, side, side))
                z = torch.cat([z[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)
            x = x + z
    return method.head(model.norm(x[:, 1:].mean(dim=1)))


@pytest.mark.parametrize("name,add_from", [("dtl", 0), ("dtl", 1), ("dtl", 2), ("dtl_plus", 1), ("dtl_plus", 0)])
def test_prefix_from_points_and_live_blocks_compute_the_authors_loop(name, add_from):
    bb = tiny_backbone()
    model = TunedModel.build(bb, name, 5, {"add_from": add_from}, seed=0)
    torch.manual_seed(0)  # the test's own draws
    for b in model.method.up:  # B starts at zero: give the side information something to carry
        torch.nn.init.normal_(b.weight, std=0.5)
    assert model.method.live_blocks(bb) == tuple(range(add_from + 1, bb.depth))
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), _authors_loop(model.method, bb, images), rtol=1e-5, atol=1e-5)


def test_training_starts_from_the_backbones_mean_pooled_feature():
    bb = tiny_backbone()
    model = TunedModel.build(bb, "dtl_plus", 5, seed=0)
    torch.manual_seed(0)  # the test's own draws
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        x = bb.model.forward_features(images)  # ends in the final norm; the authors' pool norms after the mean
        expected = model.method.head(bb.model.norm(bb.model.blocks(bb.embed(images))[:, 1:].mean(dim=1)))
        torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model.method.head(x[:, 1:].mean(dim=1)), expected)


def test_only_the_blocks_above_add_from_are_read_live():
    bb = tiny_backbone()
    low = TunedModel.build(bb, "dtl", 5, {"add_from": 0})
    top = TunedModel.build(bb, "dtl", 5, {"add_from": 2})
    assert [p.blocks for p in low.points_read()] == [(0,), (0,)]
    assert [p.blocks for p in top.points_read()] == [(0,), (0, 1, 2)] and top.method.live_blocks(bb) == ()


def test_vitb_counts_match_the_authors_settings():
    """r = 2 on all 12 blocks: 36,864 CSN parameters (the "0.04 M" the V-PETL Bench lists for DTL); DTL+ adds
    a 3 x 3 depthwise kernel per channel."""
    from qtune.backbones import load_backbone

    bb = load_backbone("vit_base_patch16_224")
    head = 768 * 100 + 100
    assert TunedModel.build(bb, "dtl", 100).num_trainable() == 12 * 2 * 2 * 768 + head
    assert TunedModel.build(bb, "dtl_plus", 100).num_trainable() == 12 * 2 * 2 * 768 + 9 * 768 + head


def test_bad_options_are_refused_by_name():
    bb = tiny_backbone()
    for opts, msg in (({"add_from": 3}, "add_from must be in 0..2"), ({"add_from": -1}, "add_from"),
                      ({"rank": 0}, "rank"), ({"kernel": -1}, "kernel"), ({"pool": "max"}, "pool")):
        with pytest.raises(ConfigError, match=msg):
            create_method("dtl", bb, 3, opts)
