"""Swin and ConvNeXt as the stage side paths read: the stream is timm's, K/V are what the blocks compute, queries are
pure in the frozen weights, and training from a cache is training live."""
from __future__ import annotations

import pytest
import torch
from timm.models.swin_transformer import window_reverse

from qtune.backbones import ConvNeXtBackbone, SwinBackbone, load_backbone
from qtune.cache import CachedBatches, TapCache, build_cache, read_listings
from qtune.data import ImageDataset, read_split
from qtune.data.batches import ImageBatches
from qtune.engine.config import TrainConfig
from qtune.engine.loop import fit
from qtune.engine.predict import predict
from qtune.errors import ConfigError
from qtune.methods import create_method
from qtune.tuned import TunedModel
from tests.cache.cachedata import make_vtab

SWIN = ("swin_tiny_patch4_window7_224",
        {"img_size": 64, "embed_dim": 16, "depths": (1, 1, 2, 1), "num_heads": (1, 2, 2, 2), "window_size": 2})
CONVNEXT = ("convnext_tiny", {"depths": (1, 1, 1, 2), "dims": (8, 16, 24, 32)})


def swin() -> SwinBackbone:
    return load_backbone(SWIN[0], model_args=SWIN[1])


def convnext() -> ConvNeXtBackbone:
    return load_backbone(CONVNEXT[0], model_args=CONVNEXT[1], preprocessing={"input_size": 64})


BACKBONES = {"swin": swin, "convnext": convnext}


def images(bb, n=3, seed=0) -> torch.Tensor:
    return torch.randn(n, 3, *bb.preprocessing.input_size, generator=torch.Generator().manual_seed(seed))


def test_the_paper_stages_are_read_and_shapes_follow_the_model() -> None:
    s, c = swin(), convnext()
    assert s.stage is s.model.layers[2] and (s.depth, s.dim, s.pooled_dim, s.num_tokens) == (2, 64, 128, 16)
    assert c.stage is c.model.stages[3] and (c.depth, c.dim, c.pooled_dim, c.num_tokens) == (2, 32, 32, 4)
    taps = s.trace(images(s))
    assert [tuple(k.shape) for k in taps.keys] == [(3, 2, 16, 32)] * 2 and taps.pooled.shape == (3, 128)
    assert s.kv_bytes_per_sample() == 2 * 2 * 16 * 64 * 2


@pytest.mark.parametrize("name", BACKBONES)
def test_trace_keeps_the_models_own_pooled_feature(name) -> None:
    bb = BACKBONES[name]()
    x = images(bb)
    assert torch.equal(bb.trace(x).pooled, bb.model.forward_head(bb.model.forward_features(x), pre_logits=True))
    assert torch.equal(bb.trace(x, [1]).pooled, bb.trace(x).pooled) and bb.trace(x, [1]).blocks == (1,)


def test_swin_keys_and_values_are_the_window_attentions_own() -> None:
    bb = swin()
    x = images(bb)
    seen = []
    for blk in bb.stage.blocks:
        blk.attn.qkv.register_forward_hook(lambda m, i, o, blk=blk: seen.append((blk, o)))
    taps = bb.trace(x)
    own = seen[1::2]  # each block's qkv runs twice: for the taps, then in timm's block on the windows
    assert any(any(blk.shift_size) for blk, _ in own) and own[0][1].shape[0] == 3 * 4  # shifted; 4 windows
    for j, (blk, qkv) in enumerate(own):  # windows -> map -> undo the cyclic shift -> row-major tokens
        h, w = blk.input_resolution
        grid = window_reverse(qkv.view(-1, *blk.window_size, qkv.shape[-1]), blk.window_size, h, w)
        grid = torch.roll(grid, shifts=blk.shift_size, dims=(1, 2)) if any(blk.shift_size) else grid
        k = grid.flatten(1, 2)[..., bb.dim:2 * bb.dim]
        assert torch.allclose(taps.keys[j], k.view(3, h * w, bb.num_heads, -1).transpose(1, 2), atol=1e-6)


def test_convnext_keys_and_values_are_the_depthwise_convolutions_output() -> None:
    bb = convnext()
    x = bb.stage_input(images(bb))
    blk = bb.stage.blocks[0]
    taps = bb.trace(images(bb))
    v = blk.conv_dw(x).flatten(2).transpose(1, 2)
    assert torch.allclose(taps.values[0][:, 0], v, atol=1e-6)
    assert torch.allclose(taps.keys[0][:, 0], blk.norm(v), atol=1e-6)


def test_swin_query_attends_over_all_tokens_without_position_bias() -> None:
    bb = swin()
    taps = bb.trace(images(bb))
    blk, (k, v) = bb.stage.blocks[1], taps.kv(1)
    t = torch.randn(3, 2, bb.dim)
    q = blk.attn.qkv(blk.norm1(t))[..., :bb.dim].view(3, 2, bb.num_heads, -1).transpose(1, 2)
    o = ((q @ k.transpose(-2, -1)) * blk.attn.scale).softmax(-1) @ v
    a = blk.attn.proj(o.transpose(1, 2).reshape(3, 2, bb.dim))
    out = bb.query_block(1, t, k, v)
    assert torch.allclose(out.attn, a, atol=1e-6)
    assert torch.allclose(out.out, t + a + blk.mlp(blk.norm2(t + a)), atol=1e-6)


