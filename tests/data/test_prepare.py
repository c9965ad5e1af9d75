"""`qtune data vtab` / `data fgvc` / `data check --vtab` on tiny fake raw datasets, each in its source's exact layout
(the folders, .mat / pickle / .json / .csv / binary files torchvision or the release has), at the sizes VTAB's
slices need. No network: torchvision's md5 checks of the real release files are switched off for the fakes."""
import json
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from qtune.cli import main
from qtune.data.check import check_vtab
from qtune.data.layouts import read_fgvc, read_vtab
from qtune.data.prepare import RULES, UNSUPPORTED, VTAB_TEST_SIZES, prepare_fgvc, prepare_vtab
from qtune.data.prepare.raw import clevr_distance_label, kitti_distance_label
from qtune.data.prepare.write import Slice
from qtune.errors import ConfigError, DataError


def _jpg(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 3), (seed * 37 % 256, seed * 11 % 256, 7)).save(path, "JPEG")


@pytest.fixture
def no_md5(monkeypatch):
    import torchvision.datasets as tvd
    import torchvision.datasets.cifar as cifar

    for cls in (tvd.Flowers102, tvd.CIFAR100, tvd.SVHN):
        monkeypatch.setattr(cls, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)


def fake_flowers(root, per_class=(10, 10, 3), classes=102):
    """flowers-102/jpg + imagelabels.mat + setid.mat (trnid / valid / tstid), as torchvision reads them."""
    from scipy.io import savemat

    base = root / "flowers-102"
    ids = {"trnid": [], "valid": [], "tstid": []}
    labels = []
    n = 0
    for k in range(classes):
        for split, count in zip(ids, per_class):
            for _ in range(count):
                n += 1
                ids[split].append(n)
                labels.append(k + 1)
                _jpg(base / "jpg" / f"image_{n:05d}.jpg", n)
    savemat(base / "imagelabels.mat", {"labels": np.array(labels)})
    savemat(base / "setid.mat", {k: np.array(v) for k, v in ids.items()})
    return ids


def fake_dtd(root):
    base = root / "dtd" / "dtd"
    classes = [f"c{k:02d}" for k in range(47)]
    for split, n in (("train", 20), ("val", 5), ("test", 2)):
        lines = []
        for c in classes:
            for i in range(n):
                rel = f"{c}/{c}_{split}_{i}.jpg"
                _jpg(base / "images" / rel, i)
                lines.append(rel)
        (base / "labels").mkdir(parents=True, exist_ok=True)
        (base / "labels" / f"{split}1.txt").write_text("\n".join(lines) + "\n")


def fake_pets(root):
    base = root / "oxford-iiit-pet"
    (base / "annotations").mkdir(parents=True)
    for split, n in (("trainval", 85), ("test", 2)):
        lines = []
        for k in range(37):
            for i in range(n):
                name = f"Breed{k}_{split}{i}"
                _jpg(base / "images" / f"{name}.jpg", i)
                lines.append(f"{name} {k + 1} 1 1")
        (base / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")


def fake_cifar(root, n_train=2000, n_test=20):
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        with open(base / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                         "fine_labels": [i % 100 for i in range(n)]}, f)
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)


def fake_svhn(root, n_train=2000, n_test=20):
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        savemat(root / f"{name}_32x32.mat", {"X": rng.integers(0, 255, (32, 32, 3, n), dtype=np.uint8),
                                             "y": (np.arange(n) % 10 + 1).reshape(-1, 1)})


def fake_pcam(root, sizes=(("train", 800), ("valid", 200), ("test", 5))):
    h5py = pytest.importorskip("h5py")
    base = root / "pcam"
    base.mkdir(parents=True)
    for name, n in sizes:
        with h5py.File(base / f"camelyonpatch_level_2_split_{name}_x.h5", "w") as f:
            f["x"] = np.random.default_rng(0).integers(0, 255, (n, 96, 96, 3), dtype=np.uint8)
        with h5py.File(base / f"camelyonpatch_level_2_split_{name}_y.h5", "w") as f:
            f["y"] = (np.arange(n) % 2).reshape(n, 1, 1, 1).astype(np.uint8)


def fake_folders(base, classes, per_class, name="{c}_{i:03d}.jpg"):
    for c in classes:
        for i in range(per_class):
            _jpg(base / c / name.format(c=c, i=i), i)


