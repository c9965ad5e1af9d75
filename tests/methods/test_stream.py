"""Stream methods and combinations: the identities that pin their semantics, the memory-constrained variants'
structure, and the one-line errors for bad options."""
import pytest
import torch

from qtune.errors import ConfigError
from qtune.methods import create_method, get_method, method_names
from qtune.tuned import TunedModel
from tests.conftest import tiny_backbone

STREAM = [m for m in method_names() if not get_method(m).reads_taps and "+" not in m]
BACKBONES = {"plain": {}, "layerscale_qknorm": {"init_values": 0.1, "qk_norm": True},
             "avgpool_fcnorm": {"global_pool": "avg", "fc_norm": True, "class_token": False},
             "registers": {"reg_tokens": 2}}


def _tuned(name, options=None, backbone=None, num_classes=5, seed=0):
    torch.manual_seed(seed)  # the test's own draws
    # the model wraps the backbone it is given, which some tests then run through timm's own forward
    return TunedModel.build(backbone or tiny_backbone(), name, num_classes, options, seed=seed, own_backbone=True)


def _features(model, x):
    """The stream method's pooled feature (what its head reads)."""
    m = model.method
    return m.pool(m.stream(x, model.backbone)[0], model.backbone)


def test_gatevpt_with_open_gates_and_unit_temperatures_is_vpt_shallow():
    x = torch.randn(3, 3, 32, 32)
    vpt = _tuned("vpt_shallow", {"tokens": 4}).eval()
    gate = _tuned("gatevpt", {"tokens": 4, "gate_blocks": 3}, seed=1).eval()
    with torch.no_grad():
        gate.method.prompts.copy_(vpt.method.prompts)
        gate.method.head.load_state_dict(vpt.method.head.state_dict())
        gate.method.gate_logits.fill_(float("inf"))  # sigmoid(inf) == 1 exactly
        gate.method.temperature.fill_(1.0)
        torch.testing.assert_close(gate(x), vpt(x), rtol=0, atol=0)
        gate.method.gate_logits.fill_(0.0)  # half-open gates: a different model
        assert not torch.allclose(gate(x), vpt(x))


def test_gatevpt_gates_start_closed_and_temperatures_are_projected():
    model = _tuned("gatevpt", {"gate_init": 5.0})
    assert model.method.gate_logits.shape == (2,)  # every block but the last
    assert torch.all(model.method.gate_logits == -5.0)
    with torch.no_grad():
        model.method.temperature.copy_(torch.tensor([0.0, 5.0, 50.0]))
    model(torch.randn(2, 3, 32, 32))
    assert model.method.temperature.tolist() == pytest.approx([0.01, 5.0, 10.0])


def test_gatevpt_temperature_divides_the_attention_logits():
    """Backbone.block_forward(temperature=T) is the block with softmax(q k^T * scale / T)."""
    bb = tiny_backbone()
    blk, attn = bb.model.blocks[0], bb.model.blocks[0].attn
    with torch.no_grad():
        x = bb.embed(torch.randn(2, 3, 32, 32))
        b, n, d = x.shape
        q, k, v = attn.qkv(blk.norm1(x)).view(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-2, -1)) * attn.scale / 2.0
        mid = x + attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d))
        want = mid + blk.mlp(blk.norm2(mid))
        got, _, _ = bb.block_forward(0, x, temperature=torch.tensor(2.0))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", BACKBONES)
@pytest.mark.parametrize("name,options", [("adaptformer", {}), ("lora", {}), ("lora", {"mlp": True}),
                                          ("adapter", {"placement": "houlsby"}), ("fact_tt", {}), ("bitfit", {}),
                                          ("adaptformer", {"trainable_blocks": 2})])
def test_zero_initialised_methods_leave_the_backbone_output_unchanged(name, options, variant):
    bb = tiny_backbone(**BACKBONES[variant])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = bb(x)
        model = _tuned(name, options, backbone=bb).eval()
        torch.testing.assert_close(_features(model, x), before, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bb(x), before, rtol=1e-5, atol=1e-5)  # timm's own forward runs the wrappers


