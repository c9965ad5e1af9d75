"""One matrix of methods driving generic checks (finite loss, gradients where and only where they belong,
only trainable tensors change, frozen weights untouched, batch independence in eval, save/load round trip).

The matrix is every registered method with its defaults, plus option variants (placements, memory-constrained
``trainable_blocks``, unregistered combinations) that take other code paths."""
import pytest
import torch
import torch.nn.functional as F

from qtune.methods import create_method, get_method, method_names
from qtune.tuned import TunedModel
from tests.conftest import tiny_backbone

METHODS = method_names()
SIDE = [m for m in METHODS if get_method(m).reads_taps]
VARIANTS = [
    ("vpt_shallow", {"trainable_blocks": 2}),
    ("vpt_deep", {"trainable_blocks": 1}),
    ("gatevpt", {"trainable_blocks": 2, "pool": "mean", "gate_blocks": 3}),
    ("bitfit", {"trainable_blocks": 1}),
    ("lora", {"trainable_blocks": 2, "mlp": True, "dropout": 0.1}),
    ("adapter", {"placement": "houlsby", "activation": "gelu"}),
    ("adaptformer", {"trainable_blocks": 1}),
    ("fact_tt", {"trainable_blocks": 2}),
    ("full", {"trainable_blocks": 1}),
    ("synqt", {"trainable_blocks": 1}),
    ("synqt", {"trainable_blocks": 2}),
    ("vpt_shallow+synqt", {"synqt.trainable_blocks": 2}),
    ("adapter+vqt", {"placement": "houlsby", "trainable_blocks": 1}),
    ("vpt_deep+synqt", {"vpt_deep.trainable_blocks": 1, "synqt.tokens": 2}),
    ("full+vqt", {"trainable_blocks": 1}),
    ("dtl", {"add_from": 2}),
    ("dtl_plus", {"add_from": 0, "kernel": 2, "pool": "cls"}),
]
CASES = [pytest.param(m, {}, id=m) for m in METHODS] + [
    pytest.param(m, o, id=m + "-" + ",".join(f"{k}={v}" for k, v in o.items())) for m, o in VARIANTS]


def _model(name, num_classes=5, options=None, **kw):
    torch.manual_seed(0)  # the test's own draws
    return TunedModel.build(tiny_backbone(**kw), name, num_classes, options, seed=0, own_backbone=True)


def _step(model, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
        opt.step()


@pytest.mark.parametrize("name,options", CASES)
def test_gradients_reach_every_trainable_parameter_and_nothing_else(name, options):
    model = _model(name, options=options)
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


@pytest.mark.parametrize("name", SIDE)
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


@pytest.mark.parametrize("name,options", CASES)
def test_training_changes_trainable_tensors_only(name, options):
    """Stream methods too: the frozen weights (wrapped timm layers included) stay bit-identical."""
    model = _model(name, options=options)
    trainable = model.trainable_parameters()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _step(model)
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before if n not in trainable)
    assert any(not torch.equal(before[n], after[n]) for n in trainable)


@pytest.mark.parametrize("name,options", CASES)
def test_save_load_round_trip(name, options, tmp_path):
    """Only trainable tensors are written; a fresh backbone plus the checkpoint gives the same logits."""
    from safetensors.torch import load_file

    from qtune.engine.checkpoint import TENSORS, load_adapter, save_adapter

    model = _model(name, options=options)
    _step(model, steps=2)
    save_adapter(tmp_path, model, classes=[str(i) for i in range(5)])
    saved = load_file(str(tmp_path / TENSORS))
    assert set(saved) == set(model.trainable_parameters())
    assert sum(t.numel() for t in saved.values()) == model.num_trainable()
    loaded, cfg = load_adapter(tmp_path, tiny_backbone())
    assert cfg["method"] == name and loaded.method.config == model.method.config
    x = torch.randn(3, 3, 32, 32)
    model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("name,options", CASES)
def test_eval_logits_do_not_depend_on_the_rest_of_the_batch(name, options):
    model = _model(name, options=options).eval()
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
    synqt = TunedModel.build(bb, "synqt", 100, ["tokens=4"]).num_trainable()
    assert abs(synqt - 2.73e6) / 2.73e6 < 0.01, synqt
    vqt = TunedModel.build(bb, "vqt", 100, ["tokens=1"])
    assert vqt.method.queries.numel() == 12 * 768
    assert vqt.num_trainable() == 12 * 768 + (13 * 768) * 100 + 100
    # Head2Toe at the authors' target size 8192: 10 windows of 18 tokens per 768-wide point, 2 of 73 for the MLP's
    # 3072-wide hidden layer; LST at r = 8: a 96-wide ladder
    h2t = TunedModel.build(bb, "head2toe", 100).num_trainable()
    assert h2t == (768 + 12 * (3 * 10 * 768 + 2 * 3072)) * 100 + 100
    side_block = 4 * 96 + 3 * 96 * 96 + 3 * 96 + 96 * 96 + 96 + 96 * 384 + 384 + 384 * 96 + 96
    lst = TunedModel.build(bb, "lst", 100).num_trainable()
    assert lst == 13 * 768 * 96 + 12 * side_block + 12 + 96 * 768 + 768 * 100 + 100


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
