"""The results store: one SQLite file (WAL mode), one row per trial, written by the sweep's driver only.

A trial's key hashes everything its result depends on (backbone identity, task data, method, options, training
config, fold or seed, protocol), so a changed spec adds trials and reuses only those that are the same experiment;
a sweep's own trials are listed under its spec hash, and the report reads exactly those.
"""
from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..errors import ConfigError

STATES = ("pending", "running", "done", "failed")
STORE_FILES = ("store.sqlite", "store.sqlite-wal", "store.sqlite-shm")  # the store and SQLite's WAL companions
SCHEMA = """
CREATE TABLE IF NOT EXISTS sweeps (spec_hash TEXT PRIMARY KEY, name TEXT, spec TEXT, started REAL, finished REAL);
CREATE TABLE IF NOT EXISTS trials (
    key TEXT PRIMARY KEY, task TEXT, method TEXT, kind TEXT, fold INTEGER, seed INTEGER, candidate INTEGER,
    config TEXT, state TEXT, metric REAL, metrics TEXT, trainable_parameters INTEGER, memory_bytes INTEGER,
    memory_kind TEXT, seconds REAL, error TEXT, provenance TEXT, updated REAL);
CREATE TABLE IF NOT EXISTS sweep_trials (spec_hash TEXT, key TEXT, PRIMARY KEY (spec_hash, key));
CREATE TABLE IF NOT EXISTS test_reads (spec_hash TEXT, task TEXT, reads INTEGER, PRIMARY KEY (spec_hash, task));
"""


@dataclass
class Trial:
    key: str
    task: str
    method: str
    kind: str  # "fold" (selection) or "final"
    fold: int  # fold index (-1: val200), or -1 for a final run
    seed: int
    candidate: int
    config: dict[str, Any]  # {"options": ..., "train": ...}
    state: str = "pending"
    metric: float | None = None  # held-out accuracy (fold) or test accuracy (final)
    metrics: dict[str, Any] | None = None
    trainable_parameters: int | None = None
    memory_bytes: int | None = None
    memory_kind: str | None = None
    seconds: float | None = None
    error: str | None = None
    provenance: dict[str, Any] | None = None

    @property
    def rungs(self) -> list[dict[str, Any]]:
        """A selection trial's scores at the rungs of successive halving it reached (``[]`` without halving)."""
        return (self.metrics or {}).get("rungs", [])


_JSON = ("config", "metrics", "provenance")
_COLUMNS = ("key", "task", "method", "kind", "fold", "seed", "candidate", "config", "state", "metric", "metrics",
            "trainable_parameters", "memory_bytes", "memory_kind", "seconds", "error", "provenance")


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise ConfigError(f"{self.path}: not a qtune results store ({e})") from None

    def close(self) -> None:
        self.db.close()

    # -- sweeps --
    def register(self, spec_hash: str, name: str, spec_text: str, keys: Iterable[str]) -> None:
        with self.db:
            self.db.execute("INSERT OR IGNORE INTO sweeps VALUES (?, ?, ?, ?, NULL)",
                            (spec_hash, name, spec_text, time.time()))
            self.db.executemany("INSERT OR IGNORE INTO sweep_trials VALUES (?, ?)", [(spec_hash, k) for k in keys])

    def finish(self, spec_hash: str) -> None:
        self.db.execute("UPDATE sweeps SET finished = ? WHERE spec_hash = ?", (time.time(), spec_hash))

    def latest_sweep(self) -> str:
        row = self.db.execute("SELECT spec_hash FROM sweeps ORDER BY started DESC LIMIT 1").fetchone()
        if row is None:
            raise ConfigError(f"{self.path}: no sweep recorded in this store")
        return row[0]

    def sweep_name(self, spec_hash: str) -> str:
        return self._sweep(spec_hash)[0]

    def sweep_spec(self, spec_hash: str) -> str:
        """The spec's text as it was when the sweep ran."""
        return self._sweep(spec_hash)[1]

    def _sweep(self, spec_hash: str) -> tuple[str, str]:
        row = self.db.execute("SELECT name, spec FROM sweeps WHERE spec_hash = ?", (spec_hash,)).fetchone()
        if row is None:
            raise ConfigError(f"{self.path}: no sweep {spec_hash!r} in this store")
        return row

    # -- trials --
    def add(self, trials: Iterable[Trial]) -> None:
        """Record trials not yet in the store as pending; existing ones (same key) keep their state and results."""
        with self.db:
            self.db.executemany(
                f"INSERT OR IGNORE INTO trials ({', '.join(_COLUMNS)}, updated) VALUES "
                f"({', '.join('?' * len(_COLUMNS))}, ?)", [(*self._row(t), time.time()) for t in trials])

    def get(self, key: str) -> Trial | None:
        row = self.db.execute(f"SELECT {', '.join(_COLUMNS)} FROM trials WHERE key = ?", (key,)).fetchone()
        return None if row is None else self._trial(row)

    def trials(self, spec_hash: str) -> list[Trial]:
        rows = self.db.execute(f"SELECT {', '.join('t.' + c for c in _COLUMNS)} FROM trials t JOIN sweep_trials s "
                               "ON s.key = t.key WHERE s.spec_hash = ? ORDER BY t.task, t.method, t.kind, "
                               "t.candidate, t.fold, t.seed", (spec_hash,)).fetchall()
        return [self._trial(r) for r in rows]

    def mark(self, keys: Iterable[str], state: str, error: str | None = None) -> None:
        with self.db:
            self.db.executemany("UPDATE trials SET state = ?, error = ?, updated = ? WHERE key = ?",
                                [(state, error, time.time(), k) for k in keys])

    def record(self, key: str, result: dict[str, Any], state: str = "done") -> None:
        """A trial's results: finished (``state`` done), or so far (a selection trial between rungs)."""
        with self.db:
            self.db.execute(
                "UPDATE trials SET state = ?, metric = ?, metrics = ?, trainable_parameters = ?, "
                "memory_bytes = ?, memory_kind = ?, seconds = ?, error = NULL, provenance = ?, updated = ? "
                "WHERE key = ?",
                (state, result["metric"], json.dumps(result.get("metrics", {})), result.get("trainable_parameters"),
                 result.get("memory_bytes"), result.get("memory_kind"), result.get("seconds"),
                 json.dumps(result.get("provenance", {})), time.time(), key))

    def count_test_read(self, spec_hash: str, task: str) -> None:
        self.db.execute("INSERT INTO test_reads VALUES (?, ?, 1) ON CONFLICT (spec_hash, task) DO UPDATE SET "
                        "reads = reads + 1", (spec_hash, task))

    def test_reads(self, spec_hash: str) -> dict[str, int]:
        return dict(self.db.execute("SELECT task, reads FROM test_reads WHERE spec_hash = ?", (spec_hash,)))

    @staticmethod
    def _row(t: Trial) -> tuple:
        return tuple(json.dumps(getattr(t, c)) if c in _JSON and getattr(t, c) is not None else getattr(t, c)
                     for c in _COLUMNS)

    @staticmethod
    def _trial(row: tuple) -> Trial:
        d = dict(zip(_COLUMNS, row))
        for c in _JSON:
            if d[c] is not None:
                d[c] = json.loads(d[c])
        return Trial(**d)
