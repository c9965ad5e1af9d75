"""Few-shot FGVC (the SynQT paper's Fig. 4 sets) in NOAH's layout: ``annotations/train_meta.list.num_shot_{k}.seed_{s}``,
``val_meta.list`` and ``test_meta.list``, paths relative to the dataset folder.

The train / val / test splits follow CoOp's (which NOAH's lists come from): FGVC-Aircraft's official three; Pets and
Cars the official test, with 20% of each class of the official train held out as val; Flowers102 and Food-101
all images of each class split 50 / 20 / 30 (Flowers102's official train has only 10 images per class, too few for
16 shots). CoOp drew its held-out parts at random once; here they are drawn with a fixed seed (0). k images per
class are then drawn from train per seed, nested (the 1-shot images are among the 2-shot ones, and so on), so that
a curve over shots compares like with like.
"""
from __future__ import annotations

from pathlib import Path

from ...errors import ConfigError, DataError
from ..layouts import FGVC_SEEDS, FGVC_SHOTS, FGVC_TASKS
from . import raw
from .raw import Item, Pool
from .write import generator, order, place

VAL_FRACTION = 0.2


def _aircraft(root: Path, download: bool) -> Pool:
    return raw.file_splits("FGVCAircraft", root, download, "fgvc-aircraft-2013b/data/images/*.jpg and its "
                           "images_variant_{train,val,test}.txt", root / "fgvc-aircraft-2013b",
                           {"train": "train", "val": "val", "test": "test"}, annotation_level="variant")


def _food101(root: Path, download: bool) -> Pool:
    pool = raw.file_splits("Food101", root, download, "food-101/images/<class>/*.jpg and food-101/meta/"
                           "{train,test}.json", root / "food-101", {"train": "train", "test": "test"})
    return {"all": pool["train"] + pool["test"]}


def _cars(root: Path, download: bool) -> Pool:
    expected = ("stanford_cars/cars_{train,test}/*.jpg, stanford_cars/devkit/cars_{meta,train_annos}.mat and "
                "stanford_cars/cars_test_annos_withlabels.mat")
    pool = {}
    for split in ("train", "test"):
        ds = raw._torchvision("StanfordCars", root, download, expected, split=split)
        files, labels = zip(*ds._samples)
        pool[split] = raw._files(list(files), list(labels), root / "stanford_cars")
    return pool


def _flowers(root: Path, download: bool) -> Pool:
    return {"all": [it for items in raw.flowers102(root, download).values() for it in items]}


def _pets(root: Path, download: bool) -> Pool:
    return raw.oxford_pets(root, download)


READERS = {
    "fgvc-aircraft": _aircraft, "food101": _food101, "oxford-flowers102": _flowers, "oxford-pets": _pets,
    "standford-cars": _cars,
}


def dataset_for(name: str) -> str:
    key = name.lower()
    for task in FGVC_TASKS.values():
        if key == task.name or key in task.aliases:
            return task.name
    raise ConfigError(f"unknown few-shot dataset {name!r}: choose from {', '.join(FGVC_TASKS)}")


def _by_class(items: list[Item]) -> dict[int, list[Item]]:
    out: dict[int, list[Item]] = {}
    for it in items:
        out.setdefault(it.label, []).append(it)
    return out


def split_per_class(items: list[Item], fractions: tuple[float, ...]) -> list[list[Item]]:
    """Each class cut in order (the pool's seeded order) into parts of the given fractions (CoOp's rounding: every
    part but the last at least one image); the last part takes the rest."""
    parts: list[list[Item]] = [[] for _ in fractions]
    for cls in _by_class(items).values():
        start = 0
        for k, frac in enumerate(fractions[:-1]):
            n = max(1, round(frac * len(cls)))
            parts[k] += cls[start:start + n]
            start += n
        parts[-1] += cls[start:]
    return parts


def draw_shots(train: list[Item], shots: tuple[int, ...], seed: int) -> dict[int, list[Item]]:
    """k images per class for each k in ``shots``, nested; a class with fewer than k images is an error."""
    rng = generator(seed, "shots")
    classes = _by_class(sorted(train, key=lambda it: it.key))
    short = [f"class {c} ({len(v)})" for c, v in classes.items() if len(v) < max(shots)]
    if short:
        raise DataError(f"{max(shots)}-shot needs {max(shots)} training images per class; too few in "
                        f"{', '.join(short[:3])}")
    perm = {c: [v[i] for i in rng.permutation(len(v))] for c, v in sorted(classes.items())}
    return {k: [it for c in sorted(perm) for it in perm[c][:k]] for k in shots}


def prepare_fgvc(names: list[str], out: Path, root: Path, shots: tuple[int, ...] = FGVC_SHOTS,
                 seeds: tuple[int, ...] = FGVC_SEEDS, download: bool = False, say=print) -> list[Path]:
    """Write ``out/<dataset>/{images/..., annotations/...}`` for each dataset; returns the dataset folders."""
    from ...io import write_json, write_text

    datasets = [dataset_for(n) for n in names]
    bad = [str(k) for k in shots if k not in FGVC_SHOTS] + [f"seed {s}" for s in seeds if s not in FGVC_SEEDS]
    if bad:
        raise ConfigError(f"few-shot lists: {', '.join(bad)} not offered (shots {FGVC_SHOTS}, seeds {FGVC_SEEDS}, "
                          f"the names read_fgvc and the papers use)")
    folders = []
    for name in datasets:
        folder = out / name
        say(f"{name}: reading under {root}")
        pool = order(READERS[name](root, download), seed=0)
        if "all" in pool:  # CoOp's 50 / 20 / 30 of every class
            pool = dict(zip(("train", "val", "test"), split_per_class(pool["all"], (0.5, 0.2, 0.3))))
            held_out = "50 / 20 / 30% of each class of all images"
        elif "val" not in pool:
            val, train = split_per_class(pool["train"], (VAL_FRACTION, 1 - VAL_FRACTION))
            pool = {**pool, "train": train, "val": val}
            held_out = f"{VAL_FRACTION:.0%} of each class of the official train as val"
        else:
            held_out = "official"
        train, val = pool["train"], pool["val"]
        lists: dict[str, list[Item]] = {"val_meta.list": val, "test_meta.list": pool["test"]}
        for seed in seeds:
            for k, items in draw_shots(train, shots, seed).items():
                lists[f"train_meta.list.num_shot_{k}.seed_{seed}"] = items
        unique = {it.key: it for items in lists.values() for it in items}
        for it in unique.values():
            if not (folder / "images" / it.key).is_file():
                place(it, folder / "images" / it.key)
        for fname, items in lists.items():
            write_text(folder / "annotations" / fname, "".join(f"images/{it.key} {it.label}\n" for it in items))
        write_json(folder / "annotations" / "manifest.json", {
            "dataset": name, "root": str(root.resolve()), "shots": list(shots), "seeds": list(seeds),
            "splits": held_out,
            "sizes": {f: len(v) for f, v in lists.items()}})
        say(f"{name}: {len(pool['test'])} test, {len(lists['val_meta.list'])} val, shots {list(shots)} x seeds "
            f"{list(seeds)} -> {folder}")
        folders.append(folder)
    return folders

