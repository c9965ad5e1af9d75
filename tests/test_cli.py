"""The command line: each bad input is one line naming the culprit, exit code 2, no traceback."""
import subprocess
import sys

import pytest
import torch

from qtune.cli import main
from tests.conftest import TINY, TINY_NAME

BACKBONE = ["--backbone", TINY_NAME] + [f"--model-arg={k}={v}" for k, v in TINY.items()]


def _train(shapes, tmp_path, *extra, method="synqt"):
    return ["train", *BACKBONE, "--method", method, "--train", str(shapes / "train"), "--val", str(shapes / "val"),
            "--test", str(shapes / "test"), "--epochs", "2", "--warmup-epochs", "1", "--batch-size", "32",
            "--out", str(tmp_path / "run"), "--no-progress", *extra]


def _error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("qtune: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_train_eval_predict(shapes, tmp_path, capsys):
    assert main(_train(shapes, tmp_path, "-O", "tokens=2")) == 0
    assert "run written to" in capsys.readouterr().out
    ckpt = str(tmp_path / "run" / "checkpoint")
    assert main(["eval", "--checkpoint", ckpt, "--data", str(shapes / "test"), "--quiet"]) == 0
    assert "accuracy" in capsys.readouterr().out
    out = tmp_path / "pred.csv"
    assert main(["predict", "--checkpoint", ckpt, "--images", str(shapes / "test"), "--out", str(out), "--quiet"]) == 0
    rows = out.read_text().splitlines()
    assert rows[0] == "path,label,class,probability" and len(rows) == 1 + 4 * 20


def test_methods_lists_counts(capsys):
    assert main(["methods", *BACKBONE, "--num-classes", "10"]) == 0
    out = capsys.readouterr().out
    for name in ("linear", "vqt", "synqt", "full"):
        assert f"\n{name} " in out


def test_missing_data_path(shapes, tmp_path, capsys):
    argv = _train(shapes, tmp_path)
    argv[argv.index("--train") + 1] = str(tmp_path / "nowhere")
    assert "nowhere: data path not found" in _error(capsys, argv)


def test_empty_dataset(shapes, tmp_path, capsys):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    argv = _train(shapes, tmp_path)
    argv[argv.index("--train") + 1] = str(tmp_path / "empty")
    assert "no images found" in _error(capsys, argv)


def test_label_out_of_range(shapes, tmp_path, capsys):
    lst = tmp_path / "train.txt"
    lst.write_text(f"{shapes}/train/0_square/0000.png 0\n{shapes}/train/1_circle/0000.png 7\n")
    argv = _train(shapes, tmp_path, "--num-classes", "4")
    argv[argv.index("--train") + 1] = str(lst)
    assert "1 label(s) out of range (0..3): " in (err := _error(capsys, argv)) and "train.txt:2: label 7" in err


def test_corrupt_image(shapes, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shapes / "train", data)
    (data / "0_square" / "0003.png").write_bytes(b"\x89PNG broken")
    argv = _train(shapes, tmp_path)
    argv[argv.index("--train") + 1] = str(data)
    assert "0003.png: cannot read image" in _error(capsys, argv)


def test_unknown_method(shapes, tmp_path, capsys):
    assert "unknown method 'nope'" in _error(capsys, _train(shapes, tmp_path, method="nope"))


def test_weights_of_another_architecture(shapes, tmp_path, capsys):
    from qtune.backbones import load_backbone

    other = load_backbone(TINY_NAME, model_args={**TINY, "depth": 2})
    torch.save(other.model.state_dict(), tmp_path / "other.pth")
    err = _error(capsys, _train(shapes, tmp_path, "--weights", str(tmp_path / "other.pth")))
    assert "other.pth: weights do not match" in err and "blocks.2." in err


def test_bad_method_option(shapes, tmp_path, capsys):
    assert "tokens must be > 0" in _error(capsys, _train(shapes, tmp_path, "-O", "tokens=0"))


def test_console_script_exit_code_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qtune.cli", "train", *BACKBONE, "--method", "linear",
                           "--train", str(tmp_path / "missing"), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "missing: data path not found" in proc.stderr


def test_memory_writes_table_csv_json_png(tmp_path, capsys):
    import csv
    import json

    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"method": "linear", "accuracy": 0.5}, {"method": "synqt", "accuracy": 0.7}]))
    out = tmp_path / "mem"
    argv = ["memory", *BACKBONE, "--methods", "linear,synqt,full", "--batch-size", "4", "--num-classes", "10",
            "--cached", "--memory-budget", "100MB", "--max-tokens", "2", "--inference", "--inference-batch-size",
            "2", "--threads", "1", "--results", str(results), "--out", str(out), "--quiet"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "synqt (cached, stream-blocks)" in text and "x linear" in text and "GFLOPs/img" in text
    data = json.loads((out / "memory.json").read_text())
    assert data["settings"]["batch_size"] == 4 and data["dtype"] == "fp32" and data["torch_version"]
    assert data["kind"] == "cpu_account" and data["provenance"]["versions"]["torch"]
    labels = [r["label"] for r in data["training"]]
    assert labels == ["linear", "linear (cached)", "linear (cached, stream-blocks)", "synqt", "synqt (cached)",
                      "synqt (cached, stream-blocks)", "full"]
    assert data["training"][0]["ratio_to_linear"] == 1.0
    assert {f["method"]: f["options"] for f in data["budget"]}["synqt"] == {"trainable_blocks": 3, "tokens": 2}
    rows = list(csv.DictReader((out / "memory.csv").open()))
    assert {r["part"] for r in rows} == {"training", "budget", "inference"}
    assert (out / "memory.png").read_bytes()[:4] == b"\x89PNG"


def test_memory_bad_inputs(capsys):
    base = ["memory", *BACKBONE, "--quiet"]
    assert "unknown method 'nope'" in _error(capsys, [*base, "--methods", "linear,nope"])
    assert "memory size '3 apples'" in _error(capsys, [*base, "--memory-budget", "3 apples"])
    assert "--batch-size" in _error(capsys, [*base, "--batch-size", "0"])
    assert "--batch-size" in _error(capsys, [*base, "--batch-size", "many"])
    assert "METHOD:KEY=VALUE" in _error(capsys, [*base, "-O", "tokens=3"])
    assert "not among --methods" in _error(capsys, [*base, "--methods", "linear", "-O", "synqt:tokens=3"])
