"""qtune: memory-efficient transfer learning for frozen vision backbones (SynQT, VQT, GateVPT and the baselines).

Kept free of heavy imports, so that ``qtune --help`` and ``--version`` answer at once.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("qtune")
except PackageNotFoundError:  # run from a source tree that is not installed
    __version__ = "0+unknown"
