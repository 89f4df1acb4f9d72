"""The one registry type: detectors, training methods, suites and architectures are each a :class:`Registry`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(dict[str, T], Generic[T]):
    """Names of one ``kind`` of plugin to what builds it: registering a taken name is refused, an unknown one is a
    one-line error that lists the names (a plain dict otherwise, so tests can swap an entry in)."""

    def __init__(self, kind: str, items: dict[str, T] | None = None) -> None:
        super().__init__()
        self.kind = kind
        for name, item in (items or {}).items():
            self.add(name, item)

    def add(self, name: str, item: T) -> T:
        """Register ``item`` as ``name``; a name registered twice (to something else) is refused."""
        if name in self and self[name] is not item:
            raise ValueError(f"{self.kind} name {name!r} is registered twice")
        self[name] = item
        return item

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""
        return lambda item: self.add(name, item)

    def get_named(self, name: str) -> T:
        """The entry ``name``, or a ValueError naming every available one."""
        if not isinstance(name, str) or name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        return self[name]

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self)
