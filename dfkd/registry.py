"""One small registry class; every pluggable part (classifiers, generators, losses, ...) uses it."""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

from dfkd.errors import DfkdError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> factory. A typo is an error that lists the known names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items))
            raise DfkdError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
