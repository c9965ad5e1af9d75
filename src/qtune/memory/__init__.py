"""Measured memory: bytes saved for backward, training-step accounts per method, budget fitting, inference cost."""
from .account import StepMemory, measure_step
from .budget import fit_budget, knobs
from .compare import compare_methods
from .cost import count_flops, inference_cost
from .saved import SavedTensors, saved_bytes
from .training import measure_training
from .units import parse_bytes

__all__ = ["SavedTensors", "StepMemory", "compare_methods", "count_flops", "fit_budget", "inference_cost", "knobs",
           "measure_step", "measure_training", "parse_bytes", "saved_bytes"]
