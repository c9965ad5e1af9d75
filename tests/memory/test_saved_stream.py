"""Stream methods store activations only from the first trainable block upward (``trainable_blocks``)."""
import pytest
import torch

from qtune.memory import SavedTensors
from qtune.methods import get_method, method_names
from qtune.tuned import TunedModel
from tests.conftest import tiny_backbone

B = 4
STREAM = [m for m in method_names() if not get_method(m).reads_taps]


def _saved(name, options, depth):
    torch.manual_seed(0)  # the test's own draws
    model = TunedModel.build(tiny_backbone(depth=depth), name, 10, options, seed=0, own_backbone=True).train()
    with SavedTensors(model.parameters()) as rec:
        model(torch.randn(B, 3, 32, 32)).sum()
    return rec.activation_bytes


@pytest.mark.parametrize("name", [m for m in STREAM if "+" not in m])
def test_frozen_blocks_below_the_trainable_ones_save_nothing(name):
    """With the top block trainable, a deeper frozen prefix adds no saved byte; each trainable block adds some."""
    top = _saved(name, {"trainable_blocks": 1}, depth=3)
    assert top == _saved(name, {"trainable_blocks": 1}, depth=5)
    assert 0 < top < _saved(name, {"trainable_blocks": 2}, depth=3) < _saved(name, {"trainable_blocks": 3}, depth=3)


@pytest.mark.parametrize("name", ["vpt_deep+synqt", "adaptformer+vqt"])
def test_combination_with_a_constrained_stream_saves_less(name):
    stream = name.split("+")[0]
    one = _saved(name, {f"{stream}.trainable_blocks": 1}, depth=4)
    assert one < _saved(name, {f"{stream}.trainable_blocks": 4}, depth=4)


def test_synqt_with_fewer_blocks_saves_fewer_kv_bytes():
    saved = [_saved("synqt", {"trainable_blocks": k}, depth=4) for k in (1, 2, 4)]
    assert saved[0] < saved[1] < saved[2]
