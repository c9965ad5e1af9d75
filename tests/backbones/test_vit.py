import pytest
import torch

from tests.conftest import tiny_backbone

VARIANTS = {
    "plain": {},
    "layerscale_qknorm": {"init_values": 0.1, "qk_norm": True},
    "avgpool_fcnorm": {"global_pool": "avg", "fc_norm": True, "class_token": False},
    "registers": {"reg_tokens": 2},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_trace_matches_timm_forward(variant):
    bb = tiny_backbone(**VARIANTS[variant])
    x = torch.randn(3, 3, 32, 32)
    taps = bb.trace(x)
    ref = bb.model.forward_head(bb.model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(taps.pooled, ref, rtol=1e-5, atol=1e-5)
    assert len(taps.keys) == bb.depth and taps.keys[0].shape == (3, bb.num_heads, bb.num_tokens, bb.dim // bb.num_heads)
    assert not taps.pooled.requires_grad


@pytest.mark.parametrize("variant", VARIANTS)
def test_query_block_on_stream_tokens_is_the_block(variant):
    """Queries equal to the stream's own tokens, attending over its K/V, reproduce the block exactly."""
    bb = tiny_backbone(**VARIANTS[variant])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = bb.embed(x)
        for i, blk in enumerate(bb.model.blocks):
            nxt, k, v = bb.block_forward(i, h)
            torch.testing.assert_close(bb.query_block(i, h, k, v).out, blk(h), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(nxt, blk(h), rtol=1e-5, atol=1e-5)
            h = nxt


def test_queries_are_one_way(backbone):
    """A query's output depends on neither the other queries nor on itself being in the stream."""
    x = torch.randn(2, 3, 32, 32)
    taps = backbone.trace(x)
    q = torch.randn(2, 5, backbone.dim)
    full = backbone.query_block(1, q, *taps.kv(1)).out
    alone = backbone.query_block(1, q[:, 2:3], *taps.kv(1)).out
    torch.testing.assert_close(full[:, 2:3], alone)
    torch.testing.assert_close(backbone.trace(x).pooled, taps.pooled)


def test_trace_keeps_only_requested_blocks(backbone):
    taps = backbone.trace(torch.randn(1, 3, 32, 32), blocks=[2, 0])
    assert taps.blocks == (0, 2) and len(taps.keys) == 2
    with pytest.raises(ValueError):
        taps.kv(1)


def test_backbone_is_frozen_and_stays_in_eval(backbone):
    assert not any(p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not backbone.training and not backbone.model.training


def test_preprocessing_follows_model_and_overrides():
    bb = tiny_backbone()
    assert bb.preprocessing.input_size == (32, 32)
    bb = tiny_backbone()
    from qtune.backbones import load_backbone
    from tests.conftest import TINY, TINY_NAME

    bb = load_backbone(TINY_NAME + ".augreg_in21k", model_args=TINY, preprocessing={"interpolation": "bilinear"})
    assert bb.preprocessing.mean == (0.5, 0.5, 0.5) and bb.preprocessing.interpolation == "bilinear"
