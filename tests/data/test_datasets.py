import json

import pytest

from qtune.data import read_split
from qtune.errors import DataError


@pytest.fixture
def listed(shapes, tmp_path):
    """The shapes training images as a VTAB-style list file, a JSON list and a CSV, paths relative to the root."""
    files = sorted((shapes / "train").rglob("*.png"))
    pairs = [(f.relative_to(shapes).as_posix(), int(f.parent.name[0])) for f in files]
    (shapes / "list.txt").write_text("".join(f"{p} {y}\n" for p, y in pairs))
    (shapes / "list.json").write_text(json.dumps(dict(pairs)))
    (shapes / "list.csv").write_text("path,label\n" + "".join(f"{p},{y}\n" for p, y in pairs))
    return shapes, pairs


@pytest.mark.parametrize("fmt", ["txt", "json", "csv"])
def test_list_formats_agree_with_folder(listed, fmt):
    shapes, pairs = listed
    listing = read_split(shapes / f"list.{fmt}")
    assert list(listing.samples) == pairs and len(listing.classes) == 4
    folder = read_split(shapes / "train")
    assert sorted(folder.labels) == sorted(listing.labels)


def test_sample_ids_are_relative_paths(shapes):
    listing = read_split(shapes / "train")
    assert listing.sample_ids[0] == "0_square/0000.png"


def test_missing_listed_images_are_counted(shapes, tmp_path):
    lst = shapes / "bad.txt"
    lst.write_text("train/0_square/0000.png 0\nnope/a.png 1\nnope/b.png 1\nnope/c.png 1\nnope/d.png 1\n")
    with pytest.raises(DataError, match=r"4 listed image\(s\) missing .*nope/a.png.*\(and 1 more\)"):
        read_split(lst)


def test_bad_lines_and_labels(tmp_path):
    (tmp_path / "a.txt").write_text("only-a-path\n")
    with pytest.raises(DataError, match="a.txt:1: expected"):
        read_split(tmp_path / "a.txt")
    (tmp_path / "b.txt").write_text("x.png cat\n")
    with pytest.raises(DataError, match="b.txt:1: label 'cat' is not an integer"):
        read_split(tmp_path / "b.txt")
    (tmp_path / "c.txt").write_text("x.png -1\n")
    with pytest.raises(DataError, match=r"1 label\(s\) out of range \(>= 0\): .*c.txt:1: label -1"):
        read_split(tmp_path / "c.txt")
    (tmp_path / "d.txt").write_text("\n")
    with pytest.raises(DataError, match="empty list"):
        read_split(tmp_path / "d.txt")


def test_test_split_with_unknown_class_folder(shapes, tmp_path):
    (tmp_path / "t" / "zebra").mkdir(parents=True)
    with pytest.raises(DataError, match="zebra"):
        read_split(tmp_path / "t", classes=read_split(shapes / "train").classes)
