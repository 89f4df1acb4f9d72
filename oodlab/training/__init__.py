"""Training: one shared loop (:mod:`.loop`) and one objective per method, registered by name.

Every module in this package is imported here, so a method needs only its own module with an
``@register_objective``-decorated factory.
"""

import importlib
import pkgutil
from collections.abc import Callable

from .loop import Objective, TrainConfig, train

OBJECTIVES: dict[str, Callable[..., Objective]] = {}


def register_objective(name: str) -> Callable[[Callable[..., Objective]], Callable[..., Objective]]:
    """Register a factory ``f(model=..., suite=..., **options) -> Objective`` under ``name``."""

    def deco(factory: Callable[..., Objective]) -> Callable[..., Objective]:
        if name in OBJECTIVES:
            raise ValueError(f"training method {name!r} is registered twice")
        OBJECTIVES[name] = factory
        return factory

    return deco


for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in ("loop", "recipes"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["OBJECTIVES", "Objective", "TrainConfig", "register_objective", "train"]
