"""qtune sweep on a multi-node Ray cluster on one machine (``ray.cluster_utils.Cluster``, as Ray tests itself): units
spread over nodes, a node that dies mid-unit, a driver that dies, checks before the first unit, GPU requests."""
from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from qtune.cli import main
from qtune.experiments import cluster as qcluster
from qtune.experiments.store import Store
from qtune.experiments.sweep import run_sweep
from qtune.report.sweep_report import write_report
from tests.experiments.test_sweep import accuracies, write_spec

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

# A dead node is declared dead after about 2 s instead of Ray's default 30 s.
HEALTH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_failure_threshold": 4}
UNIT = b"ray::run_on_node"  # a Ray worker's process title while it runs a unit
VQT = "[methods.vqt]\noptions = { tokens = 1 }\ngrid = { lr = [0.01, 0.1] }\n"


@pytest.fixture(scope="module")
def cluster():
    """A head node that runs no unit (0 CPUs), with this process as its driver; tests add worker nodes."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                      "_system_config": HEALTH})
    try:
        ray.init(address=c.address, log_to_driver=False)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture
def nodes(cluster):
    """``add(**node_args)``: a worker node of 1 CPU; the test's nodes still alive are removed at its end."""
    def add(**node_args):
        node = cluster.add_node(**{"num_cpus": 1, **node_args})
        cluster.wait_for_nodes()
        return node

    yield add
    for node in list(cluster.worker_nodes):
        cluster.remove_node(node, allow_graceful=False)


def baseline(spec: Path, out: Path, **kwargs) -> list:
    run_sweep(spec, out, jobs=1, progress=False, **kwargs)
    write_report(out)
    return accuracies(out)


@pytest.fixture(scope="module")
def long_spec(task, tmp_path_factory):
    """One task, one VQT stack of 6 selection trials long enough to be killed mid-unit, one final unit; and the
    local executor's accuracies for it."""
    root = tmp_path_factory.mktemp("long")
    spec = write_spec(root / "s.toml", task, epochs=40, seeds="[0]", methods=VQT)
    return spec, baseline(spec, root / "local")


def units_running() -> list[int]:
    """The processes of Ray workers running a unit now (Linux /proc)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if Path(f"/proc/{d}/cmdline").read_bytes().startswith(UNIT):
                    pids.append(int(d))
            except OSError:
                continue
    return pids


def wait_for_selection(out: Path, driver, before: tuple[int, ...] = (), timeout: float = 300) -> list[int]:
    """Once a selection unit is running on a worker (not one of the processes ``before``): those workers. ``driver``
    (a thread or a process) still runs the sweep."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (driver.is_alive() if hasattr(driver, "is_alive") else driver.poll() is None):
        try:
            running = sqlite3.connect(out / "store.sqlite").execute(
                "SELECT count(*) FROM trials WHERE kind = 'fold' AND state = 'running'").fetchone()[0]
        except sqlite3.Error:
            running = 0
        pids = [p for p in units_running() if p not in before] if running else []
        if pids:
            return pids
        time.sleep(0.1)
    raise AssertionError("no selection unit started (or the driver ended)")


