"""Every example spec is a valid sweep spec: its methods, options, grids and fields pass the checks a sweep makes
before it runs (their data folders faked, a GPU spec read as CPU)."""
import tomllib
from pathlib import Path

import pytest

from qtune.experiments.spec import load_spec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NEEDS_OTHER_RUNS = {"sweep-hierarchical.toml"}  # reads the weights examples/pretrain-hierarchical.sh writes


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.toml") if p.name not in NEEDS_OTHER_RUNS))
def test_example_spec_loads(name, tmp_path):
    text = (EXAMPLES / name).read_text().replace('device = "cuda"', 'device = "cpu"')
    raw = tomllib.loads(text)
    specs = tmp_path / "examples"
    specs.mkdir()
    for folder in raw.get("tasks", {}).get("vtab", []):
        (specs / folder).mkdir(parents=True, exist_ok=True)
    for entry in raw.get("tasks", {}).get("fgvc", []):
        (specs / entry["annotations"]).mkdir(parents=True, exist_ok=True)
    (specs / name).write_text(text)
    spec = load_spec(specs / name)
    assert [m.name for m in spec.methods] == list(raw["methods"])
