"""VTAB-1k's 19 tasks, prepared from the original datasets by the rules of google-research/task_adaptation.

Per task: which of the dataset's own splits train800, val200 and test are cut from, and at which offsets (TFDS slice
syntax with VTAB's integer percentages: ``train[:800]``, ``train[90%:90%+200]``...), and how a label is derived.
TFDS orders each split by a hash of its record keys, which no other reader reproduces; here each source split is
sorted by key and permuted with a fixed seed, so the lists are deterministic and the offsets are VTAB's. The test
list is the full test slice, as in VTAB-1k.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from ..layouts import VTAB_SPLITS, VTAB_TASKS
from . import raw
from .write import Plan, Slice

# The official test sizes of VTAB-1k (the number of images each task's test list holds).
VTAB_TEST_SIZES = {
    "cifar": 10000, "caltech101": 6084, "dtd": 1880, "oxford_flowers102": 6149, "oxford_iiit_pet": 3669,
    "svhn": 26032, "sun397": 21750, "patch_camelyon": 32768, "eurosat": 5400, "resisc45": 6300,
    "diabetic_retinopathy": 42670, "clevr_count": 15000, "clevr_dist": 15000, "dmlab": 22735, "kitti": 711,
    "dsprites_loc": 73728, "dsprites_ori": 73728, "smallnorb_azi": 12150, "smallnorb_ele": 12150,
}


@dataclass(frozen=True)
class Rule:
    """How one VTAB-1k task is cut from its dataset."""

    task: str
    dataset: str  # the source, as the docs name it
    read: raw.Reader
    train800: Slice
    val200: Slice
    test: Slice
    split_first: dict[str, tuple[int, ...]] | None = None  # a source without the splits TFDS has: percentages
    note: str = ""

    @property
    def num_classes(self) -> int:
        return VTAB_TASKS[self.task].num_classes

    def plan(self) -> Plan:
        return Plan(self.task, self.dataset, self.read, {
            "train800": (self.train800,), "val200": (self.val200,),
            "train800val200": (self.train800, self.val200), "test": (self.test,)},
            self.num_classes, self.split_first, self.note)


def _s(text: str) -> Slice:
    return Slice.parse(text)


def _percent(task: str, dataset: str, read: raw.Reader, train_pct: int, note: str = "") -> Rule:
    """VTAB's rule for a dataset whose train split is cut by percentage: train800 from the start, val200 from the
    first image after train_pct%, test the dataset's test split."""
    return Rule(task, dataset, read, _s("train[:800]"), _s(f"train[{train_pct}%:{train_pct}%+200]"), _s("test"),
                note=note)


def _official(task: str, dataset: str, read: raw.Reader, note: str = "") -> Rule:
    """VTAB's rule for a dataset with train, validation and test splits of its own."""
    return Rule(task, dataset, read, _s("train[:800]"), _s("validation[:200]"), _s("test"), note=note)