def gone(pids: list[int], timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not [p for p in pids if Path(f"/proc/{p}").exists() and b"ray::" in _cmdline(p)]:
            return True
        time.sleep(0.2)
    return False


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def trials(out: Path) -> list:
    store = Store(out / "store.sqlite")
    try:
        return store.trials(store.latest_sweep())
    finally:
        store.close()


# -- placement and provenance ---------------------------------------------------------------------------------------

def test_units_spread_over_nodes_record_them_and_report_as_the_local_executor(nodes, task, tmp_path):
    spec = write_spec(tmp_path / "s.toml", task, seeds="[0]")
    local = baseline(spec, tmp_path / "local", max_stack=2)
    ids = {nodes().node_id, nodes().node_id}
    run_sweep(spec, tmp_path / "ray", executor="ray", max_stack=2, progress=False)
    write_report(tmp_path / "ray")
    assert accuracies(tmp_path / "ray") == local
    done = trials(tmp_path / "ray")
    assert done and all(t.state == "done" for t in done)
    assert {t.provenance["node"] for t in done} == ids  # 6 selection stacks of 2 and the finals, on both nodes
    assert all(t.provenance["hostname"] for t in done)


# -- a node dies ----------------------------------------------------------------------------------------------------

class Background(threading.Thread):
    """A driver run in a thread, so that the test's main thread (where Ray adds nodes) can remove nodes under it."""

    def __init__(self, fn, *args, **kwargs):
        super().__init__(daemon=True)
        self.call, self.result, self.error = (lambda: fn(*args, **kwargs)), None, None
        self.start()

    def run(self):
        try:
            self.result = self.call()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            self.error = e

    def outcome(self, timeout: float = 300):
        self.join(timeout)
        assert not self.is_alive(), "the sweep did not end"
        if self.error is not None:
            raise self.error
        return self.result


def node_of(cluster, pid: int):
    """The cluster node whose raylet started the worker ``pid``."""
    parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return next(n for n in cluster.worker_nodes if n.all_processes["raylet"][0].process.pid == parent)


def test_a_unit_whose_node_dies_is_retried_on_another_and_the_sweep_ends_as_an_uninterrupted_one(
        cluster, nodes, long_spec, tmp_path):
    spec, local = long_spec
    out = tmp_path / "ray"
    both = {nodes().node_id, nodes().node_id}
    sweep = Background(run_sweep, spec, out, executor="ray", progress=False)
    lost = node_of(cluster, wait_for_selection(out, sweep)[0])
    cluster.remove_node(lost, allow_graceful=False)  # its running unit goes with it
    sweep.outcome()
    write_report(out)
    assert accuracies(out) == local
    done = trials(out)
    assert all(t.state == "done" for t in done)
    assert {t.provenance["node"] for t in done if t.kind == "fold"} == both - {lost.node_id}  # it ran again there
    store = Store(out / "store.sqlite")
    assert store.db.execute("SELECT count(*), count(DISTINCT key) FROM trials").fetchone() == (len(done), len(done))
    assert store.test_reads(store.latest_sweep()) == {"shapes4": 1}
    store.close()


def test_a_unit_that_loses_its_node_on_every_try_fails_its_trials_and_the_sweep(
        cluster, nodes, long_spec, tmp_path, monkeypatch, capsys):
    spec, _ = long_spec
    out = tmp_path / "ray"
    monkeypatch.setattr(qcluster, "RETRIES", 1)
    nodes(), nodes()
    sweep = Background(main, ["sweep", str(spec), "--out", str(out), "--executor", "ray", "--quiet"])
    first = wait_for_selection(out, sweep)  # the first try
    cluster.remove_node(node_of(cluster, first[0]), allow_graceful=False)
    last = node_of(cluster, wait_for_selection(out, sweep, before=tuple(first))[0])  # its one retry
    cluster.remove_node(last, allow_graceful=False)
    assert sweep.outcome() == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "6 of 6 trial(s) failed" in err and last.node_id in err
    failed = trials(out)
    assert all(t.state == "failed" and "(2 tries)" in t.error and last.node_id in t.error for t in failed)


def test_a_retry_over_a_half_written_cache_and_checkpoints_gives_an_uninterrupted_runs_results(
        task, tmp_path, monkeypatch):
    """What a unit leaves on disk when its node dies under it: a cache build laid out but not traced, checkpoint
    files cut short. The unit run again over them gives the results of units never interrupted."""
    from qtune.backbones import Backbone
    from qtune.cache.manifest import MANIFEST, PLAN
    from qtune.engine.checkpoint import load_adapter
    from qtune.experiments.planner import Plan
    from qtune.experiments.spec import load_spec
    from qtune.experiments.units import run_unit

    spec = load_spec(write_spec(tmp_path / "s.toml", task, seeds="[0]", methods=VQT))
    clean, retried = Plan(spec, tmp_path / "clean"), Plan(spec, tmp_path / "retried")
    units = {p: {kind: p.unit(kind, "shapes4", trials, threads=1) for kind, trials in
                 (("cache", []), ("select", p.selection_trials()),
                  ("final", p.final_trials({("shapes4", "vqt"): spec.candidates("shapes4", spec.methods[0])[0]})))}
             for p in (clean, retried)}
    trace = Backbone.trace

    def lost(*args, **kwargs):
        raise RuntimeError("node lost")

    monkeypatch.setattr(Backbone, "trace", lost)
    assert "node lost" in run_unit(units[retried]["cache"]).error
    half = Path(units[retried]["cache"].cache)
    assert (half / PLAN).is_file() and not (half / MANIFEST).exists()
    monkeypatch.setattr(Backbone, "trace", trace)
    for item in units[retried]["final"].items:  # a final run's checkpoint cut short
        folder = Path(units[retried]["final"].checkpoints) / item.key
        folder.mkdir(parents=True)
        (folder / "adapter.safetensors").write_bytes(b"\0" * 10)
        (folder / "adapter_config.json").write_text("{")
    results = {}
    for p in (clean, retried):
        outcomes = [run_unit(units[p][kind]) for kind in ("cache", "select", "final")]
        assert [o.error for o in outcomes] == [None] * 3
        results[p] = {k: r["metric"] for o in outcomes for k, r in o.results.items()}
    assert results[retried] == results[clean] and len(results[clean]) == 7  # 6 fold trials and a final run
    backbone = spec.backbone.load()
    for item in units[retried]["final"].items:
        load_adapter(Path(units[retried]["final"].checkpoints) / item.key, backbone)


# -- the driver dies ------------------------------------------------------------------------------------------------

def test_a_killed_driver_leaves_no_unit_running_and_a_rerun_resumes_from_the_store(cluster, nodes, long_spec,
                                                                                     tmp_path):
    spec, local = long_spec
    out = tmp_path / "ray"
    nodes()
    cmd = [sys.executable, "-m", "qtune.cli", "sweep", str(spec), "--out", str(out), "--executor", "ray",
           "--address", cluster.address, "--quiet"]
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        busy = wait_for_selection(out, driver)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    assert gone(busy), "a unit of the dead driver kept running"  # Ray kills a dead job's workers
    assert not units_running()
    assert {t.state for t in trials(out) if t.kind == "fold"} == {"running"}  # as the driver left them
    run_sweep(spec, out, executor="ray", progress=False)
    write_report(out)
    assert accuracies(out) == local


# -- checks before the first unit -----------------------------------------------------------------------------------

def test_a_node_with_another_qtune_is_refused_before_any_unit(nodes, task, tmp_path, capsys):
    """The node imports a copy of qtune changed by one comment (PYTHONPATH): the same version, another source."""
    other = tmp_path / "other"
    shutil.copytree(Path(qcluster.__file__).parents[1], other / "qtune")
    with (other / "qtune" / "experiments" / "cluster.py").open("a") as f:
        f.write("# another build\n")
    nodes()
    odd = nodes(env_vars={"PYTHONPATH": str(other)})
    spec = write_spec(tmp_path / "s.toml", task, seeds="[0]", methods=VQT)
    out = tmp_path / "run"
    assert main(["sweep", str(spec), "--out", str(out), "--executor", "ray", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"({odd.node_id[:8]})" in err and str(other / "qtune") in err
    assert "the driver has " in err
    assert not (out / "store.sqlite").exists() and not (out / "cache").exists()  # refused before any unit
    assert not [f for f in out.iterdir() if f.name.startswith(".qtune-check")]


def test_the_checks_name_the_path_a_node_cannot_use(task, tmp_path):
    """``check_here`` is what runs on each node: a folder that is not the driver's, an unreadable task."""
    from qtune.experiments.planner import Plan
    from qtune.experiments.spec import load_spec

    spec = write_spec(tmp_path / "s.toml", task, seeds="[0]", methods=VQT)
    out = tmp_path / "run"
    out.mkdir()
    (out / ".token").write_text(".token")
    probe = qcluster.make_probe(Plan(load_spec(spec), out), ".token")
    assert qcluster.check_here(probe) is None
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    problem = qcluster.check_here(replace(probe, out=str(elsewhere)))
    assert problem.startswith(f"{elsewhere} is not the driver's folder") and "shared filesystem" in problem
    missing = replace(probe.tasks[0][0], path=str(tmp_path / "nowhere"))
    problem = qcluster.check_here(replace(probe, tasks=((missing, probe.tasks[0][1]),)))
    assert problem.startswith(f"cannot read task shapes4 at {tmp_path / 'nowhere'}")
    problem = qcluster.check_here(replace(probe, tasks=((probe.tasks[0][0], "0" * 16),)))
    assert problem == f"{task}: task shapes4's lists differ from the driver's"
    problem = qcluster.check_here(replace(probe, backbones=((probe.backbones[0][0], "f" * 64),)))
    assert "has weights hash" in problem and "the driver's ffffffffffff" in problem


def _private_mounts() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-m", "--propagation", "private", "mount", "-t", "tmpfs", "none", "/mnt"],
        capture_output=True).returncode == 0


@pytest.mark.skipif(not _private_mounts(), reason="needs mount namespaces (unshare -m) to hide a folder from a node")
def test_a_node_without_the_shared_folder_is_refused_before_any_unit(cluster, nodes, task, tmp_path, capsys):
    nodes()
    shared = tmp_path / "shared"
    shared.mkdir()
    ray_cli = Path(sys.executable).parent / "ray"
    hidden = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         f"mount -t tmpfs none {shared} && exec {ray_cli} start --address={cluster.address} --num-cpus=1 --block"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        spec = write_spec(tmp_path / "s.toml", task, seeds="[0]", methods=VQT)
        out = shared / "run"
        assert main(["sweep", str(spec), "--out", str(out), "--executor", "ray", "--quiet"]) == 2
    finally:
        os.killpg(hidden.pid, signal.SIGTERM)
        hidden.wait(timeout=60)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{out} is not the driver's folder" in err and "node " in err
    assert not (out / "store.sqlite").exists() and not (out / "cache").exists()


# -- GPUs -----------------------------------------------------------------------------------------------------------

def _units(task, tmp_path):
    from qtune.experiments.planner import Plan
    from qtune.experiments.spec import load_spec

    spec = write_spec(tmp_path / "s.toml", task, seeds="[0]", methods=VQT)
    plan = Plan(load_spec(spec), tmp_path / "run")
    select = plan.unit("select", "shapes4", plan.selection_trials(), threads=1)
    on = lambda unit, device: replace(unit, items=tuple(replace(i, train=replace(i.train, device=device))  # noqa
                                                        for i in unit.items))
    return plan.unit("cache", "shapes4", [], threads=1), on(select, "cpu"), on(select, "cuda"), on(select, "auto")


def test_a_unit_training_on_cuda_asks_for_gpus_per_unit(task, tmp_path):
    cache, cpu, cuda, auto = _units(task, tmp_path)
    assert qcluster.unit_options(cuda) == {"num_cpus": 1, "num_gpus": 1.0, "max_retries": qcluster.RETRIES,
                                           "retry_exceptions": False}
    assert qcluster.unit_options(cuda, 0.25)["num_gpus"] == 0.25
    assert qcluster.unit_options(cpu)["num_gpus"] == 0 and qcluster.unit_options(auto)["num_gpus"] == 0
    assert qcluster.unit_options(auto, 1, cluster_has_gpus=True)["num_gpus"] == 1
    assert qcluster.unit_options(replace(cache, items=cuda.items))["num_gpus"] == 0  # a cache is built on the CPU


@pytest.mark.parametrize("text, culprit", [("0", "got 0"), ("-1", "got -1"), ("1.5", "got 1.5"), ("'one'", "'one'"),
                                           ("true", "got True")])
def test_bad_gpus_per_unit_is_one_line_naming_it(task, tmp_path, capsys, text, culprit):
    spec = write_spec(tmp_path / "s.toml", task, seeds="[0]", methods=VQT)
    spec.write_text(spec.read_text().replace("[protocol]", f"[protocol]\ngpus_per_unit = {text}"))
    assert main(["sweep", str(spec), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "protocol.gpus_per_unit: must be a number > 0" in err and culprit in err


def test_ray_places_units_by_their_gpu_request(nodes, task, tmp_path):
    """A node that declares one GPU (no GPU needed: Ray counts it as a resource) and a node without: units that
    train on cuda run on the GPU node only, one at a time at 1 GPU per unit, two at once at 0.5."""
    def meet(folder: str, me: int, wait: float) -> tuple[dict, bool]:  # a unit's stand-in (defined here: sent by value)
        mine, other = Path(folder, str(me)), Path(folder, str(1 - me))
        mine.touch()
        deadline = time.monotonic() + wait
        while not other.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        met = other.exists()
        time.sleep(0.5)  # the other sees this one too
        mine.unlink()
        return qcluster.where_am_i(), met

    _, _, cuda, _ = _units(task, tmp_path)
    gpu_node = nodes(num_cpus=2, num_gpus=1)
    nodes(num_cpus=2)
    remote = ray.remote(meet)
    for share, together, wait in ((0.5, True, 60), (1.0, False, 3)):
        folder = tmp_path / str(share)
        folder.mkdir()
        runs = ray.get([remote.options(**qcluster.unit_options(cuda, share)).remote(str(folder), i, wait)
                        for i in range(2)])
        assert {r[0]["node"] for r in runs} == {gpu_node.node_id} and all(r[0]["gpus"] == ["0"] for r in runs)
        assert [r[1] for r in runs] == [together, together]
    with pytest.raises(qcluster.NodeCheckError, match="gpus_per_unit = 2: no node of the cluster has that many"):
        list(qcluster.run_units([cuda], None, 2.0))
