"""One small registry class; every pluggable part (classifiers, generators, losses, ...) uses it."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from dfkd.errors import DfkdError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> factory. A typo is an error that names the closest known name, then all of them.

    `forms` describes names the registry does not hold but its users accept (say, `torchvision.<name>`);
    it is appended to the list of known names in that error."""

    def __init__(self, kind: str, forms: str | None = None):
        self.kind = kind
        self.forms = forms
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str, also: Iterable[str] = ()) -> T:
        """The factory registered as `name`; `also` adds names (of other forms) a typo may be close to."""
        try:
            return self._items[name]
        except KeyError:
            raise DfkdError(self.unknown(name, also)) from None

    def unknown(self, name: str, also: Iterable[str] = ()) -> str:
        """The one-line message for a name that is not registered."""
        close = difflib.get_close_matches(name, [*self._items, *also], n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        forms = f"; or {self.forms}" if self.forms else ""
        return f"unknown {self.kind} {name!r}; {hint}known: {', '.join(sorted(self._items))}{forms}"

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
