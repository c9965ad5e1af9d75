"""Fit a memory budget (the SynQT paper's Table 3): per method, the largest setting of its memory knob whose
measured training step fits.

Knobs, searched in order: ``trainable_blocks`` (1..depth; for a combination, its stream part's), then, for
side-path methods with query tokens (SynQT, VQT), ``tokens`` (1..max_tokens) at the blocks chosen. Each candidate
is measured (a real step, ``measure_training``), never estimated. The search is a binary search, which assumes that
memory does not decrease as the knob grows (more trainable blocks or more tokens never store less); it measures
the smallest setting first, then the largest, so it ends with the chosen value measured as fitting and the next one
up measured as not fitting (unless the largest fits). Methods without a knob are reported as fitting or not.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..backbones import Backbone
from ..methods import Combined, get_method


@dataclass(frozen=True)
class Knob:
    key: str  # the method option
    low: int
    high: int


def knobs(method: str, backbone: Backbone, max_tokens: int = 64) -> list[Knob]:
    """The memory knobs of ``method`` on ``backbone``, in search order."""
    cls = get_method(method)
    fields = cls.config_class.__dataclass_fields__
    out = []
    if issubclass(cls, Combined):
        out.append(Knob(f"{cls.stream_class.name}.trainable_blocks", 1, backbone.depth))
    elif "trainable_blocks" in fields:
        out.append(Knob("trainable_blocks", 1, backbone.depth))
    if not issubclass(cls, Combined) and cls.reads_taps and "tokens" in fields:
        out.append(Knob("tokens", 1, max_tokens))
    return out


def _largest(fits: Callable[[int], bool], low: int, high: int) -> int | None:
    """Largest v in [low, high] with fits(v), assuming fits is monotone (True then False); None if none."""
    if not fits(low):
        return None
    if fits(high):
        return high
    while high - low > 1:  # fits(low) and not fits(high)
        mid = (low + high) // 2
        if fits(mid):
            low = mid
        else:
            high = mid
    return low


def fit_budget(measure: Callable[[dict[str, Any]], dict[str, Any]], method: str, backbone: Backbone, budget: int,
               base_options: dict[str, Any] | None = None, max_tokens: int = 64) -> dict[str, Any]:
    """Search ``method``'s knobs against ``budget`` bytes; ``measure(options)`` returns a row with ``total``.

    Returns the chosen options, whether they fit, their measured total and every probe made.
    """
    probes: dict[tuple, dict[str, Any]] = {}

    def total(options: dict[str, Any]) -> int:
        key = tuple(sorted(options.items()))
        if key not in probes:
            probes[key] = {"options": dict(options), "total": measure(dict(options))["total"]}
            probes[key]["fits"] = probes[key]["total"] <= budget
        return probes[key]["total"]

    options = dict(base_options or {})
    searched = []
    for knob in knobs(method, backbone, max_tokens):
        v = _largest(lambda x, o=options, k=knob.key: total({**o, k: x}) <= budget, knob.low, knob.high)
        at = {**options, knob.key: knob.low if v is None else v}
        above = {**options, knob.key: v + 1} if v is not None and v < knob.high else None
        searched.append({"key": knob.key, "range": [knob.low, knob.high], "value": v, "total": total(at),
                         "next_total": total(above) if above else None})
        options = at
    final = total(options)
    return {"method": method, "budget": budget, "knobs": searched, "options": options, "total": final,
            "fits": final <= budget, "probes": list(probes.values())}
