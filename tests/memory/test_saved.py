"""Side-path methods keep no activation of the frozen stream for backward."""
import pytest
import torch

from qtune.memory import SavedTensors
from qtune.tuned import TunedModel
from tests.conftest import tiny_backbone

B = 8


def _saved(name, **kw):
    bb = tiny_backbone(**{"patch_size": 4, **kw})  # 65 stream tokens: many more than query tokens
    model = TunedModel.build(bb, name, 10).train()
    with SavedTensors(model.parameters()) as rec:
        model(torch.randn(B, 3, 32, 32)).sum()
    return rec.activation_bytes, bb


@pytest.mark.parametrize("name", ["vqt", "synqt"])
def test_saved_bytes_do_not_grow_with_mlp_width_times_tokens(name):
    small, bb = _saved(name, mlp_ratio=2.0)
    wide, _ = _saved(name, mlp_ratio=8.0)
    kv = B * bb.kv_bytes_per_sample(bytes_per_value=4)
    tokens = 4 if name == "synqt" else 1
    # Growth from a 4x wider MLP is the query path's own: a few tensors of (B, tokens, hidden) per block.
    hidden_growth = bb.depth * B * tokens * bb.dim * 6 * 4 * 4
    assert wide - small <= hidden_growth
    full_small, _ = _saved("full", mlp_ratio=2.0)
    full_wide, _ = _saved("full", mlp_ratio=8.0)
    assert full_wide - full_small > 5 * (wide - small)  # the stream's MLP activations: hidden x all N tokens
    assert small < kv * 2.5


def test_linear_probe_saves_only_the_pooled_feature():
    saved, bb = _saved("linear")
    assert saved == B * bb.dim * 4


def test_kv_are_saved_once_per_block():
    """VQT at tiny width: saved bytes are K/V plus a small query-path term."""
    saved, bb = _saved("vqt", embed_dim=96, num_heads=3)
    kv = B * bb.kv_bytes_per_sample(bytes_per_value=4)
    assert kv <= saved < kv * 1.5
