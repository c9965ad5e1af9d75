"""Image preprocessing: input size, interpolation and mean/std, resolved from the weights' pretrained config."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from torchvision import transforms as T

from .errors import ConfigError

_INTERPOLATIONS = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
}


@dataclass(frozen=True)
class Preprocessing:
    """Resize straight to ``input_size`` (no crop: the VTAB-1k protocol), then normalise."""

    input_size: tuple[int, int]
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if self.interpolation not in _INTERPOLATIONS:
            raise ConfigError(f"interpolation {self.interpolation!r}: choose one of {sorted(_INTERPOLATIONS)}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ConfigError(f"mean/std must be three numbers each, std > 0 (got mean={self.mean}, std={self.std})")
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)):
            raise ConfigError(f"mean/std must be finite (got mean={self.mean}, std={self.std})")
        if len(self.input_size) != 2 or any(not isinstance(n, int) or n < 1 for n in self.input_size):
            raise ConfigError(f"input size must be whole numbers >= 1 (got {self.input_size})")

    @classmethod
    def from_timm(cls, data_config: dict[str, Any]) -> "Preprocessing":
        _, h, w = data_config["input_size"]
        interp = data_config.get("interpolation", "bicubic")
        return cls((int(h), int(w)), interp if interp in _INTERPOLATIONS else "bicubic",
                   tuple(float(m) for m in data_config["mean"]), tuple(float(s) for s in data_config["std"]))

    def override(self, **changes: Any) -> "Preprocessing":
        """A copy with the given non-None fields replaced."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if isinstance(changes.get("input_size"), int):
            changes["input_size"] = (changes["input_size"],) * 2
        for key in ("input_size", "mean", "std"):
            if key in changes:
                changes[key] = tuple(changes[key])
        return replace(self, **changes)

    def transform(self) -> T.Compose:
        return T.Compose([
            T.Resize(self.input_size, interpolation=_INTERPOLATIONS[self.interpolation], antialias=True),
            T.ToTensor(),
            T.Normalize(self.mean, self.std),
        ])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        return cls(tuple(d["input_size"]), d["interpolation"], tuple(d["mean"]), tuple(d["std"]))