def test_adaptformer_is_parallel_to_the_mlp_on_the_residual_stream():
    model = _tuned("adaptformer", {"dropout": 0.0}).eval()
    bb = model.backbone
    blk, wrapper = bb.model.blocks[1], bb.model.blocks[1].mlp
    with torch.no_grad():
        wrapper.up.weight.normal_()
        x = torch.randn(2, 17, bb.dim)
        mid = x + blk.ls1(blk.attn(blk.norm1(x)))
        want = mid + wrapper.base_layer(wrapper.norm(mid)) + 0.1 * wrapper.up(torch.relu(wrapper.down(mid)))
        torch.testing.assert_close(blk(x), want)


def test_vpt_deep_with_k_trainable_blocks_has_no_prompts_below_them():
    model = _tuned("vpt_deep", {"tokens": 3, "trainable_blocks": 2}).train()
    bb = model.backbone
    assert model.method.prompts.shape == (2, 3, bb.dim)
    seen = []
    original = bb.block_forward

    def recording(i, x, **kw):
        seen.append((i, x.shape[1], torch.is_grad_enabled(), x.requires_grad))
        return original(i, x, **kw)

    bb.block_forward = recording
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    n = bb.num_tokens
    assert seen == [(0, n, False, False), (1, n + 3, True, True), (2, n + 3, True, True)]


@pytest.mark.parametrize("name", STREAM)
def test_trainable_blocks_put_structures_in_the_top_blocks_only(name):
    model = _tuned(name, {"trainable_blocks": 1})
    depth = model.backbone.depth
    for n in model.trainable_parameters():
        if ".blocks." in n:
            assert n.split(".blocks.")[1].split(".")[0] == str(depth - 1), n
    below = [p for i in range(depth - 1) for p in model.backbone.model.blocks[i].parameters()]
    assert not any(p.requires_grad for p in below)
    assert model.num_trainable() <= _tuned(name).num_trainable()  # equal for vpt_shallow


def test_synqt_trainable_blocks_reads_only_the_top_blocks():
    model = _tuned("synqt", {"trainable_blocks": 2})
    assert model.blocks_read() == (1, 2)
    assert model.method.prompts.shape[0] == 2 and model.method.head.weight_fc.out_features == 6
    full = _tuned("synqt")
    per_block = (full.num_trainable() - model.num_trainable())
    assert per_block > 0 and model.method.feat_scale is not None
    assert _tuned("synqt", {"trainable_blocks": 1}).method.feat_scale is None  # nothing before the first query


def test_combination_reads_the_modified_stream_with_the_same_side_path():
    """AdaptFormer starts as the identity: adaptformer+vqt then equals vqt with the same parameters; once the
    adapter moves, the side path's logits move with it, and the adapter gets a gradient through the K/V."""
    x = torch.randn(3, 3, 32, 32)
    combo = _tuned("adaptformer+vqt").eval()
    plain = _tuned("vqt", seed=1).eval()
    plain.method.load_state_dict(combo.method.side_method.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(combo(x), plain(x), rtol=1e-5, atol=1e-5)
        combo.backbone.model.blocks[0].mlp.up.weight.normal_()
        assert not torch.allclose(combo(x), plain(x), atol=1e-4)
    combo.train()
    combo(x).sum().backward()
    assert combo.backbone.model.blocks[0].mlp.down.weight.grad.abs().sum() > 0


def test_combination_options_route_to_their_part_and_round_trip():
    cls = get_method("vpt_deep+synqt")
    cfg = cls.config_class.from_strings(["vpt_deep.tokens=7", "synqt.tokens=2", "pool=cls"])
    assert cfg.stream.tokens == 7 and cfg.side.tokens == 2 and cfg.stream.pool == "cls"
    assert cls.config_class.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="ambiguous"):
        cls.config_class.from_dict({"tokens": 3})
    with pytest.raises(ConfigError, match="unknown option 'nope'"):
        cls.config_class.from_dict({"nope": 3})


