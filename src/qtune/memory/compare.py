"""``qtune memory``: training memory, budget fitting and inference cost for a list of methods on one backbone."""
from __future__ import annotations

import gc
from typing import Any, Callable, Sequence

import torch

from ..backbones import Backbone
from ..errors import ConfigError
from ..methods import get_method
from .budget import fit_budget
from .cost import inference_cost
from ..precision import check_precision, precision_label
from .training import measure_training
from .units import format_bytes


def row_label(method: str, options: dict[str, Any], mode: str = "live") -> str:
    opts = ",".join(f"{k}={v}" for k, v in options.items())
    suffix = {"live": "", "cached": " (cached)", "cached_stream": " (cached, stream-blocks)"}[mode]
    return f"{method}{f'[{opts}]' if opts else ''}{suffix}"


def check_methods(methods: Sequence[str]) -> list[str]:
    """The method names, validated (ConfigError names an unknown one)."""
    if not methods:
        raise ConfigError("no methods given")
    for m in methods:
        get_method(m)
    return list(dict.fromkeys(m.lower() for m in methods))


def compare_methods(backbone: Backbone, methods: Sequence[str], *, batch_size: int, num_classes: int = 100,
                    device: torch.device | str = "cpu", precision: str = "fp32",
                    options: dict[str, dict[str, Any]] | None = None, training: bool = True, cached: bool = False,
                    budget: int | None = None, max_tokens: int = 64, inference: bool = False,
                    inference_batch_size: int | None = None, say: Callable[[str], None] | None = None,
                    ) -> dict[str, Any]:
    """Measure every method (and its cached runs with ``cached``); optionally fit ``budget`` and measure the
    inference cost. Returns the settings and one list of rows per part."""
    methods = check_methods(methods)
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1 (got {batch_size})")
    if inference_batch_size is not None and inference_batch_size < 1:
        raise ConfigError(f"inference batch size must be >= 1 (got {inference_batch_size})")
    check_precision(precision)
    options = {k.lower(): v for k, v in (options or {}).items()}
    unknown = sorted(set(options) - set(methods))
    if unknown:
        raise ConfigError(f"options given for {', '.join(unknown)}, which is not among --methods")
    device = torch.device(device)
    say = say or (lambda _: None)

    def measure(method: str, opts: dict[str, Any], mode: str = "live") -> dict[str, Any]:
        row = measure_training(backbone, method, opts, batch_size=batch_size, num_classes=num_classes, mode=mode,
                               device=device, precision=precision)
        gc.collect()
        row["label"] = row_label(method, opts, mode)
        return row

    rows = []
    for m in methods if training else []:
        modes = ["live"] + (["cached", "cached_stream"] if cached and get_method(m).reads_taps else [])
        for mode in modes:
            say(f"training step: {row_label(m, options.get(m, {}), mode)}")
            rows.append(measure(m, options.get(m, {}), mode))
    base = next((r for r in rows if r["method"] == "linear" and r["mode"] == "live" and not r["options"]), None)
    for r in rows:
        r["ratio_to_linear"] = r["total"] / base["total"] if base else None

    def probe(method: str, opts: dict[str, Any]) -> dict[str, Any]:
        row = measure(method, opts)
        say(f"budget fitting: {row['label']}: {format_bytes(row['total'], 3)}, "
            f"{'fits' if row['total'] <= budget else 'does not fit'}")
        return row

    fits = []
    if budget is not None:
        for m in methods:
            fits.append(fit_budget(lambda o, m=m: probe(m, o), m, backbone, budget, options.get(m, {}), max_tokens))

    cost = []
    if inference:
        for m in methods:
            say(f"inference cost: {row_label(m, options.get(m, {}))}")
            r = inference_cost(backbone, m, options.get(m, {}), batch_size=inference_batch_size or batch_size,
                               num_classes=num_classes, device=device)
            r["label"] = row_label(m, options.get(m, {}))
            cost.append(r)
            gc.collect()

    return {"settings": {"backbone": backbone.identity.to_dict(), "batch_size": batch_size,
                         "num_classes": num_classes, "methods": methods, "options": options, "cached": cached,
                         "budget_bytes": budget, "max_tokens": max_tokens,
                         "inference_batch_size": (inference_batch_size or batch_size) if inference else None,
                         "optimizer": "AdamW", "loss": "cross-entropy"},
            "device": str(device), "kind": "cuda_peak" if device.type == "cuda" else "cpu_account",
            "dtype": precision_label(precision), "threads": torch.get_num_threads(),
            "torch_version": torch.__version__, "training": rows, "budget": fits, "inference": cost}
