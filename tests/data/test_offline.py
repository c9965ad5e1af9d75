"""The offline benchmark: deterministic, VTAB-1k shaped, balanced, safely reusable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qtune.data.offline import OFFLINE_TASKS, make_offline_benchmark
from qtune.errors import ConfigError, DataError

TEST_SIZE = 60


def _rows(task_dir: Path, split: str) -> list[tuple[str, int]]:
    lines = (task_dir / f"{split}.txt").read_text().splitlines()
    return [(path, int(label)) for path, label in (line.split() for line in lines)]


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("offline")
    make_offline_benchmark(out, seed=3, test_size=TEST_SIZE, image_size=16)
    return out


def test_layout_sizes_and_disjoint_splits(bench: Path) -> None:
    summary = json.loads((bench / "benchmark.json").read_text())
    assert set(summary) == set(OFFLINE_TASKS)
    for task, info in OFFLINE_TASKS.items():
        d = bench / task
        train, val, test = (_rows(d, s) for s in ("train800", "val200", "test"))
        assert (len(train), len(val), len(test)) == (800, 200, TEST_SIZE)
        assert _rows(d, "train800val200") == train + val
        paths = [p for p, _ in train + val + test]
        assert len(set(paths)) == len(paths), task
        assert all((d / p).is_file() for p in paths)
        img = np.asarray(Image.open(d / paths[0]))
        assert img.shape == (16, 16, 3) and img.dtype == np.uint8
        assert summary[task]["num_classes"] == info.num_classes and summary[task]["group"] == info.group
        assert summary[task]["splits"]["test"] == TEST_SIZE and summary[task]["seed"] == 3


def test_labels_in_range_and_balanced(bench: Path) -> None:
    for task, info in OFFLINE_TASKS.items():
        for split in ("train800", "val200", "test"):
            labels = np.array([y for _, y in _rows(bench / task, split)])
            assert labels.min() >= 0 and labels.max() < info.num_classes, (task, split)
            counts = np.bincount(labels, minlength=info.num_classes)
            if split == "train800":
                assert counts.min() > 0, task
            assert counts.max() - counts.min() <= max(2, len(labels) // (4 * info.num_classes)), (task, split, counts)


def test_splits_share_no_image(bench: Path) -> None:
    for task in OFFLINE_TASKS:
        d = bench / task
        seen: dict[bytes, str] = {}
        for split in ("train800", "val200", "test"):
            for path, _ in _rows(d, split):
                key = np.asarray(Image.open(d / path)).tobytes()
                assert seen.setdefault(key, split) == split, (task, path)


def test_same_seed_same_bytes(bench: Path, tmp_path: Path) -> None:
    tasks = ["dsprites_loc", "digits"]  # the other order than the fixture's: streams are per task
    make_offline_benchmark(tmp_path / "again", seed=3, tasks=tasks, image_size=16, test_size=TEST_SIZE)
    for task in tasks:
        a, b = bench / task, tmp_path / "again" / task
        for name in ("train800.txt", "val200.txt", "train800val200.txt", "test.txt", "offline_task.json"):
            assert (a / name).read_bytes() == (b / name).read_bytes()
        for path, _ in _rows(a, "train800")[:5] + _rows(a, "test")[:5]:
            assert (a / path).read_bytes() == (b / path).read_bytes()
    make_offline_benchmark(tmp_path / "other", seed=4, tasks=["dsprites_loc"], image_size=16, test_size=TEST_SIZE)
    assert (tmp_path / "other" / "dsprites_loc" / "train800.txt").read_bytes() != (
        bench / "dsprites_loc" / "train800.txt"
    ).read_bytes()


def test_reuse_and_parameter_mismatch(tmp_path: Path) -> None:
    (task_dir,) = make_offline_benchmark(tmp_path, seed=0, tasks=["dsprites_loc"], image_size=16, test_size=20)
    marker = task_dir / "images" / "00000.png"
    before = marker.stat().st_mtime_ns
    assert make_offline_benchmark(tmp_path, seed=0, tasks=["dsprites_loc"], image_size=16, test_size=20) == [task_dir]
    assert marker.stat().st_mtime_ns == before
    assert not list(tmp_path.glob("*.tmp-*"))
    with pytest.raises(DataError, match="dsprites_loc"):
        make_offline_benchmark(tmp_path, seed=1, tasks=["dsprites_loc"], image_size=16, test_size=20)
    with pytest.raises(DataError, match="test_size"):
        make_offline_benchmark(tmp_path, seed=0, tasks=["dsprites_loc"], image_size=16, test_size=30)


def test_unknown_task_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown offline task"):
        make_offline_benchmark(tmp_path, tasks=["imagenet"])
