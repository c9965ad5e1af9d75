"""Successive halving in the sweep's selection: the rule, its agreement with the full protocol where both train the
same candidate, resuming at a rung, and the spec's checks."""
from __future__ import annotations

from pathlib import Path

import pytest

from qtune.cli import main
from qtune.experiments.planner import halving_survivors
from qtune.experiments.spec import Halving
from qtune.experiments.store import Store, Trial
from qtune.experiments.sweep import run_sweep
from qtune.report.sweep_report import write_report
from tests.experiments.test_sweep import write_spec

METHODS = """
[methods.linear]
grid = { lr = [0.3, 0.03, 0.003, 0.0003] }
[methods.vqt]
options = { tokens = 1 }
grid = { lr = [0.01, 0.1] }
"""
HALVING = "halving = { eta = 2, rungs = [0.34] }\n"  # 3 epochs: scored after epoch 1, then at the end


def _spec(tmp_path: Path, task: Path, halving: bool) -> Path:
    spec = write_spec(tmp_path / ("h.toml" if halving else "f.toml"), task, epochs=3, methods=METHODS, seeds="[0]")
    if halving:
        text = spec.read_text().replace("[protocol]\n", "[protocol]\n" + HALVING)
        spec.write_text(text)
    return spec


def _trial(candidate: int, fold: int, scores: list[float]) -> Trial:
    return Trial(f"{candidate}/{fold}", "t", "m", "fold", fold, 0, candidate, {},
                 metrics={"rungs": [{"epoch": i + 1, "metric": s} for i, s in enumerate(scores)]})


def test_the_rule_keeps_the_best_third_rounded_up_and_breaks_ties_by_grid_order():
    h = Halving(eta=3, rungs=(0.2, 0.4))
    assert h.epochs(50) == [10, 20, 50] and h.epochs(2) == [1, 1, 2]
    assert [h.keep(n) for n in (1, 2, 3, 4, 8, 9, 10)] == [1, 1, 1, 2, 3, 3, 4]
    first = [0.5, 0.9, 0.7, 0.7, 0.1, 0.8, 0.2, 0.3]  # candidates 0..7, one fold each
    trials = [_trial(c, 0, [s]) for c, s in enumerate(first)]
    alive, decided = halving_survivors(trials, h)
    assert alive == [set(range(8)), {1, 5, 2}] and not decided
    # the second rung: 2 beats 5 and 1 on the mean over two folds; ties go to the earlier candidate
    trials = [_trial(c, f, [first[c], s]) for c, s in ((1, 0.6), (5, 0.6), (2, 0.7)) for f in (0, 1)]
    trials += [_trial(c, 0, [s]) for c, s in enumerate(first) if c not in (1, 5, 2)]
    alive, decided = halving_survivors(trials, h)
    assert alive[-1] == {2} and decided
    trials = [t for t in trials if t.candidate != 2] + [_trial(2, f, [0.7, 0.6]) for f in (0, 1)]
    assert halving_survivors(trials, h)[0][-1] == {1}


def test_halving_chooses_as_the_full_protocol_at_fewer_model_epochs(task, tmp_path):
    full = run_sweep(_spec(tmp_path, task, False), tmp_path / "full", jobs=1, progress=False)
    half = run_sweep(_spec(tmp_path, task, True), tmp_path / "half", jobs=1, progress=False)
    f_store, h_store = Store(tmp_path / "full" / "store.sqlite"), Store(tmp_path / "half" / "store.sqlite")
    f_trials, h_trials = f_store.trials(full), h_store.trials(half)
    assert all(t.state == "done" for t in h_trials)
    folds = {(t.method, t.candidate, t.fold): t for t in f_trials if t.kind == "fold"}
    h_folds = [t for t in h_trials if t.kind == "fold"]
    # linear: 4 candidates -> 2 go on to the end; vqt: 2 -> 1, the choice (not trained further)
    reached = {(t.method, t.candidate): len(t.rungs) for t in h_folds}
    assert sorted(n for (m, _), n in reached.items() if m == "linear") == [1, 1, 2, 2]
    assert sorted(n for (m, _), n in reached.items() if m == "vqt") == [1, 1]
    for t in h_folds:
        assert [r["epoch"] for r in t.rungs] == [1, 3][:len(t.rungs)]
        assert t.metrics["epochs"] == t.rungs[-1]["epoch"] and t.metric == t.rungs[-1]["metric"]
        if len(t.rungs) == 2:  # went on from its rung-1 state in a smaller stack: the full run's score
            assert t.metric == pytest.approx(folds[(t.method, t.candidate, t.fold)].metric, abs=1e-9)
    epochs = sum(t.metrics["epochs"] for t in h_folds)
    assert epochs == (4 * 1 + 2 * 2) * 3 + 2 * 1 * 3 < sum(t.metrics["epochs"] for t in folds.values()) == 18 * 3
    # the finals: linear's choice is the full protocol's whenever the full protocol's best went on to the end
    chosen = {t.method: t.candidate for t in h_trials if t.kind == "final"}
    f_chosen = {t.method: t.candidate for t in f_trials if t.kind == "final"}
    if reached[("linear", f_chosen["linear"])] == 2:
        assert chosen["linear"] == f_chosen["linear"]
    assert reached[("vqt", chosen["vqt"])] == 1 and reached[("linear", chosen["linear"])] == 2
    assert not list((tmp_path / "half" / "rungs").glob("*"))  # states go once the choice is made
    write_report(tmp_path / "half")
    chosen_md = (tmp_path / "half" / "report" / "chosen.md").read_text()
    assert chosen_md.count(" at epoch 1 (") == 2 + 1  # linear's two stopped candidates, vqt's one


