"""`qtune data check`: verify a dataset before training on it, and say what it holds."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..errors import DataError
from .datasets import Listing, _first, read_split
from .layouts import VTAB_SPLITS, is_vtab_folder, read_fgvc, read_vtab, vtab_task

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
    return inspect_splits(path, *_splits(path))


def inspect_splits(path: Path, layout: str, splits: dict[str, Listing]) -> CheckReport:
    """Count classes, images per split and class, and decode every image once (each file once)."""
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


VTAB_SIZES = {"train800": 800, "val200": 200, "train800val200": 1000}


def vtab_folders(path: Path) -> list[Path]:
    """A VTAB-1k task folder, or every task folder inside a VTAB-1k root."""
    if is_vtab_folder(path):
        return [path]
    found = sorted(p for p in path.iterdir() if is_vtab_folder(p)) if path.is_dir() else []
    if not found:
        raise DataError(f"{path}: neither a VTAB-1k task folder nor a folder of them (no train800.txt/.json)")
    return found


def vtab_problems(task_dir: Path, splits: dict[str, Listing]) -> list[str]:
    """What makes a task folder differ from VTAB-1k: list sizes, the class count, the test size, overlaps."""
    from .prepare.vtab import VTAB_TEST_SIZES

    task = vtab_task(task_dir.name)
    if task is None:
        return [f"{task_dir.name!r} is not a VTAB-1k task name (the folder's name says which task it is)"]
    problems = [f"{name} has {len(splits[name].samples)} images, VTAB-1k has {n}"
                for name, n in VTAB_SIZES.items() if len(splits[name].samples) != n]
    if len(splits["test"].samples) != VTAB_TEST_SIZES[task.name]:
        problems.append(f"test has {len(splits['test'].samples)} images, {task.name}'s test split has "
                        f"{VTAB_TEST_SIZES[task.name]}")
    files = {name: [(listing.root / rel).resolve() for rel, _ in listing.samples] for name, listing in splits.items()}
    if Counter(files["train800val200"]) != Counter(files["train800"] + files["val200"]):
        problems.append("train800val200 is not train800 + val200")
    for a, b in (("train800", "val200"), ("train800", "test"), ("val200", "test")):
        shared = set(files[a]) & set(files[b])
        if shared:
            problems.append(f"{len(shared)} image(s) in both {a} and {b}, e.g. {sorted(shared)[0]}")
    for name in VTAB_SPLITS:
        dupes = [f for f, n in Counter(files[name]).items() if n > 1]
        if dupes:
            problems.append(f"{len(dupes)} image(s) listed twice in {name}, e.g. {dupes[0]}")
    return problems


def check_vtab(path: str | Path) -> list[str]:
    """Validate VTAB-1k task folders from any source (NOAH's archive, the SynQT release, `qtune data vtab`): the
    registry's class count, the 800/200/1000 sizes, the full test size, disjoint splits, every image decodable.
    Returns one line per task; raises DataError naming every task that fails and why."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: data path not found")
    lines, failures = [], []
    for task_dir in vtab_folders(path):
        try:
            splits = read_vtab(task_dir)
            report = inspect_splits(task_dir, "VTAB-1k task", splits)
            problems = vtab_problems(task_dir, splits)
        except DataError as e:
            problems = [str(e)]
        if problems:
            failures.append(f"{task_dir.name}: {'; '.join(problems)}")
            lines.append(f"{task_dir.name}: FAILED: {'; '.join(problems)}")
        else:
            lines.append(f"{task_dir.name}: ok, {report.num_classes} classes, " +
                         ", ".join(f"{n} {k}" for k, n in report.splits.items()))
    if failures:
        raise DataError(f"{len(failures)} of {len(lines)} VTAB-1k task folder(s) fail: " + " | ".join(failures))
    return lines
