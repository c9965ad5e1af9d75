"""The training schedule and device, without importing torch: the command line builds its flags from it."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..precision import check_precision

if TYPE_CHECKING:
    import torch

# The papers use plain momentum SGD; "adam" couples weight decay into the gradient (VQT's), "adamw" decouples it.
OPTIMIZERS = ("adamw", "adam", "sgd")


@dataclass
class TrainConfig:
    epochs: int = field(default=50, metadata={"help": "training epochs"})
    batch_size: int = field(default=64, metadata={"help": "batch size"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw, adam or sgd (momentum)"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=1e-2, metadata={"help": "weight decay (not applied to biases and norms)"})
    decay_all: bool = field(default=False, metadata={
        "help": "decay every trainable tensor, biases and norms too (as the SynQT authors' AdamW does)"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    warmup_epochs: float = field(default=10, metadata={"help": "linear warmup from 0, in epochs"})
    min_lr: float = field(default=1e-6, metadata={"help": "final learning rate of the half-cycle cosine"})
    seed: int = field(default=0, metadata={"help": "seed for initialisation, batch order and dropout"})
    shuffle_seed: int | None = field(default=None, metadata={
        "help": "seed of the batch order alone (default: --seed); models trained together share one"})
    eval_every: int = field(default=0, metadata={"help": "validation accuracy every N epochs (0: never)"})
    precision: str = field(default="fp32", metadata={"help": "fp32, bf16 or fp16 autocast"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, ..."})
    num_workers: int = field(default=0, metadata={"help": "data-loading worker processes"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self) -> None:
        for f in fields(self):  # types first: a sweep spec or a recorded config gives values, not parsed flags
            value = getattr(self, f.name)
            kind = str(f.type).removesuffix(" | None")
            if value is None and str(f.type).endswith("| None"):
                continue
            ok = {"int": isinstance(value, int) and not isinstance(value, bool),
                  "float": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
                  "bool": isinstance(value, bool), "str": isinstance(value, str)}[kind]
            if not ok:
                expected = {"int": "a whole number", "float": "a finite number", "bool": "true or false",
                            "str": "a string"}[kind]
                raise ConfigError(f"{f.name}: expected {expected}, got {value!r}")
        for name, low in (("epochs", 1), ("batch_size", 1), ("eval_every", 0), ("num_workers", 0)):
            if getattr(self, name) < low:
                raise ConfigError(f"{name}: expected a whole number >= {low}, got {getattr(self, name)!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer {self.optimizer!r}: choose from {', '.join(OPTIMIZERS)}")
        check_precision(self.precision)
        if self.lr <= 0:
            raise ConfigError(f"lr: expected a number > 0, got {self.lr!r}")
        for name in ("weight_decay", "warmup_epochs", "min_lr", "momentum"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: expected a number >= 0, got {getattr(self, name)!r}")

    @property
    def order_seed(self) -> int:
        """The seed of the epochs' sample order."""
        return self.seed if self.shuffle_seed is None else self.shuffle_seed

    def resolved_device(self) -> torch.device:
        """The device asked for; "cuda" on a machine without a CUDA GPU is a one-line error, not a traceback."""
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ConfigError(f"device {self.device!r} is not a torch device") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r}: no CUDA GPU is available here (use --device cpu or auto)")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {self.device!r}: only {torch.cuda.device_count()} CUDA GPU(s) here")
        return device

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
