"""Combinations of a stream method with a side path (SynQT paper, Table 5): ``<stream>+<side>``.

The stream method changes X_i; the side path (SynQT, VQT, unchanged) reads the modified stream's K/V live, through
the same ``forward(taps, backbone)`` it uses everywhere else, with gradients flowing into both. The stream part
has no head of its own. Registered: ``vpt_deep+synqt``, ``adaptformer+synqt``, ``vpt_deep+vqt``,
``adaptformer+vqt``; ``vpt_shallow``, ``adapter`` and ``full`` combine the same way on request. Stream methods
whose changes the side path's query computation would not see (LoRA, FacT and BitFit wrap qkv, whose frozen weight
slice the queries use; GateVPT rescales attention) do not combine. No caching: the K/V depend on trainable parameters.
Options go to their part as ``<part>.<option>`` (``vpt_deep.tokens=50``, ``synqt.tokens=4``); an option only one
part has may be given bare.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..backbones import Backbone, Taps
from ..errors import ConfigError
from .base import Method, MethodConfig, _typed
from .stream.core import StreamMethod

REGISTERED = (("vpt_deep", "synqt"), ("adaptformer", "synqt"), ("vpt_deep", "vqt"), ("adaptformer", "vqt"))


@dataclass
class CombinedConfig(MethodConfig):
    """The two parts' configs; keys are ``<part>.<option>`` on the command line and nested dicts in JSON."""

    stream: MethodConfig = field(default_factory=MethodConfig, metadata={"help": "the stream method's options"})
    side: MethodConfig = field(default_factory=MethodConfig, metadata={"help": "the side path's options"})
    parts: ClassVar[tuple[tuple[str, type[MethodConfig]], tuple[str, type[MethodConfig]]]]

    def to_dict(self) -> dict[str, Any]:
        (s_name, _), (q_name, _) = self.parts
        return {s_name: self.stream.to_dict(), q_name: self.side.to_dict()}

    @classmethod
    def _route(cls, items: list[tuple[str, Any]]) -> dict[str, list[tuple[str, Any]]]:
        names = [p for p, _ in cls.parts]
        owners = {p: {f.name for f in dataclasses.fields(c)} for p, c in cls.parts}
        routed: dict[str, list[tuple[str, Any]]] = {p: [] for p in names}
        for key, value in items:
            part, dot, option = key.partition(".")
            if dot and part in routed:
                routed[part].append((option, value))
            elif key in routed and isinstance(value, dict):  # nested, as to_dict writes it
                routed[key] += list(value.items())
            else:
                have = [p for p in names if key in owners[p]]
                if len(have) > 1:
                    raise ConfigError(f"{'+'.join(names)}: option {key!r} is ambiguous "
                                      f"(write {' or '.join(f'{p}.{key}' for p in names)})")
                if not have:
                    raise ConfigError(f"{'+'.join(names)}: unknown option {key!r} (options are "
                                      f"<part>.<option>, parts {', '.join(names)})")
                routed[have[0]].append((key, value))
        return routed

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CombinedConfig":
        routed = cls._route(list(d.items()))
        (s_name, s_cls), (q_name, q_cls) = cls.parts
        return cls(stream=cls._part(s_name, s_cls, routed[s_name]), side=cls._part(q_name, q_cls, routed[q_name]))

    @staticmethod
    def _part(name: str, config_cls: type[MethodConfig], items: list[tuple[str, Any]]) -> MethodConfig:
        """One part's config; an error names the option as given, ``<part>.<option>``."""
        known = [f.name for f in dataclasses.fields(config_cls)]
        unknown = sorted({k for k, _ in items} - set(known))
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(f'{name}.{k}' for k in unknown)} "
                              f"(known: {', '.join(f'{name}.{k}' for k in known)})")
        hints = typing.get_type_hints(config_cls)
        typed = {k: _typed(v, hints[k], f"{name}.{k}") for k, v in items}
        try:
            return config_cls.from_dict(typed)
        except ConfigError as e:
            raise _in_part(name, config_cls, e) from None


