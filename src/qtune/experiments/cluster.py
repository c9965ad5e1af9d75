"""A sweep's units on a Ray cluster. Ray places each unit (``num_cpus``, ``num_gpus``), re-runs one whose worker or
node died (``max_retries``) and lists the nodes (``ray.nodes``); this module only sets those, records the node that
ran each unit in its trials' provenance, and checks every node before the first unit (``check_nodes``).

Units are idempotent, so a retry is safe: a unit writes only its task's cache (a build resumes or restarts from the
chunks its digests vouch for; the manifest, written last and atomically, is what makes a cache complete) and whole
checkpoint files (written atomically, then overwritten by a retry); the store is written by the driver alone, from
the one result Ray returns per unit.
"""
from __future__ import annotations

import hashlib
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ..backbones import BackboneSpec
from ..errors import ConfigError, QtuneError
from .tasks import TaskSource
from .units import Outcome, Unit, run_unit

if TYPE_CHECKING:
    from .planner import Plan

RETRIES = 2  # a unit whose node or worker died runs again up to this many times (a unit's own error is final)
CHECK_SECONDS = 300  # how long the checks may take on a node (its first backbone load may read the weights)


class NodeCheckError(ConfigError):
    """A cluster node that cannot run the sweep's units: a path it cannot read or write, another qtune, other
    backbone weights."""


def connect(address: str | None) -> Any:
    """The ``ray`` module, connected: to ``address``, to the instance this process already joined, or to a new
    local one."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install 'qtune[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    return ray


# -- units ----------------------------------------------------------------------------------------------------------

def wants_gpu(unit: Unit, cluster_has_gpus: bool) -> bool:
    """Training on "cuda" asks for a GPU; "auto" does where the cluster has GPUs. A cache is built on the CPU."""
    devices = {i.train.device.split(":")[0] for i in unit.items}
    return unit.kind != "cache" and ("cuda" in devices or ("auto" in devices and cluster_has_gpus))


def unit_options(unit: Unit, gpus_per_unit: float = 1.0, cluster_has_gpus: bool = False) -> dict[str, Any]:
    """What a unit's Ray task asks for: one CPU (a unit runs on one torch thread), ``gpus_per_unit`` GPUs where it
    trains on a GPU, and retries after a lost node or worker only: ``run_unit`` returns its own errors."""
    gpus = gpus_per_unit if wants_gpu(unit, cluster_has_gpus) else 0
    return {"num_cpus": 1, "num_gpus": gpus, "max_retries": RETRIES, "retry_exceptions": False}


def where_am_i() -> dict[str, Any]:
    """The node a Ray task runs on, for a trial's provenance."""
    import ray

    gpus = ray.get_gpu_ids()
    return {"node": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname(),
            "node_ip": ray.util.get_node_ip_address(), **({"gpus": [str(g) for g in gpus]} if gpus else {})}


def run_on_node(unit: Unit) -> Outcome:
    """``run_unit`` in a Ray task; each result records the node that computed it."""
    outcome = run_unit(unit)
    node = where_am_i()
    for result in outcome.results.values():
        result["provenance"] = {**result.get("provenance", {}), **node}
    return outcome


def run_units(units: list[Unit], address: str | None, gpus_per_unit: float) -> Iterator[tuple[Unit, Outcome]]:
    """(unit, outcome) as units finish. A unit that lost its node on every try fails with Ray's error, which names
    the node."""
    ray = connect(address)
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    options = [unit_options(u, gpus_per_unit, has_gpus) for u in units]
    _check_placeable(ray, options)
    task = ray.remote(run_on_node)
    pending = {task.options(**o).remote(u): u for u, o in zip(units, options)}
    while pending:
        [ref], _ = ray.wait(list(pending), num_returns=1)
        unit = pending.pop(ref)
        try:
            yield unit, ray.get(ref)
        except ray.exceptions.RayError as e:
            tries = f"{RETRIES + 1} {'try' if RETRIES == 0 else 'tries'}"
            yield unit, Outcome(error=f"{type(e).__name__}: {_first_line(e)} ({tries})")


def _check_placeable(ray: Any, options: list[dict[str, Any]]) -> None:
    """A unit no node can hold would wait forever: say so instead."""
    gpus = max(o["num_gpus"] for o in options)
    if gpus and not any(n["Alive"] and n["Resources"].get("GPU", 0) >= gpus for n in ray.nodes()):
        raise NodeCheckError(f"protocol.gpus_per_unit = {gpus:g}: no node of the cluster has that many GPUs "
                             "(train on device = \"cpu\", or add GPU nodes)")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# -- checks before the first unit ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Probe:
    """What every node must see as the driver does."""

    out: str
    token: str  # a file the driver wrote under ``out``: a node that reads it sees the driver's folder
    tasks: tuple[tuple[TaskSource, str], ...]  # each task's data and its identity (the digest of its lists)
    caches: tuple[str, ...]  # the caches the sweep reads that exist already
    backbones: tuple[tuple[BackboneSpec, str], ...]  # each backbone and its weights hash
    qtune: str


