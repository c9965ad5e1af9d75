"""The method registry: a method class by its lowercase name; ``<stream>+<side>`` combinations built on request."""
from __future__ import annotations

from typing import Any

from ..backbones import Backbone
from ..errors import ConfigError
from .base import Method, MethodConfig

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its lowercase ``name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``; ``<stream>+<side>`` builds a combination on request."""
    key = name.lower()
    if key in _REGISTRY:
        return _REGISTRY[key]
    if "+" in key:
        return _combination(key)
    raise ConfigError(f"unknown method {name!r} (choose from {', '.join(method_names())})")


_COMBINATIONS: dict[str, type[Method]] = {}


def _combination(key: str) -> type[Method]:
    from .combined import combination

    parts = key.split("+")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"method {key!r}: a combination is <stream method>+<side-path method>, e.g. vpt_deep+synqt")
    if key not in _COMBINATIONS:
        _COMBINATIONS[key] = combination(get_method(parts[0]), get_method(parts[1]))
    return _COMBINATIONS[key]


def create_method(name: str, backbone: Backbone, num_classes: int,
                  config: MethodConfig | dict[str, Any] | list[str] | None = None) -> Method:
    """Build method ``name`` for ``backbone``; ``config`` is a config object, a dict, or ``key=value`` strings."""
    cls = get_method(name).for_backbone(backbone)
    if config is None:
        config = cls.config_class()
    elif isinstance(config, dict):
        config = cls.config_class.from_dict(config)
    elif isinstance(config, list):
        config = cls.config_class.from_strings(config)
    elif not isinstance(config, cls.config_class):
        raise ConfigError(f"method {name!r} expects a {cls.config_class.__name__}, got {type(config).__name__}")
    return cls(config, backbone, num_classes)
