"""Cache test data: a small VTAB-1k style list-file dataset (one root, several splits) and caches built from it."""
from __future__ import annotations

import shutil
from pathlib import Path


from qtune.cache import build_cache, read_listings
from qtune.data import read_split
from tests.conftest import TINY, TINY_NAME, tiny_backbone

BATCH, CHUNK = 16, 32  # 80 images: chunks of rows 0-31, 32-63, 64-79


def make_vtab(dst: Path, shapes: Path) -> Path:
    """images/ + train.txt (48), val.txt (16), trainval.txt (both) and test.txt (16), `relative/path label` lines."""
    (dst / "images").mkdir(parents=True)
    train = read_split(shapes / "train").samples
    test = read_split(shapes / "test").samples
    picks = {"train": train[::3][:48], "val": train[1::10][:16], "test": test[::5][:16]}
    lines: dict[str, list[str]] = {}
    for split, samples in picks.items():
        src_root = shapes / ("test" if split == "test" else "train")
        lines[split] = []
        for rel, label in samples:
            name = f"images/{split}_{Path(rel).stem}_{label}.png"
            shutil.copy2(src_root / rel, dst / name)
            lines[split].append(f"{name} {label}")
    lines["trainval"] = lines["train"] + lines["val"]
    for split, rows in lines.items():
        (dst / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return dst


def build(out: Path, data: Path, dtype: str = "fp32", **kw):
    """A cache of trainval + test, as `qtune cache build` makes it (backbone_source lets verify reload it)."""
    source = {"name": TINY_NAME, "weights": None, "pretrained": False, "model_args": TINY, "preprocessing": {},
              "init_seed": 0}
    kw = {"batch_size": BATCH, "chunk_rows": CHUNK, "progress": False, "backbone_source": source, **kw}
    backbone = kw.pop("backbone", None) or tiny_backbone()
    return build_cache(out, backbone, read_listings([data / "trainval.txt", data / "test.txt"]), dtype=dtype, **kw)
