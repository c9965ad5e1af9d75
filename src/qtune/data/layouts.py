"""The papers' datasets in the on-disk layouts that circulate, and their task registries.

VTAB-1k (Zhai et al. 2019): one folder per task with ``train800``, ``val200``, ``train800val200`` and ``test`` lists,
either ``.txt`` (``relative/path.jpg label`` lines: NOAH, FacT, SSF) or ``.json`` (``{"relative/path.png": label}``:
the SynQT release). Few-shot FGVC: NOAH's ``annotations/train_meta.list.num_shot_{k}.seed_{s}``, ``val_meta.list``
and ``test_meta.list``, paths relative to the dataset's image folder.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from .datasets import Listing, read_list_file


@dataclass(frozen=True)
class Task:
    name: str
    num_classes: int
    group: str
    aliases: tuple[str, ...] = ()


VTAB_TASKS: dict[str, Task] = {t.name: t for t in (
    Task("cifar", 100, "natural", ("cifar100", "cifar-100")),
    Task("caltech101", 102, "natural", ("caltech",)),
    Task("dtd", 47, "natural"),
    Task("oxford_flowers102", 102, "natural", ("flowers102", "flowers")),
    Task("oxford_iiit_pet", 37, "natural", ("pets", "oxford_pet")),
    Task("svhn", 10, "natural"),
    Task("sun397", 397, "natural", ("sun",)),
    Task("patch_camelyon", 2, "specialized", ("camelyon", "pcam")),
    Task("eurosat", 10, "specialized"),
    Task("resisc45", 45, "specialized"),
    Task("diabetic_retinopathy", 5, "specialized", ("retinopathy",)),
    Task("clevr_count", 8, "structured", ("clevr_count_all",)),
    Task("clevr_dist", 6, "structured", ("clevr_closest_object_distance",)),
    Task("dmlab", 6, "structured"),
    Task("kitti", 4, "structured", ("kitti_closest_vehicle_distance",)),
    Task("dsprites_loc", 16, "structured", ("dsprites_location",)),
    Task("dsprites_ori", 16, "structured", ("dsprites_orientation",)),
    Task("smallnorb_azi", 18, "structured", ("smallnorb_azimuth",)),
    Task("smallnorb_ele", 9, "structured", ("smallnorb_elevation",)),
)}
VTAB_GROUPS = ("natural", "specialized", "structured")

FGVC_TASKS: dict[str, Task] = {t.name: t for t in (
    Task("fgvc-aircraft", 100, "fgvc", ("aircraft", "fgvc_aircraft")),
    Task("food101", 101, "fgvc", ("food-101", "food")),
    Task("oxford-flowers102", 102, "fgvc", ("flowers102-fs", "oxford_flowers102-fs")),
    Task("oxford-pets", 37, "fgvc", ("pets-fs",)),
    Task("standford-cars", 196, "fgvc", ("stanford-cars", "cars", "stanford_cars")),
)}
FGVC_SHOTS = (1, 2, 4, 8, 16)
FGVC_SEEDS = (0, 1, 2)

VTAB_SPLITS = ("train800", "val200", "train800val200", "test")


def vtab_task(name: str) -> Task | None:
    """The registry entry for a task folder name as it circulates (``cifar``, ``clevr_count``...), if any."""
    key = name.lower().replace("vtab-", "").replace("vtab_", "")
    for task in VTAB_TASKS.values():
        if key == task.name or key in task.aliases:
            return task
    return None


def is_vtab_folder(path: Path) -> bool:
    return path.is_dir() and any((path / f"train800{s}").is_file() for s in (".txt", ".json"))


def read_vtab(task_dir: str | Path, num_classes: int | None = None) -> dict[str, Listing]:
    """The four VTAB-1k splits of one task folder (layout .txt or .json), labels checked against the class count
    (the registry's for a known task name, else ``num_classes``, else inferred)."""
    task_dir = Path(task_dir)
    if not task_dir.is_dir():
        raise DataError(f"{task_dir}: VTAB task folder not found")
    suffix = ".txt" if (task_dir / "train800.txt").is_file() else ".json"
    missing = [f"{s}{suffix}" for s in VTAB_SPLITS if not (task_dir / f"{s}{suffix}").is_file()]
    if missing:
        raise DataError(f"{task_dir}: VTAB list file(s) missing: {', '.join(missing)}")
    task = vtab_task(task_dir.name)
    if num_classes is None and task is not None:
        num_classes = task.num_classes
    if num_classes is None:  # a task the registry does not know: its classes are those its training list uses
        num_classes = len(read_list_file(task_dir / f"train800val200{suffix}").classes)
    splits = {s: read_list_file(task_dir / f"{s}{suffix}", task_dir, num_classes) for s in VTAB_SPLITS}
    for listing in splits.values():
        listing.check_files()
    return splits


def read_fgvc(annotations: str | Path, image_root: str | Path | None = None, shots: int = 16, seed: int = 0,
              num_classes: int | None = None) -> dict[str, Listing]:
    """Few-shot FGVC splits from NOAH-style lists: train (``shots`` per class, ``seed``), val and test.

    ``annotations`` is the dataset's ``annotations`` folder; images are looked up under ``image_root``
    (default: the folder above ``annotations``).
    """
    annotations = Path(annotations)
    if shots not in FGVC_SHOTS or seed not in FGVC_SEEDS:
        raise DataError(f"few-shot split shots={shots}, seed={seed}: choose shots in {FGVC_SHOTS}, seed in {FGVC_SEEDS}")
    root = Path(image_root) if image_root else annotations.parent
    files = {"train": f"train_meta.list.num_shot_{shots}.seed_{seed}", "val": "val_meta.list", "test": "test_meta.list"}
    missing = [f for f in files.values() if not (annotations / f).is_file()]
    if missing:
        raise DataError(f"{annotations}: few-shot list file(s) missing: {', '.join(missing)}")
    task = next((t for t in FGVC_TASKS.values()
                 if annotations.parent.name.lower() in (t.name, *t.aliases)), None)
    if num_classes is None and task is not None:
        num_classes = task.num_classes
    if num_classes is None:  # a dataset the registry does not know: its classes are those its k-shot list uses
        num_classes = len(read_list_file(annotations / files["train"], root).classes)
    splits = {k: read_list_file(annotations / f, root, num_classes) for k, f in files.items()}
    for listing in splits.values():
        listing.check_files()
    return splits
