"""`qtune cache build|verify` and `qtune train --cache`: one-line reports, one-line errors (exit 2)."""
import json
import os


from qtune.cache.manifest import block_file
from qtune.cli import main
from tests.conftest import TINY, TINY_NAME

BACKBONE = ["--backbone", TINY_NAME, "--random-init"] + [f"--model-arg={k}={v}" for k, v in TINY.items()]


def _build(vtab, out, *extra):
    return ["cache", "build", *BACKBONE, "--data", str(vtab / "trainval.txt"), "--data", str(vtab / "test.txt"),
            "--out", str(out), "--batch-size", "16", "--chunk-rows", "32", "--quiet", *extra]


def _train(vtab, out, *extra, backbone=BACKBONE):
    return ["train", *backbone, "--method", "synqt", "--train", str(vtab / "train.txt"), "--val",
            str(vtab / "val.txt"), "--test", str(vtab / "test.txt"), "--epochs", "1", "--warmup-epochs", "0",
            "--batch-size", "16", "--out", str(out), "--no-progress", *extra]


def _error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qtune: error: ") and "\n" not in err
    return err


def test_build_verify_train(vtab, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(_build(vtab, cache, "--method", "synqt")) == 0
    out = capsys.readouterr().out
    assert "80 images, blocks 0-2 (3 of 3), fp16" in out and "on disk" in out and "done in" in out
    assert main(["cache", "verify", str(cache), "--quiet"]) == 0
    assert "ok, 80 images" in capsys.readouterr().out
    assert main(_build(vtab, cache)) == 0
    assert "already built" in capsys.readouterr().out

    assert main(_train(vtab, tmp_path / "run", "--cache", str(cache), "--stream-blocks")) == 0
    assert "not used" not in capsys.readouterr().out
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["cache_used"] == {"train": True, "val": True, "test": True}


def test_linear_cache_keeps_no_block(vtab, tmp_path, capsys):
    assert main(_build(vtab, tmp_path / "c", "--method", "linear", "--dtype", "bf16")) == 0
    assert "no blocks (pooled feature only)" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "c").glob("*.npy")) == ["pooled.npy"]


def test_training_falls_back_with_one_line_reason(vtab, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(_build(vtab, cache)) == 0
    capsys.readouterr()
    other = [*BACKBONE, "--model-arg=mlp_ratio=2.0"]  # another backbone: its weights hash differs
    assert main(_train(vtab, tmp_path / "run", "--cache", str(cache), backbone=other)) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "not used" in ln]
    assert len(lines) == 1 and "backbone weights changed" in lines[0] and lines[0].endswith("tracing live")
    assert json.loads((tmp_path / "run" / "result.json").read_text())["cache_used"]["train"] is False


def test_verify_errors_are_one_line(vtab, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(_build(vtab, cache)) == 0
    path = cache / block_file(0)
    os.truncate(path, path.stat().st_size - 1)
    assert "truncated" in _error(capsys, ["cache", "verify", str(cache)])
    assert "not a qtune cache" in _error(capsys, ["cache", "verify", str(tmp_path)])
    assert "--stream-blocks reads K/V from a cache" in _error(capsys, _train(vtab, tmp_path / "r", "--stream-blocks"))
    assert "--blocks and --method" in _error(capsys, _build(vtab, tmp_path / "c2", "--method", "vqt", "--blocks", "0"))
    assert "out of range" in _error(capsys, _build(vtab, tmp_path / "c2", "--blocks", "0,7"))


def test_a_corrupt_cache_stops_training_unless_asked_to_fall_back(vtab, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(_build(vtab, cache)) == 0
    path = cache / block_file(0)
    os.truncate(path, path.stat().st_size - 1)
    err = _error(capsys, _train(vtab, tmp_path / "run", "--cache", str(cache)))
    assert f"{path}: truncated" in err and "--cache-fallback" in err and not (tmp_path / "run").exists()
    assert main(_train(vtab, tmp_path / "run", "--cache", str(cache), "--cache-fallback")) == 0
    assert "truncated" in capsys.readouterr().out  # the note says why it traced live
    assert json.loads((tmp_path / "run" / "result.json").read_text())["cache_used"]["train"] is False
