"""Measured memory: bytes saved for backward, and (later) full training-step accounts."""
from .saved import SavedTensors, saved_bytes

__all__ = ["SavedTensors", "saved_bytes"]
