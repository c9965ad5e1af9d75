"""Experiment protocols: hyper-parameter selection on validation data, then one test evaluation."""
from .select import Selection, select_then_test

__all__ = ["Selection", "select_then_test"]