def fake_sun397(root, per_class=6, classes=397):
    base = root / "SUN397"
    names = [f"a/abbey{k}" for k in range(classes)]
    base.mkdir(parents=True)
    (base / "ClassName.txt").write_text("".join(f"/{n}\n" for n in names))
    for n in names:
        for i in range(per_class):
            _jpg(base / n / f"sun_{i:04d}.jpg", i)


def fake_kitti(root, n=7481):
    base = root / "Kitti" / "raw" / "training"
    (base / "label_2").mkdir(parents=True)
    for i in range(n):
        _jpg(base / "image_2" / f"{i:06d}.png", i)  # torchvision lists every file of image_2
        z = (3.0, 15.0, 40.0, 1000.0)[i % 4]
        line = f"Car 0 0 0 1 2 3 4 1 1 1 0 0 {z} 0\n" if z < 1000 else "Pedestrian 0 0 0 1 2 3 4 1 1 1 0 0 5.0 0\n"
        (base / "label_2" / f"{i:06d}.txt").write_text(line)


def fake_clevr(root, n_train=2000, n_val=30):
    base = root / "clevr" / "CLEVR_v1.0"
    (base / "scenes").mkdir(parents=True)
    for split, n in (("train", n_train), ("val", n_val)):
        scenes = []
        for i in range(n):
            name = f"CLEVR_{split}_{i:06d}.png"
            _jpg(base / "images" / split / name, i)
            count = 3 + i % 8
            scenes.append({"image_filename": name, "objects": [
                {"pixel_coords": [1, 2, 7.5 + 0.5 * ((i + j) % 6)]} for j in range(count)]})
        (base / "scenes" / f"CLEVR_{split}_scenes.json").write_text(json.dumps({"scenes": scenes}))


def fake_dsprites(root, n=2000):
    base = root / "dsprites"
    base.mkdir(parents=True)
    latents = np.zeros((n, 6), dtype=np.int64)
    latents[:, 3] = np.arange(n) % 40
    latents[:, 4] = np.arange(n) % 32
    imgs = (np.random.default_rng(0).random((n, 64, 64)) > 0.5).astype(np.uint8)
    np.savez(base / "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz", imgs=imgs, latents_classes=latents)


def _norb_file(path, array, magic):
    dims = list(array.shape) + [1] * max(0, 3 - array.ndim)
    path.write_bytes(struct.pack("<ii", magic, array.ndim) + struct.pack(f"<{len(dims)}i", *dims) + array.tobytes())


def fake_smallnorb(root, n_train=800, n_test=400):
    base = root / "smallnorb"
    base.mkdir(parents=True)
    for name, n in (("training", n_train), ("testing", n_test)):
        images = np.random.default_rng(0).integers(0, 255, (n, 2, 96, 96), dtype=np.uint8)
        info = np.stack([np.zeros(n), np.arange(n) % 9, (np.arange(n) % 18) * 2, np.zeros(n)], 1).astype("<i4")
        _norb_file(base / f"smallnorb-5x46789x9x18x6x2x96x96-{name}-dat.mat", images, 0x1E3D4C55)
        _norb_file(base / f"smallnorb-5x46789x9x18x6x2x96x96-{name}-info.mat", info, 0x1E3D4C54)


def fake_retinopathy(root, n_train=800, n_public=200, n_private=3):
    base = root / "diabetic_retinopathy"
    rows = {"train": ["image,level"], "test": ["image,level,Usage"]}
    for i in range(n_train):
        _jpg(base / "train" / f"{i}_left.jpeg", i)
        rows["train"].append(f"{i}_left,{i % 5}")
    for i in range(n_public + n_private):
        _jpg(base / "test" / f"t{i}_left.jpeg", i)
        rows["test"].append(f"t{i}_left,{i % 5},{'Public' if i < n_public else 'Private'}")
    (base / "trainLabels.csv").write_text("\n".join(rows["train"]) + "\n")
    (base / "retinopathy_solution.csv").write_text("\n".join(rows["test"]) + "\n")


