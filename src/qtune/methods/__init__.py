"""Methods, registered by name. Each module holds one method: a config dataclass and its trainable module."""
from .side import dtl, head2toe, linear, lst, synqt, vqt  # noqa: F401 (importing registers them)
from .stream import adapter, adaptformer, bitfit, fact, full, gatevpt, lora, vpt  # noqa: F401
from .base import Method, MethodConfig
from .combined import Combined, register_combinations
from .registry import create_method, get_method, method_names, register

register_combinations()

__all__ = ["Combined", "Method", "MethodConfig", "create_method", "get_method", "method_names", "register"]
