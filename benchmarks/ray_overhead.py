"""What the Ray executor costs over the local one: the same tiny sweep on the local executor with 2 workers and on a
2-node local Ray cluster (``ray.cluster_utils.Cluster``) with 1 CPU per node, wall time of each, and the overhead Ray
adds to one unit.

    python benchmarks/ray_overhead.py [--repeats 2] [--epochs 2] [--round-trips 20]

Each sweep starts from an empty output folder. The cluster is started before the clock (a real cluster is up before
the sweep); the first Ray sweep starts its workers and runs the checks before the first unit, later ones reuse the
workers. The overhead per unit is measured on its own: one unit (a task's cache, already built: the unit loads the
backbone, reads the lists and returns) run in this process, and sent to a warm Ray worker and back, one at a time;
the difference of the medians is what Ray adds (submitting, placing, sending the unit and its outcome).
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from qtune.data.synthetic import make_shapes
from qtune.experiments import sweep as sweep_module
from qtune.experiments.cluster import check_nodes, run_on_node
from qtune.experiments.planner import Plan
from qtune.experiments.spec import load_spec
from qtune.experiments.sweep import run_sweep
from qtune.experiments.units import run_unit

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 3, "num_heads": 3}  # tests/conftest.py's


def make_task(root: Path) -> Path:
    """A VTAB-1k style folder of generated shapes (4 classes): train800 24, val200 8, test 40."""
    images = root / "images"
    make_shapes(images / "train", per_class=8, seed=0)
    make_shapes(images / "test", per_class=10, seed=2)
    task = root / "shapes4"
    task.mkdir()
    lists: dict[str, list[str]] = {"train800": [], "val200": [], "test": []}
    for split in ("train", "test"):
        for c, folder in enumerate(sorted(p for p in (images / split).iterdir() if p.is_dir())):
            files = sorted(folder.iterdir())
            for i, f in enumerate(files):
                name = f"{split}_{folder.name}_{f.name}"
                shutil.copy2(f, task / name)
                lists["test" if split == "test" else ("val200" if i >= 6 else "train800")].append(f"{name} {c}\n")
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for split, lines in lists.items():
        (task / f"{split}.txt").write_text("".join(lines))
    return task


def write_spec(path: Path, task: Path, epochs: int) -> Path:
    args = ", ".join(f"{k} = {v}" for k, v in TINY.items())
    path.write_text(f"""name = "ray-overhead"
[backbone]
name = "vit_tiny_patch16_224"
random_init = true
model_args = {{ {args} }}
[tasks]
vtab = ["{task}"]
[train]
epochs = {epochs}
batch_size = 8
warmup_epochs = 1
[protocol]
folds = 3
seeds = [0, 1]
cache_dtype = "fp32"
[methods.linear]
grid = {{ lr = [0.01, 0.001] }}
[methods.vqt]
options = {{ tokens = 1 }}
grid = {{ lr = [0.01, 0.1] }}
""")
    return path


def counted() -> list[int]:
    """Counts the units the driver hands to its executor."""
    count = [0]
    execute = sweep_module.execute

    def counting(units, *args, **kwargs):
        count[0] += len(units)
        return execute(units, *args, **kwargs)

    sweep_module.execute = counting
    return count


def timed(spec: Path, out: Path, **kwargs) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    run_sweep(spec, out, progress=False, max_stack=2, **kwargs)
    return time.perf_counter() - start


def round_trips(spec: Path, out: Path, n: int) -> tuple[float, float, float]:
    """Median seconds of one unit here and through Ray, and of the checks on every node."""
    import ray

    plan = Plan(load_spec(spec), out)
    unit = plan.unit("cache", "shapes4", [], threads=1)
    task = ray.remote(num_cpus=1)(run_on_node)

    def clock(run) -> float:
        start = time.perf_counter()
        run()
        return time.perf_counter() - start

    here = statistics.median(clock(lambda: run_unit(unit)) for _ in range(n))
    there = statistics.median(clock(lambda: ray.get(task.remote(unit))) for _ in range(n))
    checks = clock(lambda: check_nodes(plan, None))
    return here, there, checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="sweeps on each executor")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--round-trips", type=int, default=20, help="units timed one at a time, each way")
    args = parser.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    root = Path(tempfile.mkdtemp(prefix="qtune-ray-overhead-"))
    try:
        spec = write_spec(root / "spec.toml", make_task(root), args.epochs)
        units = counted()
        local = [timed(spec, root / "local", executor="local", jobs=2) for _ in range(args.repeats)]
        per_run = units[0] // args.repeats
        start = time.perf_counter()
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        started = time.perf_counter() - start
        try:
            on_ray = [timed(spec, root / "ray", executor="ray") for _ in range(args.repeats)]
            here, there, checks = round_trips(spec, root / "ray", args.round_trips)
        finally:
            ray.shutdown()
            cluster.shutdown()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    runs = lambda times: ", ".join(f"{t:.1f}" for t in times)  # noqa: E731
    print(f"units per sweep: {per_run} (a cache, selection stacks of 2, the final runs)")
    print(f"local executor, 2 workers:  {runs(local)} s (a pool of 2 new processes per stage)")
    print(f"Ray, 2 nodes x 1 CPU:       {runs(on_ray)} s (the first starts the workers; the cluster's start, "
          f"{started:.1f} s, not counted)")
    print(f"checks before the first unit (warm workers): {checks:.2f} s")
    print(f"one unit, median of {args.round_trips}: {here * 1000:.0f} ms here, {there * 1000:.0f} ms through Ray: "
          f"Ray adds {(there - here) * 1000:.0f} ms per unit")


if __name__ == "__main__":
    main()
