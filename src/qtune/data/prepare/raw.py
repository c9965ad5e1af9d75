"""Readers of the original datasets, each in the root layout its torchvision class (or its release) uses.

A reader returns a ``Pool``: the dataset's own splits, each a list of ``Item``s (a stable key, the label the task
asks for, and the image as a file to copy or a function that renders it). torchvision's classes read the layouts
they know, verify what they can and download with ``download=True``; the releases torchvision does not know are read
here from their original files.
"""
from __future__ import annotations

import csv
import functools
import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import numpy as np
from PIL import Image

from ...errors import DataError
from ..datasets import IMAGE_SUFFIXES

ImageSource = Union[Path, Callable[[], Image.Image]]


@dataclass(frozen=True)
class Item:
    key: str  # unique within the dataset; becomes the image's path under the prepared folder
    label: int
    image: ImageSource


Pool = dict[str, list[Item]]  # the dataset's own split name -> items
Reader = Callable[[Path, bool], Pool]


def missing(root: Path, what: str) -> DataError:
    return DataError(f"{root}: {what}")


def _torchvision(cls_name: str, root: Path, download: bool, expected: str, **kwargs):
    """A torchvision dataset, its 'not found' turned into one line naming the files expected under --root."""
    import torchvision.datasets as tvd

    try:
        return getattr(tvd, cls_name)(str(root), download=download, **kwargs)
    except (RuntimeError, FileNotFoundError, OSError) as e:
        hint = "" if download else " (or pass --download)"
        raise missing(root, f"{cls_name} not found or incomplete: expected {expected}{hint} [{e}]") from None
    except ImportError as e:  # h5py for PCAM, scipy for the .mat files
        raise DataError(f"{cls_name} needs the package {e.name!r}: pip install {e.name}") from None


def _files(files: list, labels: list, base: Path) -> list[Item]:
    return [Item(Path(f).relative_to(base).as_posix(), int(y), Path(f)) for f, y in zip(files, labels)]


def _array_items(split: str, images, labels, suffix: str = ".png") -> list[Item]:
    def render(i: int) -> Image.Image:
        return Image.fromarray(np.ascontiguousarray(images[i]))
    return [Item(f"{split}/{i:06d}{suffix}", int(y), functools.partial(render, i)) for i, y in enumerate(labels)]


# --- torchvision-backed -------------------------------------------------------------------------------------------

def file_splits(cls_name: str, root: Path, download: bool, expected: str, base: Path, splits: dict[str, str],
                files: str = "_image_files", **kwargs) -> Pool:
    """A torchvision dataset of image files, one instance per split (our name -> its ``split`` argument)."""
    pool = {}
    for ours, theirs in splits.items():
        ds = _torchvision(cls_name, root, download, expected, split=theirs, **kwargs)
        pool[ours] = _files(getattr(ds, files), ds._labels, base)
    return pool


THREE_SPLITS = {"train": "train", "validation": "val", "test": "test"}


def flowers102(root: Path, download: bool) -> Pool:
    return file_splits("Flowers102", root, download, "flowers-102/jpg/image_NNNNN.jpg, flowers-102/imagelabels.mat "
                       "and flowers-102/setid.mat", root / "flowers-102", THREE_SPLITS)


def dtd(root: Path, download: bool) -> Pool:
    return file_splits("DTD", root, download, "dtd/dtd/images/<class>/*.jpg and dtd/dtd/labels/{train,val,test}1.txt",
                       root / "dtd" / "dtd", THREE_SPLITS, partition=1)


def oxford_pets(root: Path, download: bool) -> Pool:
    return file_splits("OxfordIIITPet", root, download, "oxford-iiit-pet/images/*.jpg and "
                       "oxford-iiit-pet/annotations/{trainval,test}.txt", root / "oxford-iiit-pet",
                       {"train": "trainval", "test": "test"}, files="_images")


