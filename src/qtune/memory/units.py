"""Byte sizes as people write them (``3GB``, ``2.5GiB``, ``800MB``) and back."""
from __future__ import annotations

import re

from ..errors import ConfigError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")


def parse_bytes(text: str) -> int:
    """``"3GB"`` -> 3_000_000_000, ``"2.5GiB"`` -> 2_684_354_560. SI units are powers of 1000, ``*iB`` of 1024;
    a bare number is bytes. Raises ConfigError on anything else."""
    m = _SIZE.match(str(text))
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _UNITS:
        raise ConfigError(f"memory size {text!r}: expected a number with a unit, e.g. 3GB, 2.5GiB or 800MB")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ConfigError(f"memory size {text!r} must be > 0")
    return n


def binary_unit(largest: float) -> tuple[str, int]:
    """The unit a column of sizes is printed in: GiB for ViT-B-sized figures, MiB (or KiB) for small ones, so that
    small figures do not print as 0.000."""
    for name, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if largest >= scale:
            return name, scale
    return "KiB", 2**10


def format_bytes(n: float, digits: int = 1) -> str:
    """``1_932_735_283`` -> ``"1.8 GiB"``: one size in the largest binary unit that keeps it >= 1."""
    if n < 2**10:
        return f"{int(n)} B"
    name, scale = binary_unit(n)
    return f"{n / scale:.{digits}f} {name}"
