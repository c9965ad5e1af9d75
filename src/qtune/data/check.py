"""`qtune data check`: verify a dataset before training on it, and say what it holds."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..errors import DataError
from .benchmarks import is_vtab_folder, read_fgvc, read_vtab
from .datasets import Listing, _first, read_split

SPLIT_FOLDERS = ("train", "val", "test")
MAX_CLASSES_SHOWN = 20


@dataclass
class CheckReport:
    path: Path
    layout: str
    classes: tuple[str, ...]
    splits: dict[str, int] = field(default_factory=dict)
    per_class: dict[str, Counter] = field(default_factory=dict)  # split -> label index -> images
    sizes: Counter = field(default_factory=Counter)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def lines(self) -> list[str]:
        out = [f"{self.path}: {self.layout}, {self.num_classes} classes"]
        out += [f"  {name:<16} {n:>7} images" for name, n in self.splits.items()]
        widths = {n: max(7, len(n)) for n in self.splits}
        out.append("  per class:     " + "".join(f" {n:>{w}}" for n, w in widths.items()))
        for k, c in enumerate(self.classes[:MAX_CLASSES_SHOWN]):
            out.append(f"    {c[:12]:<12}" + "".join(f" {self.per_class[n][k]:>{w}}" for n, w in widths.items()))
        if self.num_classes > MAX_CLASSES_SHOWN:
            out.append(f"    ... and {self.num_classes - MAX_CLASSES_SHOWN} more classes")
        common = ", ".join(f"{w}x{h} ({n})" for (w, h), n in self.sizes.most_common(3))
        out.append(f"  image sizes: {common}" + (f" and {len(self.sizes) - 3} more" if len(self.sizes) > 3 else ""))
        return out


def _splits(path: Path) -> tuple[str, dict[str, Listing]]:
    if is_vtab_folder(path):
        return "VTAB-1k task", read_vtab(path)
    if path.is_dir() and path.name == "annotations" or (path / "annotations").is_dir():
        ann = path if path.name == "annotations" else path / "annotations"
        return "few-shot FGVC lists", read_fgvc(ann)
    present = [s for s in SPLIT_FOLDERS if (path / s).is_dir()]
    if path.is_dir() and "train" in present:  # a parent of split folders, not one folder of classes
        train = read_split(path / "train")
        return (f"split folders ({', '.join(present)}), each an image folder",
                {"train": train, **{s: read_split(path / s, classes=train.classes, num_classes=len(train.classes))
                                    for s in present if s != "train"}})
    return ("list file" if path.is_file() else "image folder"), {"all": read_split(path)}


def check_dataset(path: str | Path) -> CheckReport:
    """Read every split and decode every image once; raise DataError listing the first offenders and their count."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: data path not found")
    layout, splits = _splits(path)
    report = CheckReport(path, layout, tuple(next(iter(splits.values())).classes))
    unreadable: list[str] = []
    seen: set[Path] = set()
    for name, listing in splits.items():
        report.splits[name] = len(listing.samples)
        report.per_class[name] = Counter(label for _, label in listing.samples)
        for rel, _ in listing.samples:
            file = listing.root / rel
            if file in seen:
                continue
            seen.add(file)
            try:
                with Image.open(file) as im:
                    im.load()
                    report.sizes[im.size] += 1
            except Exception:  # noqa: BLE001 - any decoder failure makes the image unusable
                unreadable.append(str(file))
    if unreadable:
        raise DataError(f"{len(unreadable)} unreadable image(s): {_first(unreadable)}")
    return report
