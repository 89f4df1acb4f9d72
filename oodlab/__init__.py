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

__all__ = ["Features", "FeatureCache", "Guard", "evaluate", "extract", "__version__"]
