"""Block points: what the trace keeps beyond K/V is the block's own computation, pooled as Head2Toe pools."""
import pytest
import torch

from qtune.backbones import Point
from qtune.errors import ConfigError
from tests.conftest import tiny_backbone


def test_points_are_the_blocks_own_tensors_and_leave_the_stream_unchanged():
    bb = tiny_backbone()
    x = torch.randn(3, 3, 32, 32)
    names = ("input", "x", "pre_attn", "attn", "mlp_hidden", "mlp_out")
    points = [Point(n, (0, 1)) for n in names]
    plain, taps = bb.trace(x), bb.trace(x, None, points)
    assert torch.equal(plain.pooled, taps.pooled)
    assert all(torch.equal(a, b) for a, b in zip(plain.keys + plain.values, taps.keys + taps.values))
    seen = {}
    blk = bb.model.blocks[1]
    hooks = [blk.norm1.register_forward_hook(lambda m, i, o: seen.update(pre_attn=o, input=i[0])),
             blk.mlp.act.register_forward_hook(lambda m, i, o: seen.update(mlp_hidden=o)),
             blk.register_forward_hook(lambda m, i, o: seen.update(x=o))]
    with torch.no_grad():
        bb.model.forward_features(x)
    for h in hooks:
        h.remove()
    got = {p.name: taps.points[p][1] for p in points}
    for name in ("input", "pre_attn", "mlp_hidden", "x"):
        torch.testing.assert_close(got[name], seen[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(got["input"] + got["attn"] + got["mlp_out"], got["x"], rtol=0, atol=1e-5)


def test_head2toe_pooling_averages_windows_of_tokens_to_the_target_size():
    t = torch.arange(2 * 10 * 4, dtype=torch.float32).reshape(2, 10, 4)
    p = Point("attn", (0,), pool=12)  # 12 / 4 = 3 windows wanted -> windows of int(10 / 3) = 3 tokens, 3 of them
    out = p.pool_tokens(t)
    assert out.shape == (2, 12) and p.width(10, 4) == 12
    torch.testing.assert_close(out[:, :4], t[:, :3].mean(1))
    torch.testing.assert_close(out[:, 8:], t[:, 6:9].mean(1))  # the 10th token is left out, as the authors' pooling
    wide = Point("attn", (0,), pool=3)  # channels >= target: one global mean
    torch.testing.assert_close(wide.pool_tokens(t), t.mean(1))
    assert Point("x", (0,)).pool_tokens(t) is t


def test_bad_points_are_named():
    with pytest.raises(ConfigError, match="unknown block point 'mlp'"):
        Point("mlp", (0,))
    with pytest.raises(ConfigError, match="outside"):
        tiny_backbone().trace(torch.randn(1, 3, 32, 32), None, [Point("x", (0, 7))])
