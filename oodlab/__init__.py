"""oodlab: out-of-distribution detection for PyTorch classifiers.

Higher scores mean more in-distribution everywhere; ID is the positive class in every metric.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("oodlab")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

from .features import Features, FeatureCache, extract
from .guard import Guard
from .metrics import evaluate
from .specs import RunSpec

__all__ = ["Features", "FeatureCache", "Guard", "RunSpec", "evaluate", "extract", "openood_table", "__version__"]


def __getattr__(name: str):
    if name == "openood_table":  # imported on first use: the bench and its report are heavier than the core
        from .bench.api import openood_table

        return openood_table
    raise AttributeError(f"module 'oodlab' has no attribute {name!r}")
