"""Prepare the papers' benchmarks from the original datasets: VTAB-1k task folders and few-shot FGVC lists."""
from .fgvc import prepare_fgvc
from .vtab import RULES, UNSUPPORTED, VTAB_TEST_SIZES, prepare_vtab

__all__ = ["prepare_fgvc", "prepare_vtab", "RULES", "UNSUPPORTED", "VTAB_TEST_SIZES"]
