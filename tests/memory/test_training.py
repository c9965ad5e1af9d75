"""Training-step figures of a method on a tiny ViT agree with a hand count, in each way of training."""
import pytest
import torch

from qtune.errors import ConfigError
from qtune.memory import measure_training
from tests.conftest import TINY, tiny_backbone

B, C, F32, I64 = 4, 10, 4, 8


def _vit_parameters(img, patch, d, depth, mlp=4):
    """Parameter count of a timm ViT without a head, from its shape: embeddings, blocks, final norm."""
    n = (img // patch) ** 2 + 1
    embed = 3 * patch * patch * d + d + d + n * d  # patch conv (+bias), CLS token, position embedding
    block = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * mlp * d + mlp * d) + (mlp * d * d + d)
    return embed + depth * block + 2 * d


def test_linear_probe_account_matches_hand_count():
    bb = tiny_backbone()
    d = TINY["embed_dim"]
    r = measure_training(bb, "linear", batch_size=B, num_classes=C)
    head = d * C + C
    assert r["kind"] == "cpu_account" and r["mode"] == "live" and r["precision"] == "fp32"
    assert r["parameters"] == (_vit_parameters(32, 8, d, TINY["depth"]) + head) * F32
    assert r["gradients"] == head * F32
    assert r["optimizer_state"] == (2 * head + 2) * F32  # AdamW exp_avg, exp_avg_sq; a step counter per tensor
    assert r["inputs"] == B * 3 * 32 * 32 * F32 + B * I64  # images, labels
    # Saved for backward: the pooled feature (the head's weight gradient), log-softmax's output, the labels and
    # nll_loss's scalar total weight. Nothing of the frozen stream.
    assert r["saved_for_backward"] == B * d * F32 + B * C * F32 + B * I64 + F32
    assert r["step_peak"] >= r["gradients"] + r["saved_for_backward"]
    assert r["total"] == r["parameters"] + r["optimizer_state"] + r["inputs"] + r["step_peak"]


def test_cached_runs_hold_the_batch_kv_or_only_the_pooled_feature():
    bb = tiny_backbone()
    d = TINY["embed_dim"]
    kv = B * bb.kv_bytes_per_sample(bytes_per_value=F32)  # fp32 K/V of every block for the batch
    live = measure_training(bb, "synqt", batch_size=B, num_classes=C)
    cached = measure_training(bb, "synqt", batch_size=B, num_classes=C, mode="cached")
    stream = measure_training(bb, "synqt", batch_size=B, num_classes=C, mode="cached_stream")
    assert cached["inputs"] == kv + B * d * F32 + B * I64
    assert stream["inputs"] == B * d * F32 + B * I64
    assert stream["cache_source_bytes"] == kv // 2  # the fp16 stand-in for the cache, not counted
    for r in (cached, stream):
        assert r["parameters"] == live["parameters"] and r["optimizer_state"] == live["optimizer_state"]
    # No backbone forward in the cached step; streaming never holds all blocks' K/V at once.
    assert cached["step_peak"] < live["step_peak"]
    assert stream["total"] < cached["total"]
    assert stream["saved_for_backward"] < cached["saved_for_backward"]


def test_stream_methods_have_no_cached_run_and_bad_inputs_are_named():
    bb = tiny_backbone()
    with pytest.raises(ConfigError, match="trains the stream"):
        measure_training(bb, "full", batch_size=B, mode="cached")
    with pytest.raises(ConfigError, match="batch size"):
        measure_training(bb, "linear", batch_size=0)
    with pytest.raises(ConfigError, match="unknown method"):
        measure_training(bb, "nope", batch_size=B)
    with pytest.raises(ConfigError, match="precision"):
        measure_training(bb, "linear", batch_size=B, precision="fp8")


def test_stream_methods_leave_the_shared_backbone_frozen():
    bb = tiny_backbone()
    before = [p.detach().clone() for p in bb.parameters()]
    measure_training(bb, "full", batch_size=B, num_classes=C)
    assert all(not p.requires_grad for p in bb.parameters())
    assert all(torch.equal(a, p) for a, p in zip(before, bb.parameters()))
