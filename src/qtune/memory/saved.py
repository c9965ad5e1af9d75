"""Bytes autograd keeps for backward, measured with ``torch.autograd.graph.saved_tensors_hooks``.

Counted per storage, so a tensor saved twice (or two views of one storage) counts once. Tensors whose storage is
a parameter's (frozen or trainable weights, and views of them) exist anyway and are reported apart; everything else
(activations, and the batch's inputs such as K/V read from the frozen stream) is what backward costs.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch


def _key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


class SavedTensors:
    """Context manager: while active, records every tensor autograd saves for backward."""

    def __init__(self, parameters: Iterable[torch.Tensor] = ()) -> None:
        self._param_keys = {_key(p) for p in parameters}
        self._saved: dict[tuple[str, int], int] = {}
        self._params: dict[tuple[str, int], int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _key(t)
        bucket = self._params if key in self._param_keys or isinstance(t, torch.nn.Parameter) else self._saved
        bucket[key] = max(bucket.get(key, 0), t.untyped_storage().nbytes())
        return t

    def __enter__(self) -> "SavedTensors":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)

    @property
    def activation_bytes(self) -> int:
        """Saved tensors held only because backward needs them (activations and batch inputs)."""
        return sum(self._saved.values())

    @property
    def parameter_bytes(self) -> int:
        """Saved parameters (and views of them): memory held anyway, reported apart."""
        return sum(self._params.values())


def saved_bytes(step: Callable[[], torch.Tensor], parameters: Iterable[torch.Tensor] = ()) -> int:
    """Activation bytes saved for backward by ``step()`` (a forward returning the loss)."""
    with SavedTensors(parameters) as rec:
        step()
    return rec.activation_bytes
