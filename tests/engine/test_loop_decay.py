"""--decay-all: the authors' AdamW decays every trainable tensor; qtune's default exempts biases and norms."""
import torch

from qtune.engine.config import TrainConfig

from qtune.engine.loop import fit
from qtune.tuned import TunedModel
from tests.conftest import tiny_backbone


class _Zero:
    """One batch of fixed images whose loss has no gradient with respect to the bias (it is the only sample)."""

    def __len__(self):
        return 1

    def iterate(self, order, batch_size, device):
        yield torch.zeros(1, 3, 32, 32), torch.tensor([0])

    def forward(self, model, inputs):
        return model(inputs) * 0.0  # no gradient: only weight decay moves the parameters


def _bias_after(decay_all: bool) -> torch.Tensor:
    model = TunedModel.build(tiny_backbone(), "linear", 3, seed=0)
    with torch.no_grad():
        model.method.head.bias.fill_(1.0)
    fit(model, _Zero(), TrainConfig(epochs=3, lr=0.1, weight_decay=0.5, warmup_epochs=0, progress=False,
                                     decay_all=decay_all))
    return model.method.head.bias.detach()


def test_decay_all_decays_biases_too():
    assert torch.equal(_bias_after(False), torch.ones(3))
    assert (_bias_after(True) < 1.0).all()
