"""The command line: each bad input is one line naming the culprit, exit code 2, no traceback."""
import json
import subprocess
import sys

import pytest
import torch

from qtune.cli import main
from tests.conftest import TINY, TINY_NAME

BACKBONE = ["--backbone", TINY_NAME, "--random-init"] + [f"--model-arg={k}={v}" for k, v in TINY.items()]


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
    captured = capsys.readouterr()
    assert "run written to" in captured.out
    assert "qtune cache build --method synqt" in captured.out  # a side path told once that a cache would help
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


@pytest.mark.parametrize("command", [["methods"], ["memory", "--methods", "linear", "--batch-size", "2", "--quiet"]])
def test_counting_commands_default_to_random_weights_and_say_so(command, capsys):
    argv = [*command, *[a for a in BACKBONE if a != "--random-init"], "--num-classes", "10"]
    assert main(argv) == 0
    assert "random weights: no --weights or --pretrained given" in capsys.readouterr().out
    assert main([*command, "--weights", "demo"]) == 0
    assert "random weights" not in capsys.readouterr().out


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
    argv = [a for a in _train(shapes, tmp_path, "--weights", str(tmp_path / "other.pth")) if a != "--random-init"]
    err = _error(capsys, argv)
    assert "other.pth: weights do not match" in err and "blocks.2." in err


def test_bad_method_option(shapes, tmp_path, capsys):
    assert "tokens must be > 0" in _error(capsys, _train(shapes, tmp_path, "-O", "tokens=0"))


def test_console_script_exit_code_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qtune.cli", "train", *BACKBONE, "--method", "linear",
                           "--train", str(tmp_path / "missing"), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "missing: data path not found" in proc.stderr


@pytest.mark.parametrize("command", ["train", "memory"])
def test_nothing_is_written_outside_out(command, shapes, tmp_path):
    """matplotlib's font cache and torch's inductor folder do not land in the home or temp folders."""
    import os

    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir(), tmp.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "MPLCONFIGDIR", "TORCHINDUCTOR_CACHE_DIR")}
    argv = {"train": _train(shapes, tmp_path, method="linear"),
            "memory": ["memory", *BACKBONE, "--methods", "linear", "--batch-size", "2", "--num-classes", "4",
                       "--out", str(tmp_path / "run"), "--quiet"]}[command]  # --out: a plot, so matplotlib
    proc = subprocess.run([sys.executable, "-m", "qtune.cli", *argv], capture_output=True, text=True,
                          env={**env, "HOME": str(home), "TMPDIR": str(tmp)})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run").is_dir()
    assert [p.relative_to(tmp_path) for p in sorted(home.rglob("*")) + sorted(tmp.rglob("*"))] == []


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


@pytest.fixture(scope="module")
def linear_run(shapes, tmp_path_factory):
    """A finished one-epoch linear-probe run (its checkpoint for eval and predict)."""
    tmp = tmp_path_factory.mktemp("linear")
    assert main(_train(shapes, tmp, method="linear")) == 0
    return tmp / "run"


