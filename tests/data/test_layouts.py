"""Loaders for VTAB-1k (both layouts) and few-shot FGVC lists, on tiny generated datasets, with every bad input."""
import json

import numpy as np
import pytest
from PIL import Image

from qtune.cli import main
from qtune.data.check import check_dataset
from qtune.data.layouts import VTAB_GROUPS, VTAB_TASKS, read_fgvc, read_vtab, vtab_task
from qtune.errors import DataError

SIZES = {"train800": 8, "val200": 4, "train800val200": 12, "test": 6}


def _image(path, seed, ext):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (12, 10, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, "JPEG" if ext == "jpg" else "PNG")


def make_vtab(root, name="dsprites_loc", layout="txt"):
    """A VTAB task folder: images/ + the four lists; train800val200 = train800 + val200."""
    ext = "jpg" if layout == "txt" else "png"
    task = root / name
    entries = {}
    for split in ("train800", "val200", "test"):
        entries[split] = [(f"images/{split}_{i}.{ext}", i % 4) for i in range(SIZES[split])]
        for i, (rel, _) in enumerate(entries[split]):
            _image(task / rel, hash((split, i)) % 1000, ext)
    entries["train800val200"] = entries["train800"] + entries["val200"]
    for split, pairs in entries.items():
        if layout == "txt":
            (task / f"{split}.txt").write_text("".join(f"{p} {y}\n" for p, y in pairs))
        else:
            (task / f"{split}.json").write_text(json.dumps(dict(pairs)))
    return task


def make_fgvc(root, name="oxford-pets"):
    ds = root / name
    ann = ds / "annotations"
    ann.mkdir(parents=True)
    pairs = [(f"img_{i}.jpg", i % 3) for i in range(9)]
    for i, (rel, _) in enumerate(pairs):
        _image(ds / rel, i, "jpg")
    for shot in (1, 2, 4, 8, 16):
        for seed in (0, 1, 2):
            (ann / f"train_meta.list.num_shot_{shot}.seed_{seed}").write_text(
                "".join(f"{p} {y}\n" for p, y in pairs[:3 * min(shot, 2)]))
    (ann / "val_meta.list").write_text("".join(f"{p} {y}\n" for p, y in pairs[6:8]))
    (ann / "test_meta.list").write_text("".join(f"{p} {y}\n" for p, y in pairs[6:]))
    return ann


def test_registry_has_the_19_tasks_in_three_groups():
    groups = [t.group for t in VTAB_TASKS.values()]
    assert len(VTAB_TASKS) == 19 and [groups.count(g) for g in VTAB_GROUPS] == [7, 4, 8]
    assert vtab_task("clevr_closest_object_distance").name == "clevr_dist"
    assert vtab_task("vtab-cifar100").num_classes == 100


@pytest.mark.parametrize("layout", ["txt", "json"])
def test_vtab_layouts(tmp_path, layout):
    splits = read_vtab(make_vtab(tmp_path, layout=layout))
    assert {k: len(v.samples) for k, v in splits.items()} == SIZES
    assert len(splits["test"].classes) == 16  # from the registry: dSprites location has 16 bins
    assert splits["train800"].sample_ids[0].startswith("images/train800_0.")


def test_vtab_bad_inputs(tmp_path):
    task = make_vtab(tmp_path)
    (task / "val200.txt").unlink()
    with pytest.raises(DataError, match="list file\\(s\\) missing: val200.txt"):
        read_vtab(task)
    task = make_vtab(tmp_path / "b")
    (task / "images" / "test_1.jpg").unlink()
    (task / "images" / "test_2.jpg").unlink()
    with pytest.raises(DataError, match=r"test.txt: 2 listed image\(s\) missing .*test_1.jpg"):
        read_vtab(task)
    task = make_vtab(tmp_path / "c")
    (task / "test.txt").write_text("images/test_0.jpg 16\nimages/test_1.jpg 99\n")
    with pytest.raises(DataError, match=r"2 label\(s\) out of range \(0..15\)"):
        read_vtab(task)


def test_fgvc_lists(tmp_path):
    ann = make_fgvc(tmp_path)
    splits = read_fgvc(ann, shots=2, seed=1)
    assert {k: len(v.samples) for k, v in splits.items()} == {"train": 6, "val": 2, "test": 3}
    assert len(splits["train"].classes) == 37
    with pytest.raises(DataError, match="shots=3"):
        read_fgvc(ann, shots=3)
    (ann / "test_meta.list").unlink()
    with pytest.raises(DataError, match="missing: test_meta.list"):
        read_fgvc(ann)


def test_data_check_reports_and_names_unreadable_images(tmp_path, capsys):
    task = make_vtab(tmp_path)
    report = check_dataset(task)
    assert report.layout == "VTAB-1k task" and report.splits["test"] == 6 and report.sizes[(10, 12)] == 18
    assert main(["data", "check", str(task)]) == 0
    assert "train800val200" in capsys.readouterr().out
    (task / "images" / "test_3.jpg").write_bytes(b"garbage")
    (task / "images" / "val200_0.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"2 unreadable image\(s\): .*val200_0.jpg"):
        check_dataset(task)
    assert main(["data", "check", str(tmp_path / "missing")]) == 2
    assert "data path not found" in capsys.readouterr().err
    assert check_dataset(make_fgvc(tmp_path / "f")).layout == "few-shot FGVC lists"


def test_check_reports_class_names_and_counts_per_split(shapes, capsys):
    report = check_dataset(shapes)  # a parent of train/val/test image folders
    assert report.layout.startswith("split folders (train, val, test)")
    assert report.splits == {"train": 160, "val": 40, "test": 80}
    assert [report.per_class["val"][k] for k in range(4)] == [10] * 4
    text = "\n".join(report.lines())
    for name in report.classes:
        assert f"    {name}" in text