BAD = [
    ("vpt_shallow", ["tokens=0"], "tokens must be > 0"),
    ("vpt_deep", ["tokens=-2"], "tokens must be > 0"),
    ("gatevpt", ["tokens=0"], "tokens must be > 0"),
    ("lora", ["rank=0"], "rank must be > 0"),
    ("fact_tt", ["rank=-1"], "rank must be > 0"),
    ("adapter", ["bottleneck=0"], "bottleneck must be > 0"),
    ("adaptformer", ["bottleneck=-8"], "bottleneck must be > 0"),
    ("adapter", ["placement=middle"], "placement must be one of pfeiffer, houlsby"),
    ("gatevpt", ["pool=max"], "pool must be one of"),
    ("vpt_deep", ["trainable_blocks=0"], "trainable_blocks must be a whole number of blocks >= 1"),
    ("lora", ["trainable_blocks=4"], "trainable_blocks must be in 1..3"),
    ("full", ["trainable_blocks=99"], "trainable_blocks must be in 1..3"),
    ("synqt", ["trainable_blocks=4"], "trainable_blocks must be in 1..3"),
    ("synqt", ["trainable_blocks=0"], ">= 1"),
    ("gatevpt", ["gate_blocks=4"], "gate_blocks must be in 0..3"),
    ("vpt_deep+synqt", ["vpt_deep.trainable_blocks=5"], "trainable_blocks must be in 1..3"),
    ("vpt_deep+synqt", ["tokens=3"], "ambiguous"),
    ("vpt_deep+lora", [], "vpt_deep and lora both change the stream and conflict"),
    ("adaptformer+full", [], "both change the stream and conflict"),
    ("synqt+vqt", [], "both are side-path methods"),
    ("synqt+vpt_deep", [], "write the stream method first (vpt_deep+synqt)"),
    ("lora+synqt", [], "lora does not combine with a side path"),
    ("gatevpt+vqt", [], "does not combine"),
    ("vpt+synqt", [], "unknown method 'vpt'"),
    ("vpt_deep+synqt+vqt", [], "a combination is <stream method>+<side-path method>"),
]


@pytest.mark.parametrize("name,options,message", BAD, ids=[f"{n}:{','.join(o)}" for n, o, _ in BAD])
def test_bad_input_is_a_one_line_config_error(name, options, message):
    with pytest.raises(ConfigError) as e:
        create_method(name, tiny_backbone(), 3, options)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_backbone_carries_one_stream_model():
    bb = tiny_backbone()
    TunedModel.build(bb, "lora", 3, own_backbone=True)
    with pytest.raises(ConfigError, match="already carries"):
        TunedModel.build(bb, "adapter", 3, own_backbone=True)


def test_wrapped_dropout_follows_the_model_mode_and_the_frozen_layers_stay_in_eval():
    model = _tuned("adaptformer")
    wrapper = model.backbone.model.blocks[0].mlp
    model.train()
    assert wrapper.drop.training and not wrapper.base_layer.training and not wrapper.norm.training
    assert not model.backbone.model.blocks[0].attn.training
    model.eval()
    assert not wrapper.drop.training


def test_methods_command_lists_every_method_with_its_count(capsys):
    from qtune.cli import main
    from tests.conftest import TINY, TINY_NAME

    assert main(["methods", "--backbone", TINY_NAME, *[f"--model-arg={k}={v}" for k, v in TINY.items()]]) == 0
    lines = capsys.readouterr().out.splitlines()[2:]
    assert sorted(line.split()[0] for line in lines) == method_names()
    assert all(int(line.split()[2].replace(",", "")) > 0 for line in lines)


@pytest.mark.parametrize("method,options,message", [
    ("vpt_deep", ["trainable_blocks=9"], "trainable_blocks must be in 1..3"),
    ("lora", ["rank=0"], "rank must be > 0"),
    ("vpt_deep+lora", [], "both change the stream and conflict"),
    ("vpt_deep+synqt", ["vpt_deep.tokens=abc"], "option vpt_deep.tokens: 'abc' is not a valid int"),
    ("vpt_deep+synqt", ["synqt.tokens=0"], "synqt.tokens must be > 0 (got 0)"),
    ("vpt_deep+synqt", ["vpt_deep.trainable_blocks=9"], "vpt_deep.trainable_blocks must be in 1..3"),
    ("vpt_deep+synqt", ["vpt_deep.nope=1"], "unknown option(s) vpt_deep.nope (known: vpt_deep.trainable_blocks,"),
])
def test_command_line_errors_are_one_line(shapes, tmp_path, capsys, method, options, message):
    from qtune.cli import main
    from tests.conftest import TINY, TINY_NAME

    argv = ["train", "--backbone", TINY_NAME, "--random-init", *[f"--model-arg={k}={v}" for k, v in TINY.items()],
            "--method", method, "--train", str(shapes / "train"), "--epochs", "1", "--out", str(tmp_path / "r"),
            "--no-progress", *[a for o in options for a in ("-O", o)]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qtune: error: ") and message in err and "\n" not in err
