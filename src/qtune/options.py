"""``key=value`` options as typed on a command line: parsed here, typed by the config that receives them."""
from __future__ import annotations

from .errors import ConfigError


def option_pairs(pairs: list[str], what: str) -> dict[str, str]:
    """``key=value`` strings to a dict of raw strings (``-`` in keys read as ``_``)."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{what}: bad option {pair!r} (expected key=value)")
        out[key.strip().replace("-", "_")] = raw.strip()
    return out
