"""A build killed mid-way resumes at its first unfinished chunk and ends with the same bytes as one never killed."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from qtune.cache.manifest import MANIFEST, PLAN, PROGRESS, block_file, read_progress
from tests.cache.cachedata import build

ROOT = Path(__file__).resolve().parents[2]


def _killed_build(out: Path, data: Path, kill_after_chunk: int) -> subprocess.CompletedProcess:
    """The same build as `build()`, in another process that SIGKILLs itself once chunk ``kill_after_chunk`` is
    recorded: no cleanup, no exception handler, as if the machine's user pressed kill -9."""
    code = textwrap.dedent(f"""
        import os, signal, torch
        torch.set_num_threads(1)
        from pathlib import Path
        from tests.cache.cachedata import build
        def kill(chunk):
            if chunk == {kill_after_chunk}:
                os.kill(os.getpid(), signal.SIGKILL)
        build(Path({str(out)!r}), Path({str(data)!r}), on_chunk=kill)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, timeout=120, check=False)


def _data_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.npy"))} | {"rows.json": (folder / "rows.json")
                                                                            .read_bytes()}


def test_killed_build_resumes_and_matches_an_uninterrupted_one(vtab, tmp_path):
    proc = _killed_build(tmp_path / "killed", vtab, kill_after_chunk=1)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    killed = tmp_path / "killed"
    assert (killed / PLAN).is_file() and not (killed / MANIFEST).exists()
    assert [r["chunk"] for r in read_progress(killed / PROGRESS)] == [0, 1]

    report = build(killed, vtab)
    assert report.resumed_at_chunk == 2 and not (killed / PLAN).exists() and not (killed / PROGRESS).exists()
    whole = build(tmp_path / "whole", vtab)
    assert report.manifest["digests"] == whole.manifest["digests"]
    assert _data_files(killed) == _data_files(tmp_path / "whole")


def test_a_recorded_chunk_damaged_before_resuming_is_redone(vtab, tmp_path):
    def stop(chunk):
        if chunk == 1:
            raise KeyboardInterrupt

    out = tmp_path / "c"
    try:
        build(out, vtab, on_chunk=stop)
    except KeyboardInterrupt:
        pass
    arr = np.load(out / block_file(0), mmap_mode="r+")
    arr[40] = 0  # row 40 is in chunk 1
    arr.flush()
    del arr
    report = build(out, vtab)
    assert report.resumed_at_chunk == 1
    whole = build(tmp_path / "whole", vtab)
    assert _data_files(out) == _data_files(tmp_path / "whole")
    assert json.loads((out / MANIFEST).read_text())["digests"] == whole.manifest["digests"]
