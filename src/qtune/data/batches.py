"""Batches in a given sample order: what every loop reads (``Batches``), and its live source, decoded images (a
TapCache's ``CachedBatches`` is the other)."""
from __future__ import annotations

from typing import Any, Iterator, Protocol

import torch
from torch.utils.data import DataLoader, Dataset


class Batches(Protocol):
    """A source of (inputs, labels) batches in a given sample order, and how a model consumes them."""

    def __len__(self) -> int: ...

    def iterate(self, order: list[int], batch_size: int, device: torch.device) -> Iterator[tuple[Any, torch.Tensor]]:
        ...

    def forward(self, model: Any, inputs: Any) -> torch.Tensor: ...


def batch_indices(order: list[int], batch_size: int) -> list[list[int]]:
    """The sample indices of each batch of an epoch, as ``Batches.iterate`` cuts them."""
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


class ImageBatches:
    """Decoded images from a dataset; the model traces (or runs) the backbone on them."""

    def __init__(self, dataset: Dataset, num_workers: int = 0):
        self.dataset = dataset
        self.num_workers = num_workers

    def __len__(self) -> int:
        return len(self.dataset)

    def labels(self) -> list[int]:
        return self.dataset.listing.labels

    def iterate(self, order: list[int], batch_size: int, device: torch.device) -> Iterator[tuple[Any, torch.Tensor]]:
        chunks = batch_indices(order, batch_size)
        # A private generator: iterating a DataLoader otherwise draws from the global RNG that dropout uses, and
        # training would then depend on the batch source (live images vs a cache). No augmentation: nothing random.
        loader = DataLoader(self.dataset, batch_sampler=chunks, num_workers=self.num_workers,
                            pin_memory=device.type == "cuda", generator=torch.Generator())
        for images, labels, _ in loader:
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)

    def forward(self, model: Any, inputs: torch.Tensor) -> torch.Tensor:
        return model(inputs)


__all__ = ["Batches", "ImageBatches", "batch_indices"]
