"""The method contract: a config dataclass plus a module holding only the trainable part."""
from __future__ import annotations

import contextlib
import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import nn

from ..backbones import Backbone, Point, Taps
from ..errors import ConfigError
from ..options import option_pairs


@dataclass
class MethodConfig:
    """Base of every method's config. Fields carry ``metadata={"help": ...}``; ``__post_init__`` validates.

    A field marked ``"init": True`` only sets the initial value of a trainable tensor, so models that differ in it
    alone have the same structure and train together in one stack (``engine.many``).
    """

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError on an out-of-range value."""

    def live_only(self) -> str | None:
        """Why a side-path model of these options must trace the frozen stream live while it trains, in words (a
        cache's note says it); None when a cache can serve it."""
        return None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def structure(self) -> dict[str, Any]:
        """The options that shape the module (all but the ``init`` ones)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata.get("init")}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MethodConfig":
        """The one way in for options: JSON values are type-checked, strings (from a command line) converted."""
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown option(s) {', '.join(unknown)} (known: {', '.join(names)})")
        return cls(**{k: _typed(v, hints[k], k) for k, v in d.items()})

    @classmethod
    def from_strings(cls, pairs: list[str]) -> "MethodConfig":
        """Parse ``key=value`` strings, converting each value to its field's type."""
        return cls.from_dict(option_pairs(pairs, cls.__name__))


def _typed(value: Any, hint: Any, key: str) -> Any:
    """``value`` as a ``hint``: a string is converted; anything else must already be of that type."""
    if isinstance(value, str):
        return _convert(value, hint, key)
    args = typing.get_args(hint)
    if value is None and type(None) in args:
        return None
    kinds = tuple(a for a in args if a is not type(None)) or (hint,)
    for kind in kinds:
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = not isinstance(kind, type) or isinstance(value, kind)
        if ok:
            return float(value) if kind is float else value
    names = "/".join(getattr(k, "__name__", str(k)) for k in kinds)
    raise ConfigError(f"option {key}: {value!r} is not a valid {names}")


def _convert(raw: str, hint: Any, key: str) -> Any:
    args = typing.get_args(hint)
    if len(args) == 2 and type(None) in args:  # an optional option, e.g. ``int | None``: "none" unsets it
        if raw.lower() in ("none", "null"):
            return None
        hint = next(a for a in args if a is not type(None))
    try:
        if hint is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if hint in (int, float, str):
            return hint(raw)
    except ValueError:
        raise ConfigError(f"option {key}: {raw!r} is not a valid {hint.__name__}") from None
    raise ConfigError(f"option {key}: cannot be set from the command line")


def positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    """Shared range check for counts and widths."""
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'} (got {value})")


def probability(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{name} must be in [0, 1) (got {value})")


def feature_ids(ids: list[int] | None) -> None:
    """The head input dimensions kept by feature selection (``engine/compress.py``): distinct, non-negative."""
    if ids is not None and (not ids or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids)
                            or len(set(ids)) != len(ids)):
        raise ConfigError("feature_ids must be distinct non-negative whole numbers (or unset)")


def block_count(name: str, value: int | None) -> None:
    """Range check for an optional number of blocks, before the backbone's depth is known."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{name} must be a whole number of blocks >= 1 (got {value!r})")


def first_trainable_block(trainable_blocks: int | None, depth: int) -> int:
    """The lowest block holding trainable structures when only the top ``trainable_blocks`` blocks train.

    The memory-constrained variants of the SynQT paper (Table 3): the blocks below run without autograd.
    """
    if trainable_blocks is None:
        return 0
    if not 1 <= trainable_blocks <= depth:
        raise ConfigError(f"trainable_blocks must be in 1..{depth} for this {depth}-block backbone "
                          f"(got {trainable_blocks})")
    return depth - trainable_blocks


class Method(nn.Module):
    """The trainable part of a tuned model.

    Side-path methods (``reads_taps = True``) compute logits from Taps and the frozen block weights:
    ``forward(taps, backbone)``; they never see images, so they train from live traces and caches alike.
    Stream methods compute ``forward(images, backbone)`` after ``attach`` has made parts of the backbone trainable.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    reads_taps: ClassVar[bool] = True
    # Device types on which G models of this side-path method train faster as one stack (engine.many) than one
    # after another; not where torch.func.vmap has no batching rule for an op the method runs and loops anyway.
    stacks_on: ClassVar[tuple[str, ...]] = ("cpu", "cuda")
    summary: ClassVar[str] = ""

    def __init__(self, config: MethodConfig, backbone: Backbone, num_classes: int):
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1 (got {num_classes})")
        self.config = config
        self.num_classes = num_classes

    @classmethod
    def live_only(cls, options: dict[str, Any]) -> str | None:
        """``MethodConfig.live_only`` of ``options``: why models of them trace live while training, never from a
        cache (None: a cache can serve them). A sweep neither caches for nor stacks such trials."""
        return cls.config_class.from_dict(options).live_only()

    @classmethod
    def for_backbone(cls, backbone: Backbone) -> type["Method"]:
        """The class that implements this method on ``backbone`` (a method may need another design on Swin or
        ConvNeXt)."""
        return cls

    def blocks_read(self, backbone: Backbone) -> tuple[int, ...]:
        """Backbone blocks whose K/V this side-path method reads (the trace and the cache keep only these)."""
        return tuple(range(backbone.depth))

    def points_read(self, backbone: Backbone) -> tuple[Point, ...]:
        """Block points (``backbones.points``) this side-path method reads beyond K/V; the trace keeps these too."""
        return ()

    def trace(self, backbone: Backbone, images: torch.Tensor) -> Taps:
        """The live trace this side-path method reads of ``images``: K/V of its blocks and its points."""
        return backbone.trace(images, self.blocks_read(backbone), self.points_read(backbone))

    def live_blocks(self, backbone: Backbone) -> tuple[int, ...]:
        """Frozen blocks a side-path method runs again, live and with backward, on a stream it changed (DTL)."""
        return ()

    def classifier(self) -> nn.Linear | None:
        """The final linear layer: its input is the feature the head reads (t-SNE plots show it)."""
        return None

    def attach(self, backbone: Backbone) -> None:
        """Stream methods make their part of the backbone trainable here; side-path methods leave it frozen."""

    def forward(self, inputs: Taps | torch.Tensor, backbone: Backbone) -> torch.Tensor:
        raise NotImplementedError


@contextlib.contextmanager
def inputs_of(module: nn.Module, read: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
              ) -> Iterator[list[torch.Tensor]]:
    """``read`` of the first input of every call of ``module`` inside the block, in call order (a forward pre-hook,
    removed on exit): what a method's classifier reads, for feature selection and plots."""
    got: list[torch.Tensor] = []
    hook = module.register_forward_pre_hook(lambda _m, args: got.append(read(args[0])))
    try:
        yield got
    finally:
        hook.remove()
