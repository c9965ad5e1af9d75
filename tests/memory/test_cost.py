"""Inference cost: FLOPs agree with a hand count; parameters, throughput and memory are filled in."""
import torch

from qtune.memory import count_flops, inference_cost
from qtune.tuned import TunedModel
from tests.conftest import TINY, tiny_backbone


def _vit_flops(img, patch, d, depth, heads, classes, mlp=4):
    """Multiply-adds x 2 of one image through a ViT and a linear head: patch embedding, per block qkv, q@k^T,
    attn@v, projection and MLP, then the head."""
    p = (img // patch) ** 2
    n = p + 1
    embed = 2 * p * (3 * patch * patch) * d
    block = 2 * n * d * 3 * d + 2 * (2 * n * n * d) + 2 * n * d * d + 2 * (2 * n * d * mlp * d)
    return embed + depth * block + 2 * d * classes


def test_flops_match_hand_count_for_the_linear_probe():
    bb = tiny_backbone()
    model = TunedModel.build(bb, "linear", 10).eval()
    want = _vit_flops(32, 8, TINY["embed_dim"], TINY["depth"], TINY["num_heads"], 10)
    got = count_flops(model, torch.randn(1, 3, 32, 32))
    assert abs(got - want) <= 0.01 * want  # attention included: without it the count is 5% short
    assert count_flops(model, torch.randn(3, 3, 32, 32)) == 3 * got


def test_inference_cost_rows():
    bb = tiny_backbone()
    lin = inference_cost(bb, "linear", batch_size=2, num_classes=10, warmup=1, iters=2)
    syn = inference_cost(bb, "synqt", batch_size=2, num_classes=10, warmup=1, iters=2)
    vpt = inference_cost(bb, "vpt_deep", batch_size=2, num_classes=10, warmup=1, iters=2)
    assert lin["trainable_parameters"] == TINY["embed_dim"] * 10 + 10
    assert lin["parameters"] == sum(p.numel() for p in bb.parameters()) + lin["trainable_parameters"]
    assert syn["flops_per_image"] > lin["flops_per_image"] and vpt["flops_per_image"] > lin["flops_per_image"]
    params_bytes = 4 * lin["parameters"]
    for r in (lin, syn, vpt):
        assert r["images_per_second"] > 0 and r["threads"] == torch.get_num_threads()
        assert r["memory_kind"] == "cpu_account" and r["forward_peak_bytes"] > 0
    assert lin["memory_bytes"] == params_bytes + 2 * 3 * 32 * 32 * 4 + lin["forward_peak_bytes"]
    assert all(p.requires_grad for p in TunedModel.build(bb, "vpt_deep", 10).method.parameters())
