"""`qtune data check`: verify a dataset before training on it, and say what it holds."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..errors import DataError
from .benchmarks import is_vtab_folder, read_fgvc, read_vtab
from .datasets import Listing, _first, read_split


@dataclass
class CheckReport:
    path: Path
    layout: str
    num_classes: int
    splits: dict[str, int] = field(default_factory=dict)
    sizes: Counter = field(default_factory=Counter)

    def lines(self) -> list[str]:
        out = [f"{self.path}: {self.layout}, {self.num_classes} classes"]
        out += [f"  {name:<16} {n:>7} images" for name, n in self.splits.items()]
        common = ", ".join(f"{w}x{h} ({n})" for (w, h), n in self.sizes.most_common(3))
        out.append(f"  image sizes: {common}" + (f" and {len(self.sizes) - 3} more" if len(self.sizes) > 3 else ""))
        return out


def _splits(path: Path) -> tuple[str, dict[str, Listing]]:
    if is_vtab_folder(path):
        return "VTAB-1k task", read_vtab(path)
    if path.is_dir() and path.name == "annotations" or (path / "annotations").is_dir():
        ann = path if path.name == "annotations" else path / "annotations"
        return "few-shot FGVC lists", read_fgvc(ann)
    return ("list file" if path.is_file() else "image folder"), {"all": read_split(path)}


def check_dataset(path: str | Path) -> CheckReport:
    """Read every split and decode every image once; raise DataError listing the first offenders and their count."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: data path not found")
    layout, splits = _splits(path)
    report = CheckReport(path, layout, len(next(iter(splits.values())).classes))
    unreadable: list[str] = []
    seen: set[Path] = set()
    for name, listing in splits.items():
        report.splits[name] = len(listing.samples)
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