FAKES = {  # task -> (builder, expected test size on the fake)
    "oxford_flowers102": (fake_flowers, 306),
    "dtd": (fake_dtd, 94),
    "oxford_iiit_pet": (fake_pets, 74),
    "cifar": (fake_cifar, 20),
    "svhn": (fake_svhn, 20),
    "patch_camelyon": (fake_pcam, 5),
    "caltech101": (lambda r: fake_folders(r / "caltech101" / "101_ObjectCategories",
                                          [f"cat{k:03d}" for k in range(102)], 32, "image_{i:04d}.jpg"), 204),
    "sun397": (fake_sun397, 477),
    "eurosat": (lambda r: fake_folders(r / "eurosat" / "2750", [f"C{k}" for k in range(10)], 150), 300),
    "resisc45": (lambda r: fake_folders(r / "resisc45" / "NWPU-RESISC45", [f"c{k}" for k in range(45)], 34), 306),
    "kitti": (fake_kitti, 711),
    "clevr_count": (fake_clevr, 30),
    "clevr_dist": (fake_clevr, 30),
    "dsprites_loc": (fake_dsprites, 200),
    "dsprites_ori": (fake_dsprites, 200),
    "smallnorb_azi": (fake_smallnorb, 200),
    "smallnorb_ele": (fake_smallnorb, 200),
    "diabetic_retinopathy": (fake_retinopathy, 3),
}


def test_every_task_has_a_fake_or_says_why():
    assert set(FAKES) == set(RULES)
    assert set(UNSUPPORTED) == {"dmlab"}
    assert main(["data", "vtab", "dmlab", "--out", "x", "--root", "."]) == 2


@pytest.mark.parametrize("task", sorted(FAKES))
def test_prepare_vtab_task(task, tmp_path, no_md5, monkeypatch):
    monkeypatch.setattr("qtune.data.prepare.raw.RETINOPATHY_RADIUS", 8)  # Graham's preprocessing, on tiny images
    build, test_size = FAKES[task]
    raw = tmp_path / "raw"
    raw.mkdir()
    build(raw)
    out = tmp_path / "vtab"
    assert main(["data", "vtab", task, "--root", str(raw), "--out", str(out)]) == 0
    splits = read_vtab(out / task)  # the registry's class count bounds every label
    sizes = {k: len(v.samples) for k, v in splits.items()}
    assert sizes == {"train800": 800, "val200": 200, "train800val200": 1000, "test": test_size}
    assert splits["train800val200"].samples == splits["train800"].samples + splits["val200"].samples
    train, val, test = (set(splits[k].sample_ids) for k in ("train800", "val200", "test"))
    assert not (train & val) and not (train & test) and not (val & test)
    manifest = json.loads((out / task / "manifest.json").read_text())
    assert manifest["sizes"] == sizes and manifest["seed"] == 0 and set(manifest["sha256"]) == set(sizes)
    for listing in splits.values():  # every image written, and readable
        for rel in listing.sample_ids[:3]:
            with Image.open(out / task / rel) as im:
                im.load()


def test_flowers_lists_follow_the_official_split_and_labels(tmp_path, no_md5):
    ids = fake_flowers(tmp_path / "raw")
    prepare_vtab(["flowers"], tmp_path / "out", tmp_path / "raw", say=lambda *_: None)
    splits = read_vtab(tmp_path / "out" / "oxford_flowers102")
    number = lambda rel: int(rel.split("_")[-1].split(".")[0])  # noqa: E731
    assert {number(r) for r in splits["train800"].sample_ids} <= set(ids["trnid"])
    assert {number(r) for r in splits["val200"].sample_ids} <= set(ids["valid"])
    assert sorted(number(r) for r in splits["test"].sample_ids) == ids["tstid"]
    for rel, label in splits["test"].samples:  # imagelabels.mat is 1-based, in blocks of 23 images per class
        assert label == (number(rel) - 1) // 23


def test_prepare_is_deterministic_resumable_and_guards_its_folder(tmp_path, no_md5):
    fake_dsprites(tmp_path / "raw")
    quiet = dict(say=lambda *_: None)
    a = prepare_vtab(["dsprites_loc"], tmp_path / "a", tmp_path / "raw", **quiet)[0]
    b = prepare_vtab(["dsprites_loc"], tmp_path / "b", tmp_path / "raw", **quiet)[0]
    assert all((a / f).read_text() == (b / f).read_text() for f in ("train800.txt", "test.txt"))
    c = prepare_vtab(["dsprites_loc"], tmp_path / "c", tmp_path / "raw", seed=1, **quiet)[0]
    assert (c / "train800.txt").read_text() != (a / "train800.txt").read_text()
    # interrupted before the lists: the images written so far are kept and the rest follow
    (a / "manifest.json").unlink()
    for f in ("val200.txt", "train800val200.txt", "test.txt"):  # stopped after the first list
        (a / f).unlink()
    sorted((a / "images" / "train").iterdir())[0].unlink()
    said = []
    prepare_vtab(["dsprites_loc"], tmp_path / "a", tmp_path / "raw", say=said.append)
    assert any("already written, resuming" in s for s in said)
    assert (a / "test.txt").read_text() == (b / "test.txt").read_text()
    said.clear()
    prepare_vtab(["dsprites_loc"], tmp_path / "a", tmp_path / "raw", say=said.append)
    assert any("already prepared" in s for s in said)
    with pytest.raises(DataError, match="--overwrite"):
        prepare_vtab(["dsprites_loc"], tmp_path / "a", tmp_path / "raw", seed=3, **quiet)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "dsprites_loc").mkdir()
    (tmp_path / "mine" / "dsprites_loc" / "notes.txt").write_text("someone's")
    with pytest.raises(DataError, match="not a folder this command wrote"):
        prepare_vtab(["dsprites_loc"], tmp_path / "mine", tmp_path / "raw", **quiet)