RULES: dict[str, Rule] = {r.task: r for r in (
    _percent("cifar", "CIFAR-100", raw.cifar100, 90),
    Rule("caltech101", "Caltech101", raw.caltech101, _s("train[:800]"), _s("train[90%:90%+200]"), _s("test"),
         split_first={"per_class": (30,)},
         note="TFDS's train split is 30 images per class (3,060), the rest is test; drawn here per class with the "
              "seed"),
    _official("dtd", "DTD (partition 1)", raw.dtd),
    _official("oxford_flowers102", "Oxford Flowers102", raw.flowers102),
    _percent("oxford_iiit_pet", "Oxford-IIIT Pet", raw.oxford_pets, 80),
    _percent("svhn", "SVHN (cropped)", raw.svhn, 90),
    Rule("sun397", "SUN397", raw.sun397, _s("train[:800]"), _s("validation[:200]"), _s("test"),
         split_first={"percent": (70, 10, 20)},
         note="TFDS's sun397/tfds splits 70/10/20; made here from all images with the seed"),
    _official("patch_camelyon", "PatchCamelyon", raw.pcam),
    Rule("eurosat", "EuroSAT (RGB)", raw.eurosat, _s("train[:800]"), _s("train[60%:60%+200]"), _s("train[80%:]")),
    Rule("resisc45", "NWPU-RESISC45", raw.resisc45, _s("train[:800]"), _s("train[60%:60%+200]"), _s("train[80%:]")),
    _official("diabetic_retinopathy", "Diabetic Retinopathy (Kaggle), btgraham-300", raw.retinopathy),
    Rule("clevr_count", "CLEVR v1.0", functools.partial(raw.clevr, label=raw.clevr_count_label),
         _s("train[:800]"), _s("train[90%:90%+200]"), _s("validation"), note="label = objects - 3; test = CLEVR's val"),
    Rule("clevr_dist", "CLEVR v1.0", functools.partial(raw.clevr, label=raw.clevr_distance_label),
         _s("train[:800]"), _s("train[90%:90%+200]"), _s("validation"),
         note="label = depth of the closest object in bins 8, 8.5, 9, 9.5, 10, 100; test = CLEVR's val"),
    Rule("kitti", "KITTI object (training images)", raw.kitti, _s("train[:800]"), _s("validation[:200]"), _s("test"),
         split_first={"counts": (6347, 423, 711)},
         note="label = closest Car/Van/Truck distance in bins 8, 20, 999 m or none; TFDS splits the 7,481 images "
              "by video with the devkit's mapping; here by image with the seed, at TFDS's sizes"),
    Rule("dsprites_loc", "dSprites", functools.partial(raw.dsprites, attribute="x_position", num_classes=16),
         _s("train[:800]"), _s("train[80%:80%+200]"), _s("train[90%:]"), note="label = x position (32) // 2"),
    Rule("dsprites_ori", "dSprites", functools.partial(raw.dsprites, attribute="orientation", num_classes=16),
         _s("train[:800]"), _s("train[80%:80%+200]"), _s("train[90%:]"), note="label = orientation (40) // 2.5"),
    Rule("smallnorb_azi", "small NORB", functools.partial(raw.smallnorb, attribute="azimuth"),
         _s("train[:800]"), _s("test[:200]"), _s("test[50%:]"), note="label = azimuth / 20 degrees; first camera"),
    Rule("smallnorb_ele", "small NORB", functools.partial(raw.smallnorb, attribute="elevation"),
         _s("train[:800]"), _s("test[:200]"), _s("test[50%:]"), note="label = elevation index; first camera"),
)}

# DMLab is released only as TFRecord files of encoded examples (TFDS reads them with TensorFlow).
UNSUPPORTED = {
    "dmlab": "dmlab: its only release is TFDS's TFRecord files, which qtune does not read; use a VTAB-1k archive "
             "that has it (NOAH's or the SynQT release) and check it with `qtune data check --vtab`",
}

assert set(RULES) | set(UNSUPPORTED) == set(VTAB_TASKS), "every registry task has a rule"
assert all(len(r.plan().lists) == len(VTAB_SPLITS) for r in RULES.values())


def rule_for(name: str) -> Rule:
    from ...errors import ConfigError
    from ..layouts import vtab_task

    task = vtab_task(name)
    if task is None:
        raise ConfigError(f"unknown VTAB-1k task {name!r}: choose from {', '.join(VTAB_TASKS)}")
    if task.name in UNSUPPORTED:
        raise ConfigError(UNSUPPORTED[task.name])
    return RULES[task.name]


def prepare_vtab(tasks: list[str], out: Path, root: Path, download: bool = False, seed: int = 0,
                 overwrite: bool = False, say=print) -> list[Path]:
    """Write each task's folder (images + the four lists + manifest.json) under ``out``; returns the folders."""
    from .write import write_plan

    rules = [rule_for(t) for t in tasks]  # every name checked before anything is read
    return [write_plan(rule.plan(), out / rule.task, root, download, seed, overwrite, say) for rule in rules]