def cifar100(root: Path, download: bool) -> Pool:
    expected = "cifar-100-python/{train,test,meta} (the CIFAR-100 python release)"
    pool = {}
    for split, train in (("train", True), ("test", False)):
        ds = _torchvision("CIFAR100", root, download, expected, train=train)
        pool[split] = _array_items(split, ds.data, ds.targets)
    return pool


def svhn(root: Path, download: bool) -> Pool:
    expected = "train_32x32.mat and test_32x32.mat (SVHN format 2, cropped digits)"
    pool = {}
    for split in ("train", "test"):
        ds = _torchvision("SVHN", root, download, expected, split=split)
        pool[split] = _array_items(split, ds.data.transpose(0, 2, 3, 1), ds.labels)
    return pool


def pcam(root: Path, download: bool) -> Pool:
    expected = "pcam/camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5"
    pool = {}
    for split, name in (("train", "train"), ("validation", "val"), ("test", "test")):
        ds = _torchvision("PCAM", root, download, expected, split=name)
        import h5py

        base = ds._base_folder
        x_file = base / ds._FILES[name]["images"][0]
        y_file = base / ds._FILES[name]["targets"][0]
        with h5py.File(y_file) as f:
            labels = f["y"][:, 0, 0, 0].astype(int)
        pool[split] = _array_items(split, _H5Images(x_file), labels)
    return pool


class _H5Images:
    """Rows of an h5 image array, opened on first use (the file is too large to hold in memory)."""

    def __init__(self, path: Path):
        self.path, self._f = path, None

    def __getitem__(self, i: int):
        if self._f is None:
            import h5py

            self._f = h5py.File(self.path)
        return self._f["x"][i]


def eurosat(root: Path, download: bool) -> Pool:
    ds = _torchvision("EuroSAT", root, download, "eurosat/2750/<class>/*.jpg (the RGB release)")
    base = Path(ds.root)
    return {"train": [Item(Path(f).relative_to(base).as_posix(), y, Path(f)) for f, y in ds.samples]}


def sun397(root: Path, download: bool) -> Pool:
    ds = _torchvision("SUN397", root, download, "SUN397/ClassName.txt and SUN397/<letter>/<class>/*.jpg")
    return {"all": _files(ds._image_files, ds._labels, root / "SUN397")}


def kitti(root: Path, download: bool) -> Pool:
    """KITTI object detection's training images; label = the closest vehicle's distance bin (VTAB's rule)."""
    ds = _torchvision("Kitti", root, download, "Kitti/raw/training/image_2/*.png and Kitti/raw/training/label_2/*.txt",
                      train=True)
    base = root / "Kitti" / "raw"
    return {"all": [Item(Path(f).relative_to(base).as_posix(), kitti_distance_label(ds._parse_target(i)), Path(f))
                    for i, f in enumerate(ds.images)]}


def kitti_distance_label(objects: list[dict]) -> int:
    """VTAB's closest_vehicle_distance: depth of the nearest Car/Van/Truck in bins (<=8, <=20, <=999 m, none)."""
    z = [o["location"][2] for o in objects if o["type"] in ("Car", "Van", "Truck")] + [1000.0]
    return int(np.searchsorted([8.0, 20.0, 999.0], min(z), side="left"))


# --- read from the original releases -----------------------------------------------------------------------------

def _class_folders(base: Path, what: str) -> tuple[list[str], list[Path]]:
    if not base.is_dir():
        raise missing(base, f"folder not found: expected {what}")
    classes = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise missing(base, f"no class folders: expected {what}")
    return classes, [base / c for c in classes]


