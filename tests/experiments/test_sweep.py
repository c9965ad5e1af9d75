"""qtune sweep: the protocol, the store, resuming, executors, the report."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from qtune.cli import main
from qtune.experiments.store import Store
from qtune.experiments.sweep import run_sweep
from qtune.report.sweep_report import write_report
from tests.conftest import TINY, TINY_NAME


def write_spec(path: Path, task: Path, epochs: int = 2, methods: str | None = None, selection: str = "kfold",
               seeds: str = "[0, 1]") -> Path:
    args = ", ".join(f"{k} = {v}" for k, v in TINY.items())
    methods = methods or """
[methods.linear]
grid = { lr = [0.01, 0.001] }
[methods.vqt]
options = { tokens = 1 }
grid = { lr = [0.01, 0.1] }
[methods.synqt]
options = { tokens = 1, bottleneck = 8, qsm_bottleneck = 4 }
"""
    path.write_text(f"""
name = "tiny"
[backbone]
name = "{TINY_NAME}"
random_init = true
model_args = {{ {args} }}
[tasks]
vtab = ["{task}"]
[train]
epochs = {epochs}
batch_size = 8
warmup_epochs = 1
[protocol]
selection = "{selection}"
folds = 3
seeds = {seeds}
cache_dtype = "fp32"
{methods}""")
    return path


def table(out: Path) -> str:
    return (out / "report" / "table.txt").read_text()


def accuracies(out: Path) -> list:
    """Every final run's test accuracy, per task and method (the table's figures without the timings)."""
    rows = json.loads((out / "report" / "results.json").read_text())
    return sorted((r["task"], r["method"], r["accuracy"], r["hparams"]["seed_accuracies"]) for r in rows)


def test_sweep_runs_the_protocol_and_reports(task, tmp_path):
    spec = write_spec(tmp_path / "s.toml", task)
    h = run_sweep(spec, tmp_path / "run", jobs=1, progress=False)
    store = Store(tmp_path / "run" / "store.sqlite")
    trials = store.trials(h)
    folds = [t for t in trials if t.kind == "fold"]
    finals = [t for t in trials if t.kind == "final"]
    assert len(folds) == 2 * 2 * 3  # 2 methods x 2 candidates x 3 folds (synqt has one candidate: none)
    assert len(finals) == 3 * 2  # 3 methods x 2 seeds
    assert all(t.state == "done" for t in trials)
    # each fold holds out a third of the 32 training images; every final model read the test split once
    assert sorted({t.metrics["held_out"] for t in folds}) == [10, 11]
    assert all(t.metrics["test_evaluations"] == 1 and t.metrics["test_images"] == 16 for t in finals)
    assert store.test_reads(h) == {"shapes4": 1}
    # finals use the chosen candidate: the best mean over folds
    for method in ("linear", "vqt"):
        scores = {c: sum(t.metric for t in folds if t.method == method and t.candidate == c) for c in (0, 1)}
        best = max((0, 1), key=lambda c: (scores[c], -c))
        assert {t.candidate for t in finals if t.method == method} == {best}
    store.close()
    assert all(Path(t.metrics["checkpoint"], "adapter.safetensors").is_file() for t in finals)
    # memory compares at one batch size (64, or the whole 32-image task), the recipe's own batch (8) kept beside it
    assert {(t.metrics["memory_batch_size"], t.metrics["recipe_batch_size"]) for t in finals} == {(32, 8)}
    assert all(t.metrics["recipe_memory_bytes"] < t.memory_bytes for t in finals if t.method != "linear")
    write_report(tmp_path / "run", figures=True)
    assert "memory / step at batch 32" in (tmp_path / "run" / "report" / "table.md").read_text()
    rows = json.loads((tmp_path / "run" / "report" / "results.json").read_text())
    assert all(r["hparams"]["recipe_batch_size"] == 8 for r in rows)
    for name in ("table.md", "table.txt", "summary.csv", "summary.json", "chosen.md", "accuracy_vs_memory.png",
                 "tsne-shapes4.png"):
        assert (tmp_path / "run" / "report" / name).is_file()
    assert "linear" in table(tmp_path / "run") and "vqt" in table(tmp_path / "run")
    assert (tmp_path / "run" / "report" / "feature-weights-shapes4-synqt.png").is_file()
    assert "lr=" in (tmp_path / "run" / "report" / "chosen.md").read_text()


def test_rerun_repeats_nothing_and_changed_spec_adds_trials(task, tmp_path):
    spec = write_spec(tmp_path / "s.toml", task, methods="[methods.linear]\ngrid = { lr = [0.01, 0.001] }\n")
    out = tmp_path / "run"
    h1 = run_sweep(spec, out, jobs=1, progress=False)
    stamp = dict(sqlite3.connect(out / "store.sqlite").execute("SELECT key, updated FROM trials"))
    assert run_sweep(spec, out, jobs=1, progress=False) == h1
    assert dict(sqlite3.connect(out / "store.sqlite").execute("SELECT key, updated FROM trials")) == stamp
    write_spec(spec, task, epochs=3, methods="[methods.linear]\ngrid = { lr = [0.01, 0.001] }\n")
    h2 = run_sweep(spec, out, jobs=1, progress=False)
    assert h2 != h1
    store = Store(out / "store.sqlite")
    new, old = store.trials(h2), store.trials(h1)
    assert not {t.key for t in new} & {t.key for t in old}  # other epochs: no trial of the first spec reused
    assert all(t.config["train"]["epochs"] == 3 for t in new)
    assert store.latest_sweep() == h2


def test_a_spec_listing_the_grid_in_another_order_reuses_trials_and_chooses_the_same(task, tmp_path):
    """Trials are shared across specs by key; their stored candidate index is the first spec's. The second spec's
    choice and CV accuracy must come from its own candidates, not from those indices."""
    from qtune.report.sweep_report import sweep_rows

    out = tmp_path / "run"
    spec = write_spec(tmp_path / "a.toml", task, methods="[methods.linear]\ngrid = { lr = [0.1, 1e-6] }\n",
                      selection="val", seeds="[0]")
    h1 = run_sweep(spec, out, jobs=1, progress=False)
    write_spec(spec, task, methods="[methods.linear]\ngrid = { lr = [1e-6, 0.1] }\n", selection="val", seeds="[0]")
    h2 = run_sweep(spec, out, jobs=1, progress=False)
    store = Store(out / "store.sqlite")
    assert {t.key for t in store.trials(h2)} == {t.key for t in store.trials(h1)}  # nothing retrained
    (first,), _ = sweep_rows(store, h1)
    (second,), _ = sweep_rows(store, h2)
    assert second.hparams["chosen"] == first.hparams["chosen"]
    assert second.hparams["selection_accuracy"] == first.hparams["selection_accuracy"]
    assert second.accuracy == first.accuracy


def test_sigkilled_sweep_resumes_to_the_same_table(task, tmp_path, capsys):
    spec = write_spec(tmp_path / "s.toml", task)
    whole = tmp_path / "whole"
    run_sweep(spec, whole, jobs=1, progress=False)
    write_report(whole)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "qtune.cli", "sweep", str(spec), "--out", str(out), "--jobs", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # kill it once some selection trials are recorded, mid-sweep
        if "selection of" in line:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    states = [r[0] for r in sqlite3.connect(out / "store.sqlite").execute("SELECT state FROM trials")]
    assert "done" in states and set(states) != {"done"}
    assert main(["sweep", str(spec), "--out", str(out), "--jobs", "1", "--quiet"]) == 0
    assert accuracies(out) and accuracies(out) == accuracies(whole)
    said = capsys.readouterr().out  # at the end: the disk the caches take, and how to free it
    assert "the caches hold " in said and f"`rm -r {out / 'cache'}` deletes them" in said


def test_specs_with_other_backbones_share_an_output_folder(task, tmp_path):
    methods = "[methods.vqt]\noptions = { tokens = 1 }\n"
    spec = write_spec(tmp_path / "a.toml", task, seeds="[0]", methods=methods)
    other = tmp_path / "b.toml"
    other.write_text(spec.read_text().replace("[backbone]", "[backbone]\ninit_seed = 1"))
    for s in (spec, other):
        h = run_sweep(s, tmp_path / "run", jobs=1, progress=False)
        assert all(t.state == "done" for t in Store(tmp_path / "run" / "store.sqlite").trials(h))
    assert len(list((tmp_path / "run" / "cache").iterdir())) == 2


def test_val_selection_holds_out_val200(task, tmp_path):
    spec = write_spec(tmp_path / "s.toml", task, selection="val", seeds="[0]",
                      methods="[methods.linear]\ngrid = { lr = [0.01, 0.001] }\n")
    h = run_sweep(spec, tmp_path / "run", jobs=1, progress=False)
    folds = [t for t in Store(tmp_path / "run" / "store.sqlite").trials(h) if t.kind == "fold"]
    assert len(folds) == 2 and {t.metrics["held_out"] for t in folds} == {8} and {t.fold for t in folds} == {-1}
    assert {t.metrics["trained_on"] for t in folds} == {24}  # train800 alone: val200 is not in its batches


def test_failed_unit_is_recorded_and_the_sweep_goes_on(task, tmp_path, monkeypatch, capsys):
    from qtune.experiments import units

    real = units.select

    def crash_vqt(unit):
        if unit.items[0].method == "vqt":
            raise RuntimeError("worker crashed")
        return real(unit)

    monkeypatch.setattr(units, "select", crash_vqt)
    out = tmp_path / "run"
    assert main(["sweep", str(write_spec(tmp_path / "s.toml", task)), "--out", str(out), "--jobs", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()  # a sweep with failed trials is not a success
    assert err.count("\n") == 0 and "6 of 16 trial(s) failed (first: shapes4 vqt: RuntimeError: worker crashed" in err
    trials = Store(out / "store.sqlite").trials(Store(out / "store.sqlite").latest_sweep())
    failed = [t for t in trials if t.state == "failed"]
    assert failed and all(t.method == "vqt" and "worker crashed" in t.error for t in failed)
    assert all(t.state == "done" for t in trials if t.method == "linear")
    assert not [t for t in trials if t.method == "vqt" and t.kind == "final"]
    assert "linear" in table(out)  # what did finish is reported


@pytest.mark.parametrize("text, field", [
    ("[tasks]\noffline = ['nope']\n[methods.linear]\n", "tasks.offline"),
    ("[tasks]\noffline = ['digits']\n[methods.nope]\n", "methods.nope"),
    ("[tasks]\noffline = ['digits']\n[methods.linear]\ngrid = { lr = 0.1 }\n", "methods.linear.grid.lr"),
    ("[tasks]\noffline = ['digits']\n[train]\nepoch = 3\n[methods.linear]\n", "train"),
    ("[tasks]\noffline = ['digits']\n[protocol]\nfolds = 1\n[methods.linear]\n", "protocol.folds"),
    ("[tasks]\noffline = ['digits']\n[methods.vqt]\noptions = { tokens = 0 }\n", "methods.vqt"),
    ("[tasks\n", "not valid TOML"),
    ("[tasks]\noffline = ['digits']\n[train]\nepochs = 2.5\n[methods.linear]\n", "epochs: expected a whole number"),
    ("[tasks]\noffline = ['digits']\n[train]\nepochs = 'two'\n[methods.linear]\n", "epochs: expected a whole number"),
    ("[tasks]\noffline = ['digits']\n[methods.linear]\ngrid = { lr = [0.1, nan] }\n", "lr: expected a finite"),
    ("[tasks]\noffline = ['digits']\n[train]\ndevice = 'cuda:99'\n[methods.linear]\n", "device 'cuda:99'"),
    ("[backbone]\nname = 'vit_tiny_patch16_224'\n[tasks]\noffline = ['digits']\n[methods.linear]\n",
     "backbone: backbone 'vit_tiny_patch16_224' has no weights: give weights = \"FILE\" or pretrained = true, "
     "or random_init = true"),
    ("[backbone]\nweights = 'demo'\nrandom_init = true\n[tasks]\noffline = ['digits']\n[methods.linear]\n",
     "backbone: random_init = true conflicts with weights"),
    ("[backbone]\nname = 'vit_tiny_patch16_224'\nrandom_init = 'yes'\n[tasks]\noffline = ['digits']\n"
     "[methods.linear]\n", "backbone: random_init: expected true or false, got 'yes'"),
])
def test_bad_spec_is_one_line_naming_the_field(tmp_path, capsys, text, field):
    spec = tmp_path / "bad.toml"
    spec.write_text(text)
    assert main(["sweep", str(spec), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(spec) in err and field in err


@pytest.mark.parametrize("flags, culprit", [(["--jobs", "0"], "--jobs must be >= 1"),
                                            (["--out", "{file}"], "--out names a file")])
def test_bad_sweep_flags_are_one_line(tmp_path, capsys, flags, culprit):
    spec = tmp_path / "s.toml"
    spec.write_text("[tasks]\noffline = ['digits']\n[methods.linear]\n")
    (tmp_path / "file").write_text("x")
    flags = [f.replace("{file}", str(tmp_path / "file")) for f in flags]
    assert main(["sweep", str(spec), "--out", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and culprit in err and not (tmp_path / "run").exists()


def test_report_without_a_store_is_an_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no results store" in capsys.readouterr().err


def test_ray_executor_matches_local(task, tmp_path):
    ray = pytest.importorskip("ray")
    spec = write_spec(tmp_path / "s.toml", task, seeds="[0]")
    run_sweep(spec, tmp_path / "local", jobs=1, progress=False)
    write_report(tmp_path / "local")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        run_sweep(spec, tmp_path / "ray", executor="ray", progress=False)
    finally:
        ray.shutdown()
    write_report(tmp_path / "ray")
    assert accuracies(tmp_path / "local") and accuracies(tmp_path / "local") == accuracies(tmp_path / "ray")


def test_fewshot_tasks_select_on_val_train_on_shots_and_plot(tmp_path):
    from qtune.experiments.spec import load_spec
    from tests.data.test_layouts import make_fgvc

    ann = make_fgvc(tmp_path / "fgvc")
    methods = "[methods.linear]\ngrid = { lr = [0.01, 0.001] }\n"
    spec = write_spec(tmp_path / "s.toml", tmp_path, selection="val", seeds="[0]", methods=methods)
    text = spec.read_text().replace(f'vtab = ["{tmp_path}"]',
                                    f'[[tasks.fgvc]]\nannotations = "{ann}"\nshots = [1, 2]\nseeds = [0, 1]')
    spec.write_text(text)
    sources = load_spec(spec).tasks
    assert sorted(sources) == [f"oxford-pets-{k}shot-seed{s}" for k in (1, 2) for s in (0, 1)]
    data = sources["oxford-pets-2shot-seed0"].read()
    assert int(data.final_train.sum()) == 6 and int(data.val.sum()) == 2  # final runs: the shots only
    assert not (data.final_train & data.val).any()
    h = run_sweep(spec, tmp_path / "run", jobs=1, progress=False)
    trials = Store(tmp_path / "run" / "store.sqlite").trials(h)
    assert all(t.state == "done" for t in trials) and len([t for t in trials if t.kind == "final"]) == 4
    assert {t.metrics["held_out"] for t in trials if t.kind == "fold"} == {2}
    # every run reads only the shots it trains on: an epoch is a pass over k shots per class, not over shots + val
    shots = {t.task: int(t.task.split("-")[2][0]) * 3 for t in trials}  # 3 classes
    assert all(t.metrics["trained_on"] == shots[t.task] for t in trials)
    write_report(tmp_path / "run")
    md = (tmp_path / "run" / "report" / "fewshot.md").read_text()
    assert "1-shot" in md and "2-shot" in md and "oxford-pets" in md
    assert (tmp_path / "run" / "report" / "fewshot.png").is_file()
    spec.write_text(text.replace('selection = "val"', 'selection = "kfold"'))
    with pytest.raises(Exception, match="few-shot tasks select on their val list"):
        load_spec(spec)


def test_memory_budget_cuts_the_stacks(task, tmp_path, capsys):
    spec = write_spec(tmp_path / "s.toml", task, seeds="[0]",
                      methods="[methods.vqt]\noptions = { tokens = 1 }\ngrid = { lr = [0.01, 0.1] }\n")
    run_sweep(spec, tmp_path / "small", jobs=1, memory_budget=1)
    out = capsys.readouterr().out
    assert "1 model(s) per stack" in out and out.count("selection of 1 trial(s) done") == 6
    run_sweep(spec, tmp_path / "large", jobs=1, memory_budget=2**40)
    out = capsys.readouterr().out
    assert "6 model(s) per stack" in out and out.count("selection of 6 trial(s) done") == 1


def test_each_task_caches_exactly_what_its_side_paths_read(task, tmp_path):
    """A linear probe reads no K/V: its cache holds the pooled feature only; Head2Toe adds its pooled points, and
    the two never share a cache folder."""
    from qtune.cache import TapCache

    linear = "\n[methods.linear]\ngrid = { lr = [0.01] }\n"
    both = linear + "[methods.head2toe]\noptions = { target_size = 48 }\n"
    for name, methods in (("lin", linear), ("h2t", both)):
        spec = write_spec(tmp_path / f"{name}.toml", task, epochs=1, methods=methods, selection="val", seeds="[0]")
        run_sweep(spec, tmp_path / "run", jobs=1, progress=False)
    caches = sorted((tmp_path / "run" / "cache").iterdir())
    assert len(caches) == 2
    held = sorted((TapCache(c).blocks, tuple(p.key for p in TapCache(c).points)) for c in caches)
    assert held == [((), ()), ((), ("pre_attn.p48", "attn.p48", "mlp_hidden.p48", "mlp_out.p48"))]


def _children(pid: int) -> set[int]:
    """Live processes whose parent is ``pid`` (Linux /proc)."""
    out = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                out.add(int(d))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_workers_exit_when_the_driver_is_killed(task, tmp_path):
    import time

    spec = write_spec(tmp_path / "s.toml", task, epochs=30)
    cmd = [sys.executable, "-m", "qtune.cli", "sweep", str(spec), "--out", str(tmp_path / "run"), "--jobs", "2"]
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(_children(driver.pid)) < 3 and time.monotonic() < deadline:  # 2 workers + the resource tracker
            time.sleep(0.2)
        workers = _children(driver.pid)
        assert len(workers) >= 3, "the pool did not start"
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in workers if _alive(p)]


def test_a_reader_that_leaves_does_not_stop_the_sweep(task, tmp_path):
    spec = write_spec(tmp_path / "s.toml", task, seeds="[0]", methods="[methods.linear]\ngrid = { lr = [0.01, 0.001] }\n")
    out = tmp_path / "run"
    cmd = f"{sys.executable} -m qtune.cli sweep {spec} --out {out} --jobs 1 | head -1; exit ${{PIPESTATUS[0]}}"
    done = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stderr == "" and done.stdout.startswith("qtune sweep tiny")
    store = Store(out / "store.sqlite")
    trials = store.trials(store.latest_sweep())
    assert trials and all(t.state == "done" for t in trials)
