"""One matrix of methods driving generic checks (finite loss, gradients where and only where they belong,
frozen weights untouched, batch independence in eval)."""
import pytest
import torch
import torch.nn.functional as F

from qtune.methods import create_method, method_names
from qtune.tuned import TunedModel
from tests.conftest import tiny_backbone

METHODS = method_names()


def _model(name, num_classes=5, **kw):
    torch.manual_seed(0)
    bb = tiny_backbone(**kw)
    return TunedModel(bb, create_method(name, bb, num_classes))


def _frozen_hash(model):
    return {n: p.detach().clone() for n, p in model.backbone.named_parameters()}


@pytest.mark.parametrize("name", METHODS)
def test_gradients_reach_every_trainable_parameter_and_nothing_else(name):
    model = _model(name)
    model.train()
    loss = F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    assert torch.isfinite(loss)
    loss.backward()
    trainable = model.trainable_parameters()
    assert trainable
    for n, p in model.named_parameters():
        if n in trainable:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
        else:
            assert p.grad is None, n


@pytest.mark.parametrize("name", [m for m in METHODS if m != "full"])
def test_side_path_leaves_backbone_bit_identical(name):
    model = _model(name)
    before = model.backbone.identity.weights_hash
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
        opt.step()
    from qtune.backbones.weights import weights_hash

    assert weights_hash(model.backbone.model) == before
    assert not any(p.requires_grad for p in model.backbone.parameters())


@pytest.mark.parametrize("name", METHODS)
def test_eval_logits_do_not_depend_on_the_rest_of_the_batch(name):
    model = _model(name).eval()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(6)])
        shuffled = model(x.flip(0)).flip(0)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(together, shuffled, rtol=1e-4, atol=1e-5)


def test_vitb_parameter_counts():
    """Paper Table 9: SynQT (4 tokens, 100 classes) on ViT-B/16 has about 2.73 M trainable parameters."""
    from qtune.backbones import load_backbone

    bb = load_backbone("vit_base_patch16_224")
    synqt = TunedModel(bb, create_method("synqt", bb, 100, ["tokens=4"])).num_trainable()
    assert abs(synqt - 2.73e6) / 2.73e6 < 0.01, synqt
    vqt = TunedModel(bb, create_method("vqt", bb, 100, ["tokens=1"]))
    assert vqt.method.queries.numel() == 12 * 768
    assert vqt.num_trainable() == 12 * 768 + (13 * 768) * 100 + 100


def test_synqt_head_norm_starts_as_backbone_norm_and_is_a_copy():
    model = _model("synqt")
    head_norm, final = model.method.head.norm, model.backbone.final_norm
    torch.testing.assert_close(head_norm.weight, final.weight)
    assert head_norm.weight.data_ptr() != final.weight.data_ptr()


def test_synqt_dropfeat_is_per_sample_and_feature_and_off_in_eval():
    model = _model("synqt")
    head = model.method.head
    feats = torch.ones(64, 10, head.fc.in_features)
    head.train()
    torch.manual_seed(0)
    h = feats + head.proj(head.proj_norm(feats))
    assert h.shape == feats.shape
    head.eval()
    a, b = head(feats), head(feats)
    torch.testing.assert_close(a, b)


def test_bad_method_options():
    from qtune.errors import ConfigError

    bb = tiny_backbone()
    for name, opts in (("synqt", ["tokens=0"]), ("vqt", ["tokens=-1"]), ("synqt", ["dropout=1.5"]),
                       ("vqt", ["nonsense=1"]), ("synqt", ["tokens=two"])):
        with pytest.raises(ConfigError):
            create_method(name, bb, 3, opts)
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        create_method("nope", bb, 3)