def _in_part(name: str, config_cls: type[MethodConfig], e: ConfigError) -> ConfigError:
    """A part's range check, which names its option bare, naming it as given: ``<part>.<option>``."""
    first = str(e).split(" ", 1)[0]
    known = {f.name for f in dataclasses.fields(config_cls)}
    return ConfigError(f"{name}.{e}" if first in known else f"{name}: {e}")


class Combined(Method):
    """A stream method (no head) whose modified stream's K/V feed a side-path method (with its head)."""

    reads_taps = False
    stream_class: ClassVar[type[StreamMethod]]
    side_class: ClassVar[type[Method]]

    def __init__(self, config: CombinedConfig, backbone: Backbone, num_classes: int):
        super().__init__(config, backbone, num_classes)
        (s_name, s_cls), (q_name, q_cls) = config.parts
        try:  # a check against the backbone (trainable_blocks in range, ...) names the part
            self.stream_method = self.stream_class(config.stream, backbone, num_classes, head=False)
        except ConfigError as e:
            raise _in_part(s_name, s_cls, e) from None
        try:
            self.side_method = self.side_class(config.side, backbone, num_classes)
        except ConfigError as e:
            raise _in_part(q_name, q_cls, e) from None
        why = config.side.live_only()
        if why:  # the side path's own live trace is never run here: its K/V come from the stream method's stream
            raise ConfigError(f"{self.name}: {why}, but here the K/V come from the {s_name} stream; use it with "
                              f"{q_name} alone")

    def attach(self, backbone: Backbone) -> None:
        self.stream_method.attach(backbone)
        self.side_method.attach(backbone)

    def forward(self, images: torch.Tensor, backbone: Backbone) -> torch.Tensor:
        blocks = tuple(sorted(self.side_method.blocks_read(backbone)))
        x, keys, values = self.stream_method.stream(images, backbone, keep=blocks)
        taps = Taps(keys, values, self.stream_method.pool(x, backbone), blocks)
        return self.side_method(taps, backbone)


def combination(stream_cls: type[Method], side_cls: type[Method]) -> type[Combined]:
    """The method class ``<stream>+<side>``, after checking that the two parts can combine."""
    name = f"{stream_cls.name}+{side_cls.name}"
    hint = ", ".join("+".join(p) for p in REGISTERED)
    if stream_cls.reads_taps and side_cls.reads_taps:
        raise ConfigError(f"{name}: both are side-path methods; combine one stream method with one side path ({hint})")
    if not stream_cls.reads_taps and not side_cls.reads_taps:
        raise ConfigError(f"{name}: {stream_cls.name} and {side_cls.name} both change the stream and conflict; "
                          f"combine one stream method with one side path ({hint})")
    if stream_cls.reads_taps:
        raise ConfigError(f"{name}: write the stream method first ({side_cls.name}+{stream_cls.name})")
    if not issubclass(stream_cls, StreamMethod) or not stream_cls.combinable or issubclass(side_cls, Combined):
        from .registry import get_method, method_names

        parts = [m for m in method_names() if getattr(get_method(m), "combinable", False)]
        raise ConfigError(f"{name}: {stream_cls.name} does not combine with a side path, whose queries would not see "
                          f"all its changes (stream parts that do: {', '.join(parts)})")

    def part(cls: type[Method]) -> Any:
        return field(default_factory=cls.config_class, metadata={"help": f"{cls.name} options, as {cls.name}.<option>"})

    config_cls = dataclasses.make_dataclass(
        f"{stream_cls.config_class.__name__}With{side_cls.config_class.__name__}",
        [("stream", MethodConfig, part(stream_cls)), ("side", MethodConfig, part(side_cls))], bases=(CombinedConfig,))
    config_cls.parts = ((stream_cls.name, stream_cls.config_class), (side_cls.name, side_cls.config_class))
    return type(f"{stream_cls.__name__}With{side_cls.__name__}", (Combined,), {
        "name": name, "config_class": config_cls, "stream_class": stream_cls, "side_class": side_cls,
        "summary": f"{stream_cls.name} stream; {side_cls.name} side path reads its K/V live",
        "__module__": __name__})


def register_combinations() -> None:
    """Register the combinations of the SynQT paper's Table 5 (others are built on request by name)."""
    from .registry import get_method, register

    for stream, side in REGISTERED:
        register(get_method(f"{stream}+{side}"))
