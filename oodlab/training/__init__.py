"""Training: one shared loop (:mod:`.loop`) and one objective per method, registered by name.

Every module in this package is imported here, so a method needs only its own module with an
``@register_objective``-decorated factory.
"""

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from typing import Any

from ..registry import Registry
from .loop import Objective, TrainConfig, train

OBJECTIVES: Registry[Callable[..., Objective]] = Registry("training method")


def register_objective(name: str) -> Callable[[Callable[..., Objective]], Callable[..., Objective]]:
    """Register a factory ``f(model=..., suite=..., **options) -> Objective`` under ``name``."""
    return OBJECTIVES.register(name)


def create_objective(method: str, options: dict[str, Any] | None = None, **context: Any) -> Objective:
    """Build the objective registered as ``method`` with ``options``; ``context`` is what every factory gets
    (``model``, ``suite``, ``config``). An option the method does not take is an error, not silently ignored."""
    factory, options = OBJECTIVES.get_named(method), dict(options or {})
    params = inspect.signature(factory).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):  # factories with **options check them themselves
        takes = sorted(set(params) - set(context))
        if unknown := sorted(set(options) - set(takes)):
            raise ValueError(f"training method {method!r} takes no option {', '.join(map(repr, unknown))}; "
                             f"its options: {', '.join(takes) or 'none'}")
    return factory(**context, **options)


for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in ("loop", "recipes"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["OBJECTIVES", "Objective", "TrainConfig", "create_objective", "register_objective", "train"]