BAD_INPUTS = [  # (argv after the fixtures are substituted, what the one line must name)
    (["train", "{base}", "-O", "normalize=maybe", "--method", "vqt"], "normalize"),
    (["train", "{base}", "-O", "tokens=abc"], "tokens"),
    (["train", "{base}", "-O", "tokens=2.5"], "tokens"),
    (["train", "{base}", "-O", "dropout=abc"], "dropout"),
    (["train", "{base}", "--preset", "synqt:vtab/imagenet"], "synqt:vtab/imagenet"),
    (["train", "{base}", "--device", "cuda"], "cuda"),
    (["train", "{base}", "--out", "{file}"], "names a file"),
    (["eval", "--checkpoint", "{ckpt}", "--data", "{test}", "--device", "cuda"], "cuda"),
    (["predict", "--checkpoint", "{ckpt}", "--images", "{test}", "--out", "{tmp}"], "names a folder"),
    (["predict", "--checkpoint", "{ckpt}", "--images", "{test}", "--out", "{file}"], "pass --overwrite"),
    (["predict", "--checkpoint", "{ckpt}", "--images", "{test}", "--out", "{tmp}/p.csv", "--top-k", "0"], "--top-k"),
    (["memory", *BACKBONE, "--methods", "vqt", "-O", "vqt:tokens=abc", "--batch-size", "2"], "tokens"),
    (["data", "make-offline", "{tmp}/bench", "--tasks", "foo"], "foo"),
    (["demo", "--out", "{file}"], "names a file"),
    (["train", "{base}", "--input-size", "0"], "input size must be whole numbers >= 1"),
    (["train", "{base}", "--num-workers", "-1"], "num_workers: expected a whole number >= 0, got -1"),
    (["train", "{base}", "--eval-every", "-1"], "eval_every: expected a whole number >= 0, got -1"),
    (["train", "{base}", "--out", "{tmp}/x/.."], "x/.."),
    (["predict", "--checkpoint", "{ckpt}", "--images", "{tmp}/nowhere", "--out", "{tmp}/p.csv"],
     "nowhere: no such image file or folder"),
    (["predict", "--checkpoint", "{ckpt}", "--images", "{file}", "--out", "{tmp}/p.csv"], "a_file: not an image file"),
    (["train", "--backbone", TINY_NAME, "--method", "linear", "--train", "{test}", "--out", "{tmp}/run"],
     f"backbone '{TINY_NAME}' has no weights: give --weights or --pretrained, or --random-init"),
    (["cache", "build", "--backbone", TINY_NAME, "--data", "{test}", "--out", "{tmp}/cache"],
     f"backbone '{TINY_NAME}' has no weights"),
    (["train", "{base}", "--weights", "demo"], "--random-init conflicts with --weights"),
    (["eval", "--checkpoint", "{ckpt}", "--data", "{test}", "--weights", "demo"],
     f"checkpoint: trained on {TINY_NAME} (no weights file: random or hub weights, weights hash "),
]


