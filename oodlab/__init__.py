"""oodlab: out-of-distribution detection for PyTorch classifiers.

Higher scores mean more in-distribution everywhere; ID is the positive class in every metric.
The names below are imported on first use, so that ``oodlab --help`` does not load torch.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("oodlab")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

_LAZY = {"Features": "features", "FeatureCache": "features", "extract": "features", "Guard": "guard",
         "evaluate": "metrics", "RunSpec": "specs", "openood_table": "bench.api"}

__all__ = ["Features", "FeatureCache", "Guard", "RunSpec", "evaluate", "extract", "openood_table", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'oodlab' has no attribute {name!r}")
