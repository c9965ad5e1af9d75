"""Where units run: in this process, a local pool of processes (one torch thread each), or a Ray cluster
(``cluster``). Each yields (unit, outcome) as units finish; only the driver writes the store."""
from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Iterator

from .cluster import run_units
from .units import Outcome, Unit, run_unit

EXECUTORS = ("local", "ray")


def default_jobs() -> int:
    """One worker per available core: small models are overhead-bound, and intra-op threads only contend."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _init_worker(driver: int) -> None:
    import threading

    import torch

    torch.set_num_threads(1)
    threading.Thread(target=_exit_with_driver, args=(driver,), daemon=True).start()


def _exit_with_driver(driver: int) -> None:
    """A pool worker ends when its driver is gone (killed: nothing shuts the pool down), instead of holding its
    memory with nobody to read its result: an orphan is adopted by another process."""
    while os.getppid() == driver:
        time.sleep(1.0)
    os._exit(1)


def execute(units: list[Unit], executor: str, jobs: int, address: str | None,
            gpus_per_unit: float = 1.0) -> Iterator[tuple[Unit, Outcome]]:
    """(unit, outcome) as units finish; a worker that died gives an outcome with its error. On Ray a unit that
    trains on a GPU asks for ``gpus_per_unit`` of one (``cluster``)."""
    if not units:
        return
    if executor == "ray":
        yield from run_units(units, address, gpus_per_unit)
        return
    if jobs == 1:
        for u in units:
            yield u, run_unit(u)
        return
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                             initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(run_unit, u): u for u in units}
        for f in as_completed(futures):
            try:
                yield futures[f], f.result()
            except Exception as e:  # the worker process died
                yield futures[f], Outcome(error=f"{type(e).__name__}: {e}")


__all__ = ["EXECUTORS", "default_jobs", "execute"]
