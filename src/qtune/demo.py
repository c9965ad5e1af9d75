"""The offline example: generated data, a small random-weight ViT, three methods, one table. Runs anywhere."""
from __future__ import annotations

from pathlib import Path

from .data.synthetic import make_shapes
from .engine.job import BackboneSpec, DataSpec, JobSpec, train_job
from .engine.loop import TrainConfig
from .io import write_json

DEMO_BACKBONE = BackboneSpec("vit_tiny_patch16_224",
                             model_args={"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4})
DEMO_METHODS = ("linear", "vqt", "synqt")


def run_demo(out: Path, quick: bool = False, progress: bool = True) -> list[dict]:
    data = out / "data"
    for split, n, seed in (("train", 40, 0), ("val", 10, 1), ("test", 25, 2)):
        if not (data / split).exists():
            make_shapes(data / split, per_class=n // (2 if quick else 1), seed=seed)
    rows = []
    for method in DEMO_METHODS:
        spec = JobSpec(DEMO_BACKBONE, DataSpec(str(data / "train"), str(data / "val"), str(data / "test")), method,
                       train=TrainConfig(epochs=5 if quick else 20, batch_size=32, warmup_epochs=1, lr=3e-3,
                                         progress=progress), out_dir=str(out / method))
        r = train_job(spec, overwrite=True)
        rows.append({"method": method, "test_accuracy": r["test_accuracy"], "val_accuracy": r["val_accuracy"],
                     "trainable_parameters": r["trainable_parameters"], "train_seconds": r["train_seconds"]})
    print(f"\n{'method':<8} {'test acc':>8} {'val acc':>8} {'trainable':>10} {'seconds':>8}")
    for r in rows:
        print(f"{r['method']:<8} {r['test_accuracy']:>8.3f} {r['val_accuracy']:>8.3f} {r['trainable_parameters']:>10,} "
              f"{r['train_seconds']:>8.1f}")
    write_json(out / "summary.json", rows)
    print(f"\nwritten to {out}")
    return rows
