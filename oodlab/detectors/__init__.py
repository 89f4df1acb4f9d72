"""Post-hoc OOD detectors, one module per family, all registered by name in :data:`REGISTRY`.

Every module in this package is a plugin imported here, so a new method needs only its own module
(helpers they share live elsewhere, e.g. :mod:`oodlab.features.stats`).
"""

import importlib
import pkgutil

from .base import (REGISTRY, Detector, ExportError, NotFittedError, available, create, energy, fit_data, fit_detector,
                   fit_with_model, load_detector, register, score_with_model)

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["REGISTRY", "Detector", "ExportError", "NotFittedError", "available", "create", "energy", "fit_data", "fit_detector",
           "fit_with_model", "load_detector", "register", "score_with_model"]
