"""Cache fixtures: a VTAB-1k style dataset in a tmp folder, and a cache built from it."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.cache.cachedata import build, make_vtab


@pytest.fixture
def vtab(shapes, tmp_path) -> Path:
    return make_vtab(tmp_path / "vtab", shapes)


@pytest.fixture
def cache_dir(vtab, tmp_path) -> Path:
    build(tmp_path / "cache", vtab)
    return tmp_path / "cache"