def test_convnext_query_gathers_then_runs_the_blocks_channel_mixing() -> None:
    bb = convnext()
    taps = bb.trace(images(bb))
    blk, (k, v) = bb.stage.blocks[0], taps.kv(0)
    t = torch.randn(3, 2, bb.dim)
    a = ((blk.norm(t) @ k[:, 0].transpose(-2, -1)) / bb.dim ** 0.5).softmax(-1) @ v[:, 0]
    out = bb.query_block(0, t, k, v)
    assert torch.allclose(out.attn, a, atol=1e-6)
    assert torch.allclose(out.out, t + blk.gamma * blk.mlp(blk.norm(a)), atol=1e-6)


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("method", ["linear", "vqt", "synqt"])
def test_side_paths_train_only_their_own_weights(name, method) -> None:
    bb = BACKBONES[name]()
    frozen = {k: v.clone() for k, v in bb.state_dict().items()}
    model = TunedModel.build(bb, method, 5, {})
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(not n.startswith("backbone.") for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = images(bb, 4)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is None for p in bb.parameters())
    assert all(torch.equal(frozen[k], v) for k, v in bb.state_dict().items())


def test_synqt_head_starts_from_a_fresh_norm_on_a_stage() -> None:
    head = create_method("synqt", swin(), 5).head
    assert torch.equal(head.norm.weight, torch.ones(64)) and torch.equal(head.norm.bias, torch.zeros(64))


@pytest.mark.parametrize("method", ["lora", "vpt_shallow", "bitfit"])
def test_plain_vit_stream_methods_are_refused_with_one_line(method) -> None:
    with pytest.raises(ConfigError, match="plain ViT"):
        TunedModel.build(swin(), method, 5, {})(images(swin()))


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("method", ["vqt", "synqt"])
def test_training_from_the_cache_is_training_live(name, method, shapes, tmp_path) -> None:
    bb = BACKBONES[name]()
    data = make_vtab(tmp_path / "vtab", shapes)
    build_cache(tmp_path / "cache", bb, read_listings([data / "trainval.txt", data / "test.txt"]), dtype="fp32",
                batch_size=16, chunk_rows=32, progress=False)
    listings = [read_split(data / f) for f in ("train.txt", "test.txt")]
    results = []
    for source in ("live", "cache"):
        cache = TapCache(tmp_path / "cache")
        batches = ([ImageBatches(ImageDataset(lst, bb.preprocessing.transform())) for lst in listings]
                   if source == "live" else [CachedBatches(cache, lst, range(bb.depth)) for lst in listings])
        model = TunedModel.build(bb, method, 4, seed=0)
        cfg = TrainConfig(epochs=2, batch_size=16, lr=3e-3, warmup_epochs=0, progress=False, seed=3)
        fit(model, batches[0], cfg)
        results.append(predict([model], batches[1], cfg)[0][0])
    live, cached = results
    assert ((cached - live).norm() / live.norm()).item() <= 1e-5


def test_swin_block_with_no_prompts_is_timms_block() -> None:
    from qtune.methods.stream.stage_vpt import prompted_swin_block

    bb = swin()
    x = bb.stage_input(images(bb))
    for blk in bb.stage.blocks:  # the second block is the shifted one
        ours, p = prompted_swin_block(blk, x, x.new_zeros(3, 0, bb.dim))
        assert torch.allclose(ours, blk(x), atol=1e-6) and p.shape == (3, 0, bb.dim)
        x = blk(x)


def test_convnext_frame_puts_the_ring_around_the_map() -> None:
    from qtune.methods.stream.stage_vpt import frame

    x = torch.randn(2, 3, 4, 5)
    ring = torch.arange(3 * (6 * 7 - 20), dtype=torch.float32).view(3, -1)
    out = frame(x, ring, 1)
    assert out.shape == (2, 3, 6, 7) and torch.equal(out[..., 1:5, 1:6], x)
    assert torch.equal(out[0, :, 0, :], ring[:, :7]) and torch.equal(out[1, :, -1, :], ring[:, -7:])


@pytest.mark.parametrize("name", BACKBONES)
def test_vpt_deep_trains_prompts_and_head_only_and_keeps_images_apart(name) -> None:
    bb = BACKBONES[name]()
    model = TunedModel.build(bb, "vpt_deep", 5, {"tokens": 2})
    frozen = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    assert {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad} == {"prompts", "head"}
    per_block = 2 * 64 if name == "swin" else 32 * (6 * 6 - 2 * 2)  # m x width; width x ring pixels (2x2 map)
    assert model.method.prompts[2 if name == "swin" else 3][0].numel() == per_block
    x = images(bb, 4)
    model.eval()
    assert torch.allclose(model(x[:1]), model(x)[:1], atol=1e-5)  # a prompt averages its own image's windows
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    assert all(torch.equal(frozen[k], v) for k, v in model.backbone.state_dict().items())


def test_methods_command_lists_what_runs_on_a_swin(capsys) -> None:
    from qtune.cli import main

    args = [f"--model-arg={k}={v}" for k, v in SWIN[1].items()]
    assert main(["methods", "--backbone", SWIN[0], *args, "--num-classes", "10"]) == 0
    out = capsys.readouterr().out
    assert "depth 2, width 64 (stage 3)" in out
    listed = [line.split()[0] for line in out.splitlines()[2:]]
    assert listed == ["linear", "synqt", "vpt_deep", "vqt"]
