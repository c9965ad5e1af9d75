"""Training memory of one step, measured.

On CUDA: the allocator's peak over a full step (forward, backward, optimiser step), after reset_peak_memory_stats.
On CPU, an exact account, labelled as such: bytes of parameters, gradients and optimiser state (counted from the
tensors themselves), bytes saved for backward (saved_tensors_hooks), and the step's peak of newly allocated bytes,
read from the profiler's memory events (an allocator record, not an estimate). The step is the second of two, so
that optimiser state exists, and gradients are set to None before it, as in training.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile

from .saved import SavedTensors


def _bytes(tensors) -> int:
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            key = (str(t.device), t.untyped_storage().data_ptr())
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
    return sum(seen.values())


@dataclass
class StepMemory:
    """One training step's memory, in bytes. ``total`` is what the step needs at its peak."""

    kind: str  # "cpu_account" or "cuda_peak"
    parameters: int
    gradients: int
    optimizer_state: int
    inputs: int
    saved_for_backward: int
    step_peak: int  # bytes allocated during the step above what was resident before it (CPU); 0 on CUDA
    total: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def _native_stderr_silenced():
    """The profiler's native backend prints start/stop lines straight to fd 2; keep them off the user's terminal."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _profiled_peak(fn: Callable[[], None]) -> int:
    """Peak of bytes allocated (net of frees) while ``fn`` runs, from the profiler's CPU memory events."""
    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        trace = Path(d) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    level = peak = 0
    for e in sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0),
                    key=lambda e: e["ts"]):
        level += e["args"]["Bytes"]
        peak = max(peak, level)
    return peak


def measure_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[], torch.Tensor], inputs: Any = ()) -> StepMemory:
    """Measure one training step ``loss_fn(); backward; optimizer.step()`` of ``model``."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    device = trainable[0].device if trainable else torch.device("cpu")

    def step(record: SavedTensors | None = None) -> None:
        optimizer.zero_grad(set_to_none=True)
        if record is None:
            loss = loss_fn()
        else:
            with record:
                loss = loss_fn()
        loss.backward()
        optimizer.step()

    step()  # creates the optimiser state
    saved = SavedTensors(model.parameters())
    params = _bytes(model.parameters())
    grads = _bytes(p for p in trainable)
    opt_state = _bytes(v for s in optimizer.state.values() for v in s.values())
    in_bytes = _bytes(inputs if isinstance(inputs, (list, tuple)) else [inputs])
    if device.type == "cuda":
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(saved)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return StepMemory("cuda_peak", params, grads, opt_state, in_bytes, saved.activation_bytes, 0, peak)
    optimizer.zero_grad(set_to_none=True)
    step_peak = _profiled_peak(lambda: step(saved))
    return StepMemory("cpu_account", params, grads, opt_state, in_bytes, saved.activation_bytes, step_peak,
                      params + opt_state + in_bytes + step_peak)
