"""[protocol] cache_dtype takes the cache storage dtypes, int8 included; anything else is a one-line error."""
from __future__ import annotations

from pathlib import Path

import pytest

from qtune.cli import main
from qtune.data.offline import make_offline_benchmark
from qtune.experiments.spec import load_spec
from tests.experiments.test_spec import write_spec


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    return make_offline_benchmark(tmp_path_factory.mktemp("data"), tasks=["dsprites_loc"], test_size=20)[0]


def _with_dtype(path: Path, task: Path, dtype: str) -> Path:
    spec = write_spec(path, task, "[methods.vqt]\n")
    spec.write_text(spec.read_text().replace('cache_dtype = "fp16"', f'cache_dtype = "{dtype}"'))
    return spec


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16", "int8"])
def test_cache_dtypes_are_accepted(task, tmp_path, dtype):
    assert load_spec(_with_dtype(tmp_path / "s.toml", task, dtype)).cache_dtype == dtype


def test_an_unknown_cache_dtype_is_one_line(task, tmp_path, capsys):
    spec = _with_dtype(tmp_path / "s.toml", task, "int4")
    assert main(["sweep", str(spec), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "protocol.cache_dtype" in err and "'int4'" in err and "int8" in err, err