def qtune_build() -> str:
    """The qtune version and a digest of its source files: two checkouts of one version differ here."""
    from .. import __version__

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return f"{__version__} (source {h.hexdigest()[:12]})"


def check_here(probe: Probe) -> str | None:
    """The first problem this node has running the sweep's units, as one line naming the path; None if none."""
    from .planner import task_identity

    here = qtune_build()
    if here != probe.qtune:
        return f"qtune {here} at {Path(__file__).resolve().parents[1]}, the driver has {probe.qtune}"
    out = Path(probe.out)
    try:
        seen = (out / probe.token).read_text()
    except OSError as e:
        seen = f"{e.strerror}"
    if seen != probe.token:
        relative = "; OUT is a relative path: give an absolute one" if not out.is_absolute() else ""
        return (f"{out} is not the driver's folder ({seen}): mount the shared filesystem at the same path"
                f"{relative}")
    try:
        mine = out / f"{probe.token}.{socket.gethostname()}.{os.getpid()}"
        mine.write_text("ok")
        mine.unlink()
    except OSError as e:
        return f"cannot write under {out}: {e.strerror}"
    for source, identity in probe.tasks:
        try:
            source.read()
            if task_identity(source) != identity:
                return f"{source.path}: task {source.name}'s lists differ from the driver's"
        except (OSError, QtuneError) as e:
            return f"cannot read task {source.name} at {source.path}: {_first_line(e)}"
    for cache in probe.caches:
        try:
            os.listdir(cache)
        except OSError as e:
            return f"cannot read the cache {cache}: {e.strerror}"
    for spec, weights_hash in probe.backbones:
        try:
            found = spec.load().identity.weights_hash
        except Exception as e:  # noqa: BLE001 - any reason a node cannot load the backbone is its problem
            return f"cannot load backbone {spec.name} ({spec.weights}): {_first_line(e)}"
        if found != weights_hash:
            return (f"backbone {spec.name} ({spec.weights}) has weights hash {found[:12]}, the driver's "
                    f"{weights_hash[:12]}")
    return None


def make_probe(plan: Plan, token: str) -> Probe:
    backbones = {plan.backbone_key["backbone"]["weights_hash"]: plan.spec.backbone}
    for name, method in plan.methods.items():
        if plan.own_backbone(name):
            backbones.setdefault(plan.backbone_keys[name]["backbone"]["weights_hash"],
                                 method.backbone(plan.spec.backbone))
    caches = sorted({str(plan.cache_dir(t)) for t in plan.spec.tasks})
    return Probe(str(plan.out), token, tuple((plan.sources[t], plan.task_ids[t]) for t in plan.spec.tasks),
                 tuple(c for c in caches if Path(c).is_dir()), tuple((s, h) for h, s in backbones.items()),
                 qtune_build())


def node_name(node: dict[str, Any]) -> str:
    return f"{node['NodeManagerHostname']} {node['NodeManagerAddress']} ({node['NodeID'][:8]})"


def check_nodes(plan: Plan, address: str | None) -> None:
    """Run ``check_here`` once on every live node that can take a unit, all at once; the first problem is one
    line naming the node."""
    ray = connect(address)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = f".qtune-check-{uuid.uuid4().hex[:12]}"
    plan.out.mkdir(parents=True, exist_ok=True)
    (plan.out / token).write_text(token)
    try:
        probe = make_probe(plan, token)
        nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= 1]
        task = ray.remote(check_here)
        refs = {task.options(num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(probe): n for n in nodes}
        ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=CHECK_SECONDS)
        problems = []
        for ref in refs:
            if ref in late:
                ray.cancel(ref, force=True)
                problems.append(f"node {node_name(refs[ref])}: no answer to the checks within {CHECK_SECONDS} s")
                continue
            try:
                problem = ray.get(ref)
            except ray.exceptions.RayError as e:
                problem = f"the checks did not run: {_first_line(e)}"
            if problem:
                problems.append(f"node {node_name(refs[ref])}: {problem}")
    finally:
        (plan.out / token).unlink(missing_ok=True)
    if not nodes:
        raise NodeCheckError("the Ray cluster has no live node with a CPU to run units")
    if problems:
        more = f" (and {len(problems) - 1} other node(s))" if len(problems) > 1 else ""
        raise NodeCheckError(problems[0] + more)


__all__ = ["CHECK_SECONDS", "NodeCheckError", "Probe", "RETRIES", "check_here", "check_nodes", "connect",
           "run_on_node", "run_units", "unit_options", "where_am_i"]
