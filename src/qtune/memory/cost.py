"""Inference cost per method (the SynQT paper's Table 8): parameters, FLOPs, images per second, memory.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on an eval forward of one image (matrix
products, convolutions and attention; a multiply-add counts as 2 FLOPs; element-wise ops, norms and softmax are not
counted). Throughput is timed after
warm-up iterations under ``torch.inference_mode``; the thread count is part of the result. Inference memory is, on
CPU, parameters + the input batch + the profiler's peak of bytes allocated during a no-grad forward; on CUDA,
``max_memory_allocated`` over the forward, after reset_peak_memory_stats.
"""
from __future__ import annotations

import time
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ..backbones import Backbone
from ..tuned import TunedModel
from .account import _bytes, _profiled_peak


def count_flops(model: torch.nn.Module, inputs: torch.Tensor) -> int:
    """FLOPs of one eval forward of ``model(inputs)`` (the whole batch).

    The counter's module tracker hooks autograd on tensors that require grad, which fails under no_grad for a
    view of a trainable parameter (a prompt expanded over the batch); the count runs with grads off instead.
    Attention runs on the math backend while counting: the counter has formulas for the fused CUDA kernels but
    not for the fused CPU kernel, which it would count as zero; the math backend's matrix products it counts.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in trainable:
            p.requires_grad_(False)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(inputs)
    finally:
        for p in trainable:
            p.requires_grad_(True)
    return int(counter.get_total_flops())


def images_per_second(model: torch.nn.Module, images: torch.Tensor, warmup: int = 2, iters: int = 5) -> float:
    device = images.device
    with torch.inference_mode():
        for _ in range(warmup):
            model(images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            model(images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
    return iters * images.shape[0] / elapsed


def inference_memory(model: torch.nn.Module, images: torch.Tensor) -> dict[str, Any]:
    params = _bytes(model.parameters())
    device = images.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            model(images)
        torch.cuda.synchronize(device)
        return {"memory_kind": "cuda_peak", "memory_bytes": torch.cuda.max_memory_allocated(device)}

    def forward() -> None:
        with torch.no_grad():
            model(images)

    peak = _profiled_peak(forward)
    return {"memory_kind": "cpu_account", "forward_peak_bytes": peak,
            "memory_bytes": params + _bytes([images]) + peak}


def inference_cost(backbone: Backbone, method: str, options: dict[str, Any] | None = None, *, batch_size: int,
                   num_classes: int = 100, device: torch.device | str = "cpu", warmup: int = 2,
                   iters: int = 5) -> dict[str, Any]:
    """One method's inference cost on ``backbone``: a row for the cost table."""
    device = torch.device(device)
    model = TunedModel.build(backbone, method, num_classes, dict(options or {}), seed=0).to(device).eval()
    size = model.backbone.preprocessing.input_size
    one = torch.randn(1, 3, *size, device=device)
    images = torch.randn(batch_size, 3, *size, device=device)
    params = {id(p): p for p in model.parameters()}.values()
    return {"method": method, "options": dict(options or {}), "batch_size": batch_size,
            "parameters": sum(p.numel() for p in params),
            "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
            "flops_per_image": count_flops(model, one),
            "images_per_second": images_per_second(model, images, warmup, iters),
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
            **inference_memory(model, images)}