def test_a_sweep_stopped_after_a_rung_resumes_there(task, tmp_path, monkeypatch, capsys):
    from qtune.experiments import units

    real, calls = units.select, []

    def crash_at_the_end(unit):
        calls.append((unit.items[0].until, len(unit.items)))
        if unit.items[0].until == 3 and len(calls) < 4:
            raise RuntimeError("node lost")
        return real(unit)

    monkeypatch.setattr(units, "select", crash_at_the_end)
    spec, out = _spec(tmp_path, task, True), tmp_path / "run"
    assert main(["sweep", str(spec), "--out", str(out), "--jobs", "1", "--quiet"]) == 2
    assert "node lost" in capsys.readouterr().err
    assert len(list((out / "rungs").glob("*.safetensors"))) == 2 * 3  # linear's survivors wait at rung 1
    first = len(calls)
    assert main(["sweep", str(spec), "--out", str(out), "--jobs", "1", "--quiet"]) == 0
    assert [c for c in calls[first:]] == [(3, 6)]  # only the last rung of linear's survivors ran again
    store = Store(out / "store.sqlite")
    trials = store.trials(store.latest_sweep())
    assert all(t.state == "done" for t in trials) and len([t for t in trials if t.kind == "final"]) == 2


@pytest.mark.parametrize("value, message", [
    ("{ eta = 1 }", "protocol.halving.eta: a number > 1"),
    ("{ rungs = [0.5, 0.2] }", "protocol.halving.rungs: increasing fractions"),
    ("{ rungs = [1.0] }", "protocol.halving.rungs: increasing fractions"),
    ("{ eta = 3, rung = [0.2] }", "protocol.halving: unknown field(s) rung"),
    ("3", "protocol.halving: expected a table"),
])
def test_bad_halving_is_one_line(task, tmp_path, capsys, value, message):
    spec = _spec(tmp_path, task, False)
    spec.write_text(spec.read_text().replace("[protocol]\n", f"[protocol]\nhalving = {value}\n"))
    assert main(["sweep", str(spec), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err


def test_stream_methods_go_on_from_fits_state(task, tmp_path):
    """A stream method's candidates train alone with fit, whose state at the rung is the one it goes on from: the
    survivors end bit for bit where the full protocol's runs end."""
    methods = "[methods.bitfit]\ngrid = { lr = [0.03, 0.01, 0.001] }\n"
    spec = write_spec(tmp_path / "f.toml", task, epochs=3, methods=methods, seeds="[0]")
    full = run_sweep(spec, tmp_path / "run", jobs=1, progress=False)
    spec.write_text(spec.read_text().replace("[protocol]\n", "[protocol]\n" + HALVING))
    half = run_sweep(spec, tmp_path / "run", jobs=1, progress=False)  # one folder: two sweeps, their own trials
    store = Store(tmp_path / "run" / "store.sqlite")
    f_folds = {(t.candidate, t.fold): t for t in store.trials(full) if t.kind == "fold"}
    h_folds = [t for t in store.trials(half) if t.kind == "fold"]
    assert not {t.key for t in f_folds.values()} & {t.key for t in h_folds}
    went_on = [t for t in h_folds if len(t.rungs) == 2]
    assert len(went_on) == 2 * 3 and len([t for t in h_folds if len(t.rungs) == 1]) == 3
    assert all(t.metric == f_folds[(t.candidate, t.fold)].metric for t in went_on)