@pytest.mark.parametrize("argv,culprit", BAD_INPUTS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_naming_the_culprit(argv, culprit, shapes, linear_run, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    subs = {"{file}": str(tmp_path / "a_file"), "{ckpt}": str(linear_run / "checkpoint"),
            "{test}": str(shapes / "test"), "{tmp}": str(tmp_path)}
    full: list[str] = []
    for a in argv:
        if a == "{base}":
            full += _train(shapes, tmp_path, method="synqt")[1:]
        else:
            for k, v in subs.items():
                a = a.replace(k, v)
            full.append(a)
    assert culprit in _error(capsys, full)  # (a flag given twice: argparse keeps the later one)
    if argv[0] == "train":
        assert not (tmp_path / "run").exists()  # a failed run leaves no folder behind


def _labelled(shapes, labels, per_class=2):
    """``path label`` lines of the shapes training images, ``per_class`` of each folder, labelled by ``labels``."""
    folders = sorted(d for d in (shapes / "train").iterdir() if d.is_dir())
    return "".join(f"{f} {y}\n" for d, y in zip(folders, labels) for f in sorted(d.glob("*.png"))[:per_class])


def _empty_class(shapes, tmp_path):
    import shutil

    shutil.copytree(shapes / "train", tmp_path / "data")
    (tmp_path / "data" / "4_star").mkdir()
    return tmp_path / "data"


SILENT_WRONG = {  # name: (what --train is made from, extra flags, what the one line must name)
    "label typo": (lambda s: _labelled(s, [0, 1, 2, 999]), [], "train.txt:7: label 999, but no sample has label 3"),
    "label gap": (lambda s: _labelled(s, [0, 1, 3, 4]), [], "train.txt:5: label 3, but no sample has label 2"),
    "one image, two labels": (lambda s: _labelled(s, [0, 1, 2, 3]) + _labelled(s, [1, 1, 2, 3], 1), [],
                              "has label 1, but label 0 on line 1"),
    "empty class folder": (_empty_class, [], "4_star"),
    "lr nan": (None, ["--lr", "nan"], "lr: expected a finite number, got nan"),
    "lr inf": (None, ["--lr", "inf"], "lr: expected a finite number, got inf"),
    "diverging loss": (None, ["--lr", "1e37", "--batch-size", "8"], "training diverged: the loss is"),
    "lr overflowing the step": (None, ["--lr", "1e38", "--warmup-epochs", "0"],
                                "the optimiser's step overflows float32 at epoch 1, step 1 (lr 1e+38"),
}


@pytest.mark.parametrize("name", SILENT_WRONG)
def test_no_silent_wrong_result(name, shapes, tmp_path, capsys):
    make, extra, culprit = SILENT_WRONG[name]
    argv = _train(shapes, tmp_path, *extra, method="linear")
    if make is not None:
        made = make(shapes) if make.__code__.co_argcount == 1 else make(shapes, tmp_path)
        if isinstance(made, str):
            (tmp_path / "train.txt").write_text(made)
            made = tmp_path / "train.txt"
        argv[argv.index("--train") + 1] = str(made)
    err = _error(capsys, argv)
    assert culprit in err
    assert not {p.name for p in tmp_path.iterdir()} & {"run", ".run.partial", ".run.lock"}  # nothing left behind


def test_a_method_trains_with_its_own_recipe(shapes, tmp_path, capsys):
    from qtune.methods.presets import VQT_RECIPE

    assert main(_train(shapes, tmp_path / "vqt", "-O", "tokens=1", method="vqt")) == 0
    cfg = json.loads((tmp_path / "vqt" / "run" / "config.json").read_text())
    assert cfg["recipe"].startswith("vqt's own")
    assert {k: cfg["train"][k] for k in ("optimizer", "lr", "weight_decay", "min_lr")} == \
        {k: VQT_RECIPE[k] for k in ("optimizer", "lr", "weight_decay", "min_lr")}
    assert cfg["train"]["batch_size"] == 32 and cfg["train"]["epochs"] == 2  # flags given win
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("qtune: recipe: vqt's own")]
    assert line and "optimizer adam, lr 0.125" in line[0] and "given here: batch_size, epochs" in line[0]
    assert main(_train(shapes, tmp_path / "lin", "--lr", "0.5", method="linear")) == 0
    train = json.loads((tmp_path / "lin" / "run" / "config.json").read_text())["train"]
    assert (train["optimizer"], train["lr"], train["weight_decay"]) == ("adamw", 0.5, 0.0)


def test_predict_takes_files_and_skips_unreadable_images(linear_run, shapes, tmp_path, capsys):
    import os
    import shutil

    ckpt = str(linear_run / "checkpoint")
    first, second = sorted((shapes / "test").rglob("*.png"))[:2]
    odd = tmp_path / os.fsdecode(b"caf\xe9.png")  # a file name that is not UTF-8
    shutil.copy(first, odd)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "p.csv"
    argv = ["predict", "--checkpoint", ckpt, "--images", str(first), str(second), str(odd), str(tmp_path / "broken.png"),
            "--out", str(out), "--quiet"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "3 predictions of 1 checkpoint(s) written" in captured.out and "1 unreadable image(s) skipped" in captured.out
    assert captured.err.strip() == f"qtune: skipped {tmp_path / 'broken.png'}: cannot read image (UnidentifiedImageError)"
    rows = out.read_text(encoding="utf-8").splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == [str(first), str(second), f"{tmp_path}/caf\\xe9.png"]
    assert rows[1].split(",")[1:] == rows[3].split(",")[1:]  # the renamed copy, predicted alike
    (tmp_path / "only").mkdir()
    shutil.copy(tmp_path / "broken.png", tmp_path / "only" / "broken.png")
    err = _error(capsys, ["predict", "--checkpoint", ckpt, "--images", str(tmp_path / "only"), "--out",
                          str(tmp_path / "q.csv"), "--quiet"])
    assert "none of the 1 image(s) could be read" in err and not (tmp_path / "q.csv").exists()


def test_list_files_encodings(shapes, tmp_path, capsys):
    from qtune.data import read_split

    text = _labelled(shapes, [0, 1, 2, 3])
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert read_split(tmp_path / "bom.txt").samples[0][0] == text.split()[0]  # not "\ufeff/..."
    (tmp_path / "latin.txt").write_bytes(text.encode() + "caf\u00e9.png 0\n".encode("latin-1"))
    argv = _train(shapes, tmp_path, method="linear")
    argv[argv.index("--train") + 1] = str(tmp_path / "latin.txt")
    assert "latin.txt:9: not UTF-8 text (byte 0xe9)" in _error(capsys, argv)


CRAFTED = """
import os, pickle, sys
class Payload:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))
open(sys.argv[1], "wb").write(pickle.dumps({"trainable": Payload()}))
"""


@pytest.mark.parametrize("name", ["train_state.pt", "train_state.safetensors"])
def test_a_crafted_pickle_is_never_loaded(name, shapes, tmp_path, monkeypatch, capsys):
    from qtune.engine import job

    argv = _train(shapes, tmp_path, method="linear")
    monkeypatch.setattr(job, "_swap_in", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(argv) == 130  # interrupted at the very end: a partial run with its config is left
    monkeypatch.undo()
    capsys.readouterr()
    work = tmp_path / ".run.partial"
    marker = tmp_path / "ran"
    subprocess.run([sys.executable, "-c", CRAFTED, str(work / name), str(marker)], check=True)
    err = _error(capsys, [*argv, "--resume"])
    assert f"{work / name}: " in err and ("not loaded" in err or "not a qtune training state" in err)
    assert not marker.exists()


def test_adapter_files_get_the_usual_mode(linear_run):
    import os

    umask = os.umask(0)
    os.umask(umask)
    for f in (linear_run / "checkpoint").iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f


HOLD_LOCK = """
import sys, time
from pathlib import Path
from qtune.io import exclusive_folder
with exclusive_folder(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_a_second_process_on_one_out_folder_is_refused(command, shapes, tmp_path, capsys):
    import signal

    out = tmp_path / "run"
    if command == "train":
        argv = _train(shapes, tmp_path, method="linear")
    else:
        (tmp_path / "s.toml").write_text("[tasks]\noffline = ['digits']\n[methods.linear]\n")
        argv = ["sweep", str(tmp_path / "s.toml"), "--out", str(out), "--quiet"]
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        err = _error(capsys, argv)
        assert f"{out}: in use by another qtune process (pid {holder.pid})" in err
        assert not out.exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    if command == "train":  # the kernel dropped the dead holder's lock: the folder is free again
        assert main(argv) == 0 and (out / "config.json").is_file()
        assert not (tmp_path / ".run.lock").exists()


def test_an_interrupted_run_says_how_to_resume_and_a_rerun_that_it_discards_it(shapes, tmp_path, monkeypatch,
                                                                               capsys):
    from qtune.engine import job

    real = job.fit

    def interrupted(*args, on_epoch, **kwargs):
        def stop(record):
            on_epoch(record)
            raise KeyboardInterrupt
        return real(*args, on_epoch=stop, **kwargs)

    argv = _train(shapes, tmp_path, method="linear")
    monkeypatch.setattr(job, "fit", interrupted)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "the same command with --resume continues it" in err and err.strip().endswith("qtune: interrupted")
    monkeypatch.undo()
    assert main(argv) == 0
    assert f"discarding the interrupted run in {tmp_path / '.run.partial'}" in capsys.readouterr().err


def test_lora_option_false_is_false():
    from qtune.methods import create_method
    from tests.conftest import tiny_backbone

    bb = tiny_backbone()
    assert create_method("lora", bb, 3, {"mlp": "false"}).config.mlp is False
    assert create_method("lora", bb, 3, ["mlp=true"]).config.mlp is True


def test_corrupt_checkpoint_is_refused(linear_run, shapes, tmp_path, capsys):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(linear_run / "checkpoint", ckpt)
    data = bytearray((ckpt / "adapter.safetensors").read_bytes())
    data[-20:] = bytes(b ^ 0xFF for b in data[-20:])  # flip bytes inside the tensor data
    (ckpt / "adapter.safetensors").write_bytes(bytes(data))
    err = _error(capsys, ["eval", "--checkpoint", str(ckpt), "--data", str(shapes / "test"), "--quiet"])
    assert "adapter.safetensors: corrupt" in err


def test_predict_top_k_and_overwrite(linear_run, shapes, tmp_path, capsys):
    out = tmp_path / "p.csv"
    argv = ["predict", "--checkpoint", str(linear_run / "checkpoint"), "--images", str(shapes / "test"),
            "--out", str(out), "--top-k", "2", "--quiet"]
    assert main(argv) == 0
    head, first = out.read_text().splitlines()[:2]
    assert head == "path,label,class,probability,label_2,class_2,probability_2"
    p1, p2 = float(first.split(",")[3]), float(first.split(",")[6])
    assert 0 <= p2 <= p1 <= 1
    assert main([*argv, "--overwrite"]) == 0


def test_predict_serves_several_checkpoints_from_one_trace(linear_run, shapes, tmp_path, monkeypatch):
    from qtune.backbones import Backbone

    tmp = tmp_path / "vqt"
    assert main(_train(shapes, tmp, method="vqt")) == 0
    bitfit = tmp_path / "bitfit"
    assert main(_train(shapes, bitfit, method="bitfit")) == 0
    ckpts = [str(linear_run / "checkpoint"), str(tmp / "run" / "checkpoint"), str(bitfit / "run" / "checkpoint")]
    singles = []
    for i, c in enumerate(ckpts):
        out = tmp_path / f"single{i}.csv"
        assert main(["predict", "--checkpoint", c, "--images", str(shapes / "test"), "--out", str(out), "--quiet"]) == 0
        singles.append([row.split(",")[1:] for row in out.read_text().splitlines()[1:]])
    traces = []
    real = Backbone.trace
    monkeypatch.setattr(Backbone, "trace", lambda self, *a, **k: traces.append(1) or real(self, *a, **k))
    out = tmp_path / "all.csv"
    argv = ["predict", *(x for c in ckpts for x in ("--checkpoint", c)), "--images", str(shapes / "test"),
            "--out", str(out), "--batch-size", "32", "--quiet"]
    assert main(argv) == 0
    rows = out.read_text().splitlines()
    assert rows[0].split(",")[1:4] == ["run:label", "run:class", "run:probability"]
    assert len(traces) == -(-len(rows[1:]) // 32)  # one trace per batch, shared by both side-path heads
    for r, row in enumerate(rows[1:]):
        cells = row.split(",")[1:]
        for i in range(3):
            label, _, prob = cells[3 * i:3 * i + 3]
            assert label == singles[i][r][0] and abs(float(prob) - float(singles[i][r][2])) < 1e-4


def test_overwrite_is_atomic(shapes, tmp_path, monkeypatch, capsys):
    from qtune.engine import job

    assert main(_train(shapes, tmp_path, method="linear")) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").glob("*.json")}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "fit", interrupted)
    assert main(_train(shapes, tmp_path, "--overwrite", method="linear")) == 130
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").glob("*.json")} == before  # the old run, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.partial", "run"]  # what --resume would continue
    assert "metrics.csv" in {p.name for p in (tmp_path / "run").iterdir()}


def test_version_and_interrupt_while_starting(monkeypatch, capsys):
    from qtune import __version__, cli

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"qtune {__version__}"

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert main(["--help"]) == 130
    assert capsys.readouterr().err.strip() == "qtune: interrupted"


def test_weights_folder_names_the_backbone(shapes, tmp_path, capsys):
    from qtune.backbones import demo_weights

    argv = ["train", "--weights", "demo", "--method", "linear", "--train", str(shapes / "train"), "--epochs", "1",
            "--warmup-epochs", "0", "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 0  # no --backbone: the folder's config.json names it
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["backbone"]["weights"] == str(demo_weights())
    err = _error(capsys, [*argv, "--backbone", "vit_base_patch16_224", "--overwrite"])
    assert "demo_vit: holds a" in err and "not a vit_base_patch16_224" in err


def test_methods_lists_each_methods_options(capsys):
    assert main(["methods", "--options", "lora"]) == 0
    out = capsys.readouterr().out
    assert "mlp" in out and "bool" in out and "also adapt the MLP" in out
    assert main(["methods", "--options", "vpt_deep+synqt"]) == 0
    out = capsys.readouterr().out
    assert "vpt_deep.tokens" in out and "synqt.attn_scale" in out and "default 0.1" in out


def test_methods_counts_are_the_models(capsys):
    assert main(["methods", *BACKBONE, "--num-classes", "10"]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    rows = {cols[0]: cols[2] for cols in lines}
    dim = TINY["embed_dim"]
    assert rows["linear"] == f"{dim * 10 + 10:,}"  # the head alone
    assert rows["vqt"] == f"{TINY['depth'] * dim + (dim * (TINY['depth'] + 1)) * 10 + 10:,}"  # a query per block
    kinds = {cols[0]: cols[1] for cols in lines}
    assert (kinds["synqt"], kinds["dtl"], kinds["lora"]) == ("side", "hybrid", "stream")  # DTL's top blocks run live


KILL_AT_EPOCH = """
import os, signal, sys
import torch
torch.set_num_threads(1)  # as in this test process: another thread count rounds differently
from qtune.engine import loop
from qtune.cli import main
real_fit = loop.fit
def fit(*args, on_epoch=None, **kw):
    def die(record):
        on_epoch(record)
        if record["epoch"] == int(sys.argv[1]):
            os.kill(os.getpid(), signal.SIGKILL)
    return real_fit(*args, on_epoch=die, **kw)
import qtune.engine.job as job
job.fit = fit
main(sys.argv[2:])
"""


def test_killed_run_resumes_to_the_same_weights(shapes, tmp_path):
    import random

    from safetensors.torch import load_file

    argv = _train(shapes, tmp_path, "--epochs", "4", "-O", "tokens=2", method="synqt")
    whole = [a if a != str(tmp_path / "run") else str(tmp_path / "whole") for a in argv]
    assert main(whole) == 0
    kill_at = random.Random().randint(1, 3)
    proc = subprocess.run([sys.executable, "-c", KILL_AT_EPOCH, str(kill_at), *argv], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr  # killed, mid-run
    assert not (tmp_path / "run").exists() and (tmp_path / ".run.partial" / "train_state.safetensors").is_file()
    assert main([*argv, "--resume"]) == 0
    a = load_file(tmp_path / "whole" / "checkpoint" / "adapter.safetensors")
    b = load_file(tmp_path / "run" / "checkpoint" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"killed after epoch {kill_at}"
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3, 4]
    assert not (tmp_path / ".run.partial").exists() and not (tmp_path / "run" / "train_state.safetensors").exists()


def test_config_reruns_a_recorded_run(linear_run, tmp_path, capsys):
    argv = ["train", "--config", str(linear_run / "config.json"), "--out", str(tmp_path / "again")]
    assert main(argv) == 0
    first = json.loads((linear_run / "result.json").read_text())
    again = json.loads((tmp_path / "again" / "result.json").read_text())
    assert again["test_accuracy"] == first["test_accuracy"]  # the same run, deterministic
    assert main([*argv[:3], "--out", str(tmp_path / "longer"), "--epochs", "2"]) == 0
    assert json.loads((tmp_path / "longer" / "config.json").read_text())["train"]["epochs"] == 2
    assert "not a qtune run's config.json" in _error(capsys, ["train", "--config", str(linear_run / "result.json"),
                                                              "--out", str(tmp_path / "x")])
    assert "--train and --out are needed" in _error(capsys, ["train", "--method", "linear"])


def test_tensorboard_is_optional(shapes, tmp_path, capsys):
    import importlib.util

    argv = _train(shapes, tmp_path, "--tensorboard", method="linear")
    if importlib.util.find_spec("tensorboard") is None:
        assert "pip install 'qtune[tensorboard]'" in _error(capsys, argv)
    else:
        assert main(argv) == 0
        assert any((tmp_path / "run" / "tensorboard").iterdir())


def test_a_reader_that_leaves_early_gets_no_traceback():
    import subprocess
    import sys

    cmd = f"{sys.executable} -m qtune.cli methods --options synqt | true"  # the reader is gone before any write
    done = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == ""


def test_every_command_prints_its_help():
    """Help text is a %-format for argparse: a stray % breaks --help of its command."""
    import argparse

    from qtune.cli import build_parser

    def commands(parser: argparse.ArgumentParser, path: list[str]):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield path
        for action in subs:
            for name, child in action.choices.items():
                yield from commands(child, [*path, name])

    paths = list(commands(build_parser(), []))
    assert ["cache", "build"] in paths and len(paths) > 10
    for path in paths:
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([*path, "--help"])
        assert e.value.code == 0, path
