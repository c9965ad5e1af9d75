"""Image datasets from the layouts users have: a folder per class, or a list of ``relative/path label`` lines.

Every item carries a stable sample id (its path relative to the dataset root) so caches can index by it.
"""
from __future__ import annotations

import csv
import json
import posixpath
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
LIST_SUFFIXES = (".txt", ".json", ".csv")


def _first(items: Sequence[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" (and {len(items) - n} more)" if len(items) > n else "")


@dataclass(frozen=True)
class Listing:
    """A split: root folder, (relative path, label) pairs and class names. Cheap; no image is opened."""

    root: Path
    samples: tuple[tuple[str, int], ...]
    classes: tuple[str, ...]
    source: Path

    @property
    def sample_ids(self) -> list[str]:
        return [p for p, _ in self.samples]

    @property
    def labels(self) -> list[int]:
        return [y for _, y in self.samples]

    def select(self, keep: Sequence[bool]) -> Listing:
        """The samples where ``keep`` is true, in order."""
        return replace(self, samples=tuple(s for s, k in zip(self.samples, keep, strict=True) if k))

    def check_files(self) -> None:
        """Every listed file exists; names the first missing ones and their count."""
        missing = [p for p, _ in self.samples if not (self.root / p).is_file()]
        if missing:
            raise DataError(f"{self.source}: {len(missing)} listed image(s) missing under {self.root}: {_first(missing)}")


def read_image_folder(path: Path, classes: Sequence[str] | None = None) -> Listing:
    """One sub-folder per class; class order is sorted folder names unless ``classes`` (from train) is given."""
    if not path.is_dir():
        raise DataError(f"{path}: dataset folder not found")
    found = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes is None:
        classes = found
    unknown = [c for c in found if c not in classes]
    if unknown:
        raise DataError(f"{path}: class folder(s) not among the training classes: {_first(unknown)}")
    index = {c: i for i, c in enumerate(classes)}
    per_class = {c: [f for f in sorted((path / c).rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()]
                 for c in found}
    if not any(per_class.values()):
        raise DataError(f"{path}: no images found (expected one sub-folder of images per class)")
    # An empty class folder would silently become a class without samples (or, in training, a head that never
    # learns it): almost always a copy that went wrong, or images of a kind not read.
    empty = [c for c, files in per_class.items() if not files]
    if empty:
        raise DataError(f"{path}: {len(empty)} class folder(s) without images ({', '.join(IMAGE_SUFFIXES)}): "
                        f"{_first(empty)}")
    samples = tuple((f.relative_to(path).as_posix(), index[c]) for c in found for f in per_class[c])
    return Listing(path, samples, tuple(classes), path)


def _read_text(path: Path) -> str:
    """A list file's text: UTF-8, a leading byte-order mark dropped (it would be read as part of the first path)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x}); save the list as UTF-8") from None


def _parse_list(path: Path) -> list[tuple[str, str, int]]:
    """(relative path, raw label, line number) triples from a .txt / .json / .csv list."""
    text = _read_text(path)
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise DataError(f"{path}: expected a JSON object of {{\"relative/path\": label}}")
        return [(str(k), str(v), i + 1) for i, (k, v) in enumerate(data.items())]
    if path.suffix == ".csv":
        rows = list(csv.reader(text.splitlines()))
        if rows and rows[0] and not rows[0][-1].strip().lstrip("-").isdigit():
            rows = rows[1:]  # header
            offset = 2
        else:
            offset = 1
        out = []
        for i, row in enumerate(rows):
            if len(row) < 2:
                raise DataError(f"{path}:{i + offset}: expected 'path,label', got {','.join(row)!r}")
            out.append((row[0].strip(), row[1].strip(), i + offset))
        return out
    out = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise DataError(f"{path}:{i + 1}: expected 'relative/path label', got {line.strip()!r}")
        out.append((parts[0], parts[1], i + 1))
    return out


def read_list_file(path: Path, root: Path | None = None, num_classes: int | None = None) -> Listing:
    """A list of ``relative/path label`` lines (.txt), ``{"path": label}`` (.json) or ``path,label`` rows (.csv).

    Paths are relative to ``root``, by default the list file's folder (the VTAB-1k layout). Without
    ``num_classes`` the labels must be exactly 0..K-1, each used: the class count is not guessed from the largest
    label, where one typo would make a head of 1,000 classes. An image listed twice with two labels is an error.
    """
    if not path.is_file():
        raise DataError(f"{path}: list file not found")
    root = root or path.parent
    samples, lines, offenders = [], [], []
    first_seen: dict[str, tuple[int, int]] = {}  # normalised path -> (label, line)
    for rel, raw, line in _parse_list(path):
        try:
            label = int(raw)
        except ValueError:
            raise DataError(f"{path}:{line}: label {raw!r} is not an integer") from None
        if label < 0 or (num_classes is not None and label >= num_classes):
            offenders.append(f"{path}:{line}: label {label}")
        before = first_seen.setdefault(posixpath.normpath(rel), (label, line))
        if before[0] != label:
            raise DataError(f"{path}:{line}: {rel} has label {label}, but label {before[0]} on line {before[1]}")
        samples.append((rel, label))
        lines.append(line)
    if offenders:
        bound = f"0..{num_classes - 1}" if num_classes is not None else ">= 0"
        raise DataError(f"{len(offenders)} label(s) out of range ({bound}): {_first(offenders)}")
    if not samples:
        raise DataError(f"{path}: empty list, no samples")
    if num_classes is None:
        used = {y for _, y in samples}
        gap = min(set(range(len(used) + 1)) - used)  # the smallest label no sample has
        if gap < max(used):
            above = [(ln, y) for ln, (_, y) in zip(lines, samples) if y > gap]
            raise DataError(f"{path}:{above[0][0]}: label {above[0][1]}, but no sample has label {gap} "
                            f"({len(above)} sample(s) above it): labels must be 0..K-1 with every class used; "
                            f"give the class count (--num-classes) if some classes have no sample")
        num_classes = max(used) + 1
    return Listing(root, tuple(samples), tuple(str(i) for i in range(num_classes)), path)


def read_split(path: str | Path, classes: Sequence[str] | None = None, num_classes: int | None = None,
               root: Path | None = None) -> Listing:
    """A split given as an image folder or a list file."""
    path = Path(path)
    if path.suffix.lower() in LIST_SUFFIXES:
        listing = read_list_file(path, root, num_classes if num_classes is not None else
                                 (len(classes) if classes is not None else None))
        listing.check_files()
        return listing
    if not path.exists():
        raise DataError(f"{path}: data path not found")
    if path.is_file():
        raise DataError(f"{path}: expected an image folder or a list file ({', '.join(LIST_SUFFIXES)})")
    listing = read_image_folder(path, classes)
    if num_classes is not None and len(listing.classes) != num_classes:
        raise DataError(f"{path}: {len(listing.classes)} class folders, but {num_classes} classes expected")
    return listing


def load_image(path: Path) -> Image.Image:
    """Open an image as RGB, naming the file when it cannot be read."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read image ({type(e).__name__})") from None


UNREADABLE = -1  # the label of an image that could not be read, where a dataset skips such images


class ImageDataset(Dataset):
    """Items are (image tensor, label, index); ``sample_ids[index]`` is the stable id.

    With ``skip_unreadable``, an image that cannot be read comes as a blank one labelled UNREADABLE (the reason in
    ``unreadable``, in this process), so that serving a folder of many images is not ended by one bad file.
    """

    def __init__(self, listing: Listing, transform: Callable[[Image.Image], torch.Tensor],
                 skip_unreadable: bool = False):
        self.listing = listing
        self.transform = transform
        self.skip_unreadable = skip_unreadable
        self.unreadable: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.listing.samples)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.listing.classes

    @property
    def sample_ids(self) -> list[str]:
        return self.listing.sample_ids

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        rel, label = self.listing.samples[index]
        try:
            image = load_image(self.listing.root / rel)
        except DataError as e:
            if not self.skip_unreadable:
                raise
            self.unreadable[index] = str(e)
            return self.transform(Image.new("RGB", (1, 1))), UNREADABLE, index
        return self.transform(image), label, index