def _folder_items(base: Path, what: str) -> list[Item]:
    classes, dirs = _class_folders(base, what)
    items = [Item(f.relative_to(base).as_posix(), k, f) for k, d in enumerate(dirs) for f in sorted(d.iterdir())
             if f.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise missing(base, f"no images: expected {what}")
    return items


def caltech101(root: Path, download: bool) -> Pool:
    """All 102 folders of 101_ObjectCategories (TFDS keeps BACKGROUND_Google as a class; torchvision drops it)."""
    if download:
        _torchvision("Caltech101", root, True, "caltech101/101_ObjectCategories/<class>/*.jpg")
    return {"all": _folder_items(root / "caltech101" / "101_ObjectCategories",
                                 "caltech101/101_ObjectCategories/<class>/image_NNNN.jpg (102 folders)")}


def resisc45(root: Path, download: bool) -> Pool:
    _no_download("resisc45", download)
    return {"train": _folder_items(root / "resisc45" / "NWPU-RESISC45",
                                   "resisc45/NWPU-RESISC45/<class>/<class>_NNN.jpg (45 folders, the NWPU release)")}


def _no_download(name: str, download: bool) -> None:
    if download:
        raise DataError(f"{name}: no downloader (the release needs a manual download); place its files under --root")


def clevr(root: Path, download: bool, label: Callable[[list[dict]], int]) -> Pool:
    """CLEVR v1.0: the train and val images with their scene files (torchvision's root layout)."""
    if download:
        _torchvision("CLEVRClassification", root, True, "clevr/CLEVR_v1.0", split="train")
    base = root / "clevr" / "CLEVR_v1.0"
    pool = {}
    for split, name in (("train", "train"), ("validation", "val")):
        scenes = base / "scenes" / f"CLEVR_{name}_scenes.json"
        if not scenes.is_file():
            raise missing(root, f"{scenes.relative_to(root)} not found: expected clevr/CLEVR_v1.0/images/{{train,val}}"
                                f"/*.png and clevr/CLEVR_v1.0/scenes/CLEVR_{{train,val}}_scenes.json")
        items = []
        for scene in json.loads(scenes.read_text())["scenes"]:
            rel = f"images/{name}/{scene['image_filename']}"
            items.append(Item(rel, label(scene["objects"]), base / rel))
        pool[split] = items
    return pool


def clevr_count_label(objects: list[dict]) -> int:
    return len(objects) - 3  # 3..10 objects -> 8 classes


def clevr_distance_label(objects: list[dict]) -> int:
    """VTAB's closest_object_distance: depth (pixel_coords[2]) of the nearest object in 6 bins."""
    depth = min(o["pixel_coords"][2] for o in objects)
    return int(np.searchsorted([8.0, 8.5, 9.0, 9.5, 10.0, 100.0], depth, side="left"))


DSPRITES_FILE = "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"


def dsprites(root: Path, download: bool, attribute: str, num_classes: int) -> Pool:
    """dSprites' one array file; ``attribute`` (4: orientation of 40, 5: x position of 32) binned to num_classes."""
    _no_download("dsprites", download)
    path = root / "dsprites" / DSPRITES_FILE
    if not path.is_file():
        raise missing(root, f"dsprites/{DSPRITES_FILE} not found (the release of github.com/deepmind/dsprites-dataset)")
    data = np.load(path, allow_pickle=False)
    column = {"orientation": 3, "x_position": 4}[attribute]
    values = data["latents_classes"][:, column]
    original = {"orientation": 40, "x_position": 32}[attribute]
    labels = np.floor(values / (original / num_classes)).astype(int)
    images = data["imgs"]
    return {"train": _array_items("train", _Scaled(images), labels)}


class _Scaled:
    """dSprites' 0/1 pixels as 0/255 grey, row by row (the whole array is 737,280 images)."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __getitem__(self, i: int) -> np.ndarray:
        return (self.images[i] * 255).astype(np.uint8)


NORB_FILES = "smallnorb-5x46789x9x18x6x2x96x96-{split}-{part}.mat"


def _norb(path: Path) -> np.ndarray:
    """One file of the small NORB binary format (magic, ndim, dims, then the array), plain or gzipped."""
    opener = gzip.open if not path.is_file() and path.with_name(path.name + ".gz").is_file() else open
    target = path if opener is open else path.with_name(path.name + ".gz")
    with opener(target, "rb") as f:
        raw = f.read()
    magic, ndim = np.frombuffer(raw[:8], "<i4")
    dtype = {0x1E3D4C55: np.uint8, 0x1E3D4C54: np.int32}.get(int(magic))
    if dtype is None:
        raise DataError(f"{target}: not a small NORB file (magic {int(magic):#x})")
    dims = np.frombuffer(raw[8:8 + 4 * max(3, ndim)], "<i4")[:ndim]
    return np.frombuffer(raw[8 + 4 * max(3, ndim):], dtype).reshape(dims)


def smallnorb(root: Path, download: bool, attribute: str) -> Pool:
    """small NORB's training and test files; the first camera's image; azimuth (18) or elevation (9) as label."""
    _no_download("smallnorb", download)
    pool = {}
    for split, name in (("train", "training"), ("test", "testing")):
        paths = {p: root / "smallnorb" / NORB_FILES.format(split=name, part=p) for p in ("dat", "info")}
        absent = [p for p in paths.values() if not p.is_file() and not p.with_name(p.name + ".gz").is_file()]
        if absent:
            raise missing(root, f"smallnorb/{absent[0].name} (or .gz) not found (the small NORB release)")
        images, info = _norb(paths["dat"]), _norb(paths["info"])
        labels = info[:, 2] // 2 if attribute == "azimuth" else info[:, 1]
        pool[split] = _array_items(split, _FirstCamera(images), labels)
    return pool


class _FirstCamera:
    def __init__(self, images: np.ndarray):
        self.images = images

    def __getitem__(self, i: int) -> np.ndarray:
        return self.images[i, 0]


RETINOPATHY_RADIUS = 300  # TFDS's btgraham-300


def retinopathy(root: Path, download: bool) -> Pool:
    """Kaggle's Diabetic Retinopathy Detection: train + trainLabels.csv; the test images with the solution file,
    its Public rows as validation and its Private rows as test (TFDS's split), each image in Graham's
    preprocessing at 300 px (TFDS's btgraham-300 config, which VTAB uses)."""
    _no_download("diabetic_retinopathy", download)
    base = root / "diabetic_retinopathy"
    tables = {"train": base / "trainLabels.csv", "test": base / "retinopathy_solution.csv"}
    for t in tables.values():
        if not t.is_file():
            raise missing(root, f"diabetic_retinopathy/{t.name} not found: expected diabetic_retinopathy/"
                                f"{{train,test}}/*.jpeg, trainLabels.csv and retinopathy_solution.csv (Kaggle)")
    pool: Pool = {"train": [], "validation": [], "test": []}
    for folder, table in tables.items():
        with table.open(newline="") as f:
            for row in csv.DictReader(f):
                split = "train" if folder == "train" else ("validation" if row["Usage"] == "Public" else "test")
                source = base / folder / f"{row['image']}.jpeg"
                pool[split].append(Item(f"{folder}/{row['image']}.jpg", int(row["level"]),
                                        functools.partial(btgraham, source, RETINOPATHY_RADIUS)))
    return pool


def btgraham(path: Path, radius: int) -> Image.Image:
    """Graham's fundus preprocessing as TFDS applies it: scale the eye to ``radius``, subtract the local average
    colour (Gaussian blur, sigma radius / 30), clip to 90% of the circle, crop to a square of 2 x radius."""
    from PIL import ImageFilter

    with Image.open(path) as im:
        image = im.convert("RGB")
    a = np.asarray(image, np.float32)
    row = a[a.shape[0] // 2].sum(axis=1)
    eye = (row > row.mean() / 10).sum() / 2
    scale = radius / max(eye, 1.0)
    image = image.resize((max(1, round(a.shape[1] * scale)), max(1, round(a.shape[0] * scale))), Image.BICUBIC)
    a = np.asarray(image, np.float32)
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(radius / 30)), np.float32)
    a = np.clip(4 * a - 4 * blurred + 128, 0, 255)
    h, w = a.shape[:2]
    yy, xx = np.ogrid[:h, :w]
    inside = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 <= (0.9 * radius) ** 2
    a = np.where(inside[..., None], a, 128)
    top, left = max(0, h // 2 - radius), max(0, w // 2 - radius)
    return Image.fromarray(a[top:top + 2 * radius, left:left + 2 * radius].astype(np.uint8))
