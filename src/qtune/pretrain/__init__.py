"""Formula-driven pre-training of the demo backbone: FractalDB-style images and a resumable training loop."""

from typing import Any

from qtune.pretrain.fractal import FractalDataset, render, render_batch, render_dataset, sample_classes, sample_ifs

__all__ = [
    "FractalDataset",
    "PretrainConfig",
    "measure_throughput",
    "pretrain",
    "render",
    "render_batch",
    "render_dataset",
    "sample_classes",
    "sample_ifs",
]


def __getattr__(name: str) -> Any:
    # train.py is imported lazily so that `python -m qtune.pretrain.train` does not import it twice
    if name in ("PretrainConfig", "measure_throughput", "pretrain"):
        from qtune.pretrain import train

        return getattr(train, name)
    raise AttributeError(f"module 'qtune.pretrain' has no attribute {name!r}")
