"""SynQT as the authors compute it: the head norm is a fresh LayerNorm (eps 1e-5) started from the backbone's final
norm, the 48-wide adapters apply their dropout twice, the 8-wide QSM projections none, and the classifier has
PyTorch's default init. (Logits equal the authors' code to ~2e-6 on a random ViT-B: docs/methods.md.)"""
import torch
from torch import nn

from qtune.methods import create_method
from qtune.methods.layers import Adapter
from qtune.methods.side.synqt import drop_features
from tests.conftest import tiny_backbone


def _synqt(**options):
    torch.manual_seed(0)
    bb = tiny_backbone()
    with torch.no_grad():  # a final norm away from (1, 0), so that copying it is visible
        bb.final_norm.weight.uniform_(0.5, 1.5)
        bb.final_norm.bias.uniform_(-0.5, 0.5)
    return bb, create_method("synqt", bb, 5, options)


def test_head_norm_is_a_fresh_layernorm_with_pytorch_eps_started_from_the_final_norm():
    bb, m = _synqt()
    norm = m.head.norm
    assert isinstance(norm, nn.LayerNorm) and norm.eps == 1e-5 and bb.final_norm.eps == 1e-6
    assert torch.equal(norm.weight, bb.final_norm.weight) and torch.equal(norm.bias, bb.final_norm.bias)
    assert norm.weight.requires_grad and not bb.final_norm.weight.requires_grad
    assert norm.weight.data_ptr() != bb.final_norm.weight.data_ptr()  # a copy: training it leaves the backbone alone


def _dropout_calls(module: nn.Module, x: torch.Tensor) -> int:
    calls = []
    hooks = [d.register_forward_hook(lambda *_: calls.append(1)) for d in module.modules()
             if isinstance(d, nn.Dropout) and d.p > 0]
    module.train()
    module(x)
    for h in hooks:
        h.remove()
    return len(calls)


def test_adapter_dropout_acts_after_the_activation_and_after_fc2():
    torch.manual_seed(0)
    adapter = Adapter(8, 4, dropout=0.5).train()
    x = torch.randn(2000, 8)
    assert _dropout_calls(adapter, x) == 2
    # With fc2 a constant map, a dropout inside the bottleneck alone would leave the branch at 1 everywhere; the outer
    # dropout zeroes whole output entries (and rescales the rest by 1 / (1 - p)).
    with torch.no_grad():
        adapter.fc2.weight.zero_()
        adapter.fc2.bias.fill_(1.0)
    branch = adapter(x) - x
    zero = branch.abs() < 1e-5
    assert torch.allclose(branch[~zero], torch.full_like(branch[~zero], 2.0), atol=1e-5)
    assert 0.4 < zero.float().mean() < 0.6


def test_dropout_placement_in_the_qsm_and_the_head():
    _, m = _synqt(tokens=2)
    dim = m.prompts.shape[-1]
    t = torch.randn(3, 2, dim)
    assert _dropout_calls(m.in_proj[0], t) == 2  # 48-wide input projection: twice
    assert _dropout_calls(m.qsm[0].ffn, t) == 2  # 48-wide QSM FFN: twice
    assert _dropout_calls(m.qsm[0].attn, t) == 2  # QSM attention: on the weights and the output, none in q/k/v/out
    assert all(p.p == 0.0 for a in (m.qsm[0].attn.q_proj, m.qsm[0].attn.out_proj) for p in a.modules()
               if isinstance(p, nn.Dropout))
    assert _dropout_calls(m.head.proj, torch.randn(3, 7, dim)) == 2  # 48-wide head projection: twice


def test_classifier_has_pytorch_default_init_like_the_authors_reset_classifier():
    _, m = _synqt()
    fc = m.head.fc
    bound = 1 / fc.in_features**0.5
    assert fc.bias.abs().max() <= bound and fc.bias.abs().max() > 0  # uniform(-1/sqrt(in), 1/sqrt(in)), not zeros
    assert fc.weight.abs().max() <= bound


def test_defaults_are_the_authors_most_frequent_scales():
    _, m = _synqt()
    assert m.config.tokens == 4
    assert (m.config.attn_scale, m.config.ffn_scale, m.config.feat_scale) == (0.1, 0.1, 0.1)


def test_dropfeat_drops_whole_features_per_sample_never_the_first():
    torch.manual_seed(0)
    out = drop_features(torch.ones(4000, 6, 3), 0.3)
    assert torch.equal(out[:, 0], torch.ones(4000, 3))  # H_L is never dropped
    later = out[:, 1:]
    assert torch.equal(later, later[:, :, :1].expand_as(later))  # a whole feature at a time
    kept = later[later > 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / 0.7))  # rescaled by 1 / (1 - p)
    dropped = (later[:, :, 0] == 0).float()  # (samples, features)
    assert torch.allclose(dropped.mean(0), torch.full((5,), 0.3), atol=0.03)  # the rate, per feature
    both = (dropped[:, 0] * dropped[:, 1]).mean()
    assert abs(both - 0.09) < 0.02  # independent across features: P(both) = 0.3 * 0.3
    assert dropped.mean(1).std() > 0.15  # and across samples (one mask for the batch would give 0)