def test_dsprites_and_clevr_labels_follow_vtab(tmp_path, no_md5):
    fake_dsprites(tmp_path / "raw", n=2000)
    out = prepare_vtab(["dsprites_ori"], tmp_path / "o", tmp_path / "raw", say=lambda *_: None)[0]
    data = np.load(tmp_path / "raw" / "dsprites" / "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz")
    for rel, label in read_vtab(out)["train800"].samples[:50]:
        index = int(rel.split("/")[-1].split(".")[0])
        assert label == int(data["latents_classes"][index, 3] // 2.5)
    assert clevr_distance_label([{"pixel_coords": [0, 0, 9.2]}, {"pixel_coords": [0, 0, 12]}]) == 3
    assert clevr_distance_label([{"pixel_coords": [0, 0, 7.9]}]) == 0
    assert kitti_distance_label([{"type": "Van", "location": [0, 0, 8.5]}]) == 1
    assert kitti_distance_label([{"type": "Pedestrian", "location": [0, 0, 3.0]}]) == 3


def test_missing_raw_files_are_one_line_naming_what_is_expected(tmp_path, capsys):
    (tmp_path / "raw").mkdir()
    for task, expect in (("oxford_flowers102", "flowers-102/jpg"), ("dsprites_loc", "dsprites/dsprites_ndarray"),
                         ("smallnorb_ele", "smallnorb/smallnorb-5x46789x9x18x6x2x96x96-training"),
                         ("resisc45", "NWPU-RESISC45"), ("clevr_dist", "CLEVR_train_scenes.json")):
        assert main(["data", "vtab", task, "--root", str(tmp_path / "raw"), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("qtune: error:") and expect in err and err.count("\n") == 1
    assert main(["data", "vtab", "not_a_task", "--out", str(tmp_path / "o")]) == 2
    assert "unknown VTAB-1k task 'not_a_task'" in capsys.readouterr().err


def test_slice_bounds_are_vtab_integer_percentages():
    items = list(range(73257))  # SVHN's train split
    assert Slice.parse("train[90%:90%+200]").take(items) == items[65931:66131]
    assert Slice.parse("train[:800]").take(items) == items[:800]
    assert Slice.parse("test").take(items) == items
    with pytest.raises(DataError, match="needs 2000"):
        Slice.parse("train[:2000]").take(items[:100])


def test_check_vtab_accepts_a_full_task_and_names_every_fault(tmp_path, no_md5, monkeypatch):
    fake_flowers(tmp_path / "raw", per_class=(10, 10, 3))
    out = prepare_vtab(["flowers"], tmp_path / "vtab", tmp_path / "raw", say=lambda *_: None)[0]
    with pytest.raises(DataError, match="test has 306 images, oxford_flowers102's test split has 6149"):
        check_vtab(out)
    # the fake's test split is short by design: hold it to its own size from here on
    monkeypatch.setitem(VTAB_TEST_SIZES, "oxford_flowers102", 306)
    assert check_vtab(tmp_path / "vtab")[0].startswith("oxford_flowers102: ok, 102 classes")
    lines = (out / "test.txt").read_text().splitlines()
    train = (out / "train800.txt").read_text().splitlines()
    (out / "test.txt").write_text("\n".join(lines[:-1] + [train[0]]) + "\n")
    with pytest.raises(DataError, match="1 image.s. in both train800 and test"):
        check_vtab(out)
    (out / "val200.txt").write_text("\n".join((out / "val200.txt").read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(DataError, match="val200 has 199 images, VTAB-1k has 200.*train800val200 is not"):
        check_vtab(out)


def test_prepare_fgvc_nested_shots_and_coop_splits(tmp_path, no_md5):
    fake_flowers(tmp_path / "raw", per_class=(10, 10, 20), classes=5)
    fake_pets(tmp_path / "raw")
    folders = prepare_fgvc(["flowers102-fs", "pets-fs"], tmp_path / "fgvc", tmp_path / "raw", seeds=(0, 1),
                           say=lambda *_: None)
    for folder in folders:
        ann = folder / "annotations"
        by_k = {k: read_fgvc(ann, shots=k, seed=0, num_classes=None) for k in (1, 2, 16)}
        classes = {y for _, y in by_k[16]["train"].samples}
        assert len(by_k[1]["train"].samples) == len(classes)
        assert len(by_k[16]["train"].samples) == 16 * len(classes)
        assert set(by_k[1]["train"].sample_ids) <= set(by_k[2]["train"].sample_ids) <= set(
            by_k[16]["train"].sample_ids)
        seed1 = read_fgvc(ann, shots=16, seed=1)
        assert set(seed1["train"].sample_ids) != set(by_k[16]["train"].sample_ids)
        held = set(by_k[16]["val"].sample_ids) | set(by_k[16]["test"].sample_ids)
        assert not held & (set(by_k[16]["train"].sample_ids) | set(seed1["train"].sample_ids))
    flowers = json.loads((folders[0] / "annotations" / "manifest.json").read_text())
    assert flowers["sizes"]["val_meta.list"] == 5 * 8 and flowers["sizes"]["test_meta.list"] == 5 * 12
    with pytest.raises(ConfigError, match="shots"):
        prepare_fgvc(["pets-fs"], tmp_path / "x", tmp_path / "raw", shots=(3,))
    with pytest.raises(ConfigError, match="unknown few-shot dataset"):
        prepare_fgvc(["mnist"], tmp_path / "x", tmp_path / "raw")


def fake_aircraft(root, classes=4, per_split=(17, 3, 2)):
    data = root / "fgvc-aircraft-2013b" / "data"
    names = [f"7{k}7-{k}00" for k in range(classes)]
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("\n".join(names) + "\n")
    n = 0
    for split, count in zip(("train", "val", "test"), per_split):
        lines = []
        for name in names:
            for _ in range(count):
                n += 1
                _jpg(data / "images" / f"{n:07d}.jpg", n)
                lines.append(f"{n:07d} {name}")
        (data / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")


def fake_food(root, classes=3, per_split=(30, 10)):
    base = root / "food-101"
    (base / "meta").mkdir(parents=True)
    for split, count in zip(("train", "test"), per_split):
        meta = {f"dish{k}": [f"dish{k}/{split}{i}" for i in range(count)] for k in range(classes)}
        for paths in meta.values():
            for p in paths:
                _jpg(base / "images" / f"{p}.jpg")
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("name, build, sizes", [
    ("aircraft", fake_aircraft, {"val_meta.list": 12, "test_meta.list": 8}),  # the official val and test
    ("food", fake_food, {"val_meta.list": 24, "test_meta.list": 36}),  # 20 / 30% of 40 per class
])
def test_prepare_fgvc_other_layouts(name, build, sizes, tmp_path):
    build(tmp_path / "raw")
    folder = prepare_fgvc([name], tmp_path / "fgvc", tmp_path / "raw", seeds=(0,), say=lambda *_: None)[0]
    manifest = json.loads((folder / "annotations" / "manifest.json").read_text())
    assert {k: manifest["sizes"][k] for k in sizes} == sizes
    split = read_fgvc(folder / "annotations", shots=16, seed=0)
    assert len(split["train"].samples) == 16 * (4 if name == "aircraft" else 3)


def test_an_unknown_task_takes_its_classes_from_its_training_list(tmp_path):
    task = tmp_path / "my_task"
    task.mkdir()
    for i in range(6):
        _jpg(task / f"{i}.jpg", i)
    lists = {"train800": "0.jpg 0\n1.jpg 1\n2.jpg 2\n", "val200": "3.jpg 0\n", "test": "4.jpg 1\n5.jpg 0\n"}
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for name, text in lists.items():
        (task / f"{name}.txt").write_text(text)
    splits = read_vtab(task)  # val200 and test use fewer classes than training: still three classes
    assert all(len(listing.classes) == 3 for listing in splits.values())
    (task / "test.txt").write_text("4.jpg 3\n")
    with pytest.raises(DataError, match="label"):
        read_vtab(task)
