"""The per-task protocol runner shared by the demo and the benchmarks: selection only when there is a choice,
several seeds, results kept per (task, plan) so that a rerun resumes, partial methods not averaged."""
from __future__ import annotations

import pytest

from qtune.data.offline import make_offline_benchmark
from qtune.demo import demo_weights
from qtune.engine.loop import TrainConfig
from qtune.experiments import benchmark
from qtune.experiments.benchmark import MethodPlan, run_task
from qtune.report.tables import ResultRow, benchmark_table

CFG = TrainConfig(epochs=1, warmup_epochs=0, progress=False)
PLANS = [MethodPlan("linear", CFG, ({"lr": 1e-2},), seeds=(0, 1)),
         MethodPlan("linear", CFG, ({"lr": 1e-2}, {"lr": 1e-3}), label="linear-grid")]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return make_offline_benchmark(tmp_path_factory.mktemp("bench"), tasks=["dsprites_loc"], test_size=20)[0]


def test_selection_seeds_and_resume(task_dir, tmp_path, monkeypatch, capsys):
    rows = run_task("dsprites_loc", task_dir, tmp_path, PLANS, demo_weights())
    fixed, grid = rows
    assert fixed.method == "linear" and grid.method == "linear-grid"
    assert fixed.hparams["val_accuracy"] is None  # one candidate: no validation run
    assert grid.hparams["val_accuracy"] is not None and grid.hparams["lr"] in (1e-2, 1e-3)
    assert len(fixed.hparams["seed_accuracies"]) == 2
    assert fixed.accuracy == pytest.approx(sum(fixed.hparams["seed_accuracies"]) / 2)
    out = capsys.readouterr().out
    assert out.count("train800->val200") == 2 and out.count("->test") == 3  # 2 seeds + 1 final

    def no_training(*args, **kwargs):
        raise AssertionError("a finished plan was trained again")

    monkeypatch.setattr(benchmark, "fit", no_training)
    assert run_task("dsprites_loc", task_dir, tmp_path, PLANS, demo_weights()) == rows  # read back, not retrained
    with pytest.raises(AssertionError, match="trained again"):  # another schedule is another result
        run_task("dsprites_loc", task_dir, tmp_path, [MethodPlan("linear", TrainConfig(epochs=2, progress=False))],
                 demo_weights())


def test_one_cache_per_task_holds_what_every_side_plan_reads(task_dir, tmp_path, capsys):
    """A method reading block points (DTL: X_0 .. X_M per token) trains from the task's cache, not live; the cache
    is named by what it stores, so it never collides with a plain K/V cache of the same task."""
    plans = [MethodPlan("linear", CFG), MethodPlan("dtl", CFG)]
    rows = run_task("dsprites_loc", task_dir, tmp_path, plans, demo_weights(), cache_dtype="fp16")
    assert [r.method for r in rows] == ["linear", "dtl"] and rows[1].memory_kind
    assert "tracing live" not in capsys.readouterr().out
    (cache,) = (tmp_path / "cache").iterdir()
    assert cache.name.startswith("dsprites_loc-fp16-")
    assert sorted(f.name for f in cache.glob("point_x_*.npy")) == [f"point_x_{b:03d}.npy" for b in range(7)]
    assert not list(cache.glob("block_*.npy"))  # neither method reads K/V


def test_partial_methods_get_no_group_mean():
    def row(method, task, group, acc):
        return ResultRow(method, task, group, acc, 1, 1, "cpu", 1.0, {})

    rows = [row("a", "t1", "natural", 0.5), row("a", "t2", "structured", 0.7), row("b", "t1", "natural", 0.9)]
    a, b = benchmark_table(rows, ["natural", "structured"], {"t1": "natural", "t2": "structured"})
    assert a["mean_of_groups"] == pytest.approx(0.6)
    assert b["mean_natural"] == 0.9 and "mean_structured" not in b and "mean_of_groups" not in b

    a, b = benchmark_table(rows, ["natural", "structured"], {"t1": "natural", "t2": "structured", "t3": "natural"})
    assert "mean_natural" not in a and "mean_of_groups" not in a  # t3 missing: no natural mean for anyone
