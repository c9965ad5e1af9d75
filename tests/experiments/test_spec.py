"""Rows of their own in a sweep spec: a labelled method, a method on some tasks only, on a backbone of its own
(model_args, input size), a grid given as its points, a per-task grid."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from qtune.cli import main
from qtune.data.offline import make_offline_benchmark
from qtune.experiments.spec import load_spec, toml_value
from qtune.experiments.store import Store
from qtune.experiments.sweep import run_sweep
from qtune.report.sweep_report import write_report

ROWS = """
[methods.linear]
grid = { lr = [0.01, 0.001] }

[methods."linear-fixed"]
method = "linear"
grid = [{ lr = 0.01 }]

[methods."bitfit@16"]
method = "bitfit"
tasks = ["dsprites_loc"]
model_args = { img_size = 16 }
input_size = 16

[overrides.dsprites_loc.linear]
grid = [{ lr = 0.1 }, { lr = 0.001, weight_decay = 0.0 }]
"""


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    return make_offline_benchmark(tmp_path_factory.mktemp("data"), tasks=["dsprites_loc"], test_size=20)[0]


def write_spec(path: Path, task: Path, methods: str = ROWS) -> Path:
    path.write_text(f"""
[backbone]
weights = "demo"
[tasks]
vtab = [{toml_value(str(task))}]
[train]
epochs = 1
warmup_epochs = 0
batch_size = 100
[protocol]
selection = "val"
seeds = [0]
cache_dtype = "fp16"
{methods}""")
    return path


def test_rows_of_their_own_are_read(task, tmp_path):
    spec = load_spec(write_spec(tmp_path / "s.toml", task))
    linear, fixed, bitfit = spec.methods
    assert (fixed.name, fixed.method) == ("linear-fixed", "linear") and linear.method == "linear"
    assert [c.train["lr"] for c in spec.candidates("dsprites_loc", fixed)] == [0.01]
    # the task's grid replaces the method's: its points, as listed
    assert [(c.train["lr"], c.train.get("weight_decay")) for c in spec.candidates("dsprites_loc", linear)] == [
        (0.1, None), (0.001, 0.0)]
    assert bitfit.tasks == ["dsprites_loc"] and spec.methods_on("dsprites_loc") == spec.methods
    own = bitfit.backbone(spec.backbone)
    assert own.model_args["img_size"] == 16 and own.preprocessing == {"input_size": 16}
    assert linear.backbone(spec.backbone) is spec.backbone


def test_a_sweep_runs_labelled_rows_and_a_row_on_its_own_backbone(task, tmp_path):
    spec = write_spec(tmp_path / "s.toml", task)
    out = tmp_path / "run"
    h = run_sweep(spec, out, jobs=1, progress=False)
    store = Store(out / "store.sqlite")
    finals = {t.method: t for t in store.trials(h) if t.kind == "final"}
    assert set(finals) == {"linear", "linear-fixed", "bitfit@16"}
    assert finals["linear-fixed"].config["method"] == "linear" and finals["bitfit@16"].config["method"] == "bitfit"
    assert finals["linear-fixed"].key != finals["linear"].key
    assert store.test_reads(h) == {"dsprites_loc": 2}  # one test pass per backbone
    store.close()
    adapter = json.loads((Path(finals["bitfit@16"].metrics["checkpoint"]) / "adapter_config.json").read_text())
    assert adapter["backbone"]["model_args"]["img_size"] == 16
    assert [c.name for c in (out / "cache").iterdir()] and len(list((out / "cache").iterdir())) == 1
    write_report(out, quiet=True)
    rows = json.loads((out / "report" / "results.json").read_text())
    assert [r["method"] for r in rows] == ["linear", "linear-fixed", "bitfit@16"]


@pytest.mark.parametrize("methods, field", [
    ("[methods.x]\nmethod = 'nope'\n", "methods.x"),
    ("[methods.linear]\ntasks = ['elsewhere']\n", "methods.linear.tasks"),
    ("[methods.linear]\ninput_size = 0\n", "methods.linear.input_size"),
    ("[methods.linear]\ngrid = []\n", "methods.linear.grid"),
    ("[methods.linear]\ngrid = [{ lr = -1.0 }]\n", "methods.linear"),
    ("[methods.linear]\n[overrides.dsprites_loc.linear]\ngrid = { lr = 0.1 }\n", "overrides.dsprites_loc.linear.grid"),
])
def test_bad_rows_are_one_line_naming_the_field(task, tmp_path, capsys, methods, field):
    spec = write_spec(tmp_path / "bad.toml", task, methods)
    assert main(["sweep", str(spec), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and field in err, err
