"""memory.csv/json/png from results of each part; accuracies read from the shapes qtune writes."""
import json

import pytest

from qtune.errors import ConfigError
from qtune.memory import compare_methods
from qtune.report.memory import format_memory, read_accuracies, write_memory
from tests.conftest import tiny_backbone


def test_inference_only_run_writes_every_file(tmp_path):
    result = compare_methods(tiny_backbone(), ["linear", "vqt"], batch_size=2, num_classes=5, training=False,
                             inference=True)
    assert result["training"] == [] and len(result["inference"]) == 2
    assert "GFLOPs/img" in format_memory(result)
    paths = write_memory(tmp_path, result)
    assert [p.name for p in paths] == ["memory.json", "memory.csv", "memory.png"]
    assert json.loads((tmp_path / "memory.json").read_text())["inference"][1]["method"] == "vqt"
    assert (tmp_path / "memory.png").stat().st_size > 1000


def test_read_accuracies(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps([{"method": "synqt", "mean_of_groups": 0.6, "x": 1}]))
    assert read_accuracies(tmp_path) == {"synqt": 0.6}
    rows = tmp_path / "results.json"
    rows.write_text(json.dumps([{"method": "vqt", "accuracy": 0.4}, {"method": "vqt", "accuracy": 0.6}]))
    assert read_accuracies(rows) == {"vqt": pytest.approx(0.5)}
    run = tmp_path / "result.json"
    run.write_text(json.dumps({"method": "linear", "test_accuracy": 0.3}))
    assert read_accuracies(run) == {"linear": 0.3}
    for bad, match in ((tmp_path / "none.json", "not found"), (tmp_path / "empty", "no summary.json")):
        if bad.name == "empty":
            bad.mkdir()
        with pytest.raises(ConfigError, match=match):
            read_accuracies(bad)
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(ConfigError, match="not a readable"):
        read_accuracies(tmp_path / "junk.json")
