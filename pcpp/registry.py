"""Registries of named components: the quantizer pairs (pcpp.quantizers) and the update rules (pcpp.rules).

One helper for both (timm's `_registry.py` idea): a class registers once under its `name`, is built by
name, and an unknown name raises a ValueError that lists the valid ones, with a "did you mean" when one
is close. Tests loop over `names()`, so a newly registered component is tested the day it is registered.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T", bound=type)


def unknown(kind: str, value, valid: list[str]) -> ValueError:
    """The error for a bad name: `unknown <kind> 'x' (did you mean 'y'?); valid: a, b, c`."""
    close = difflib.get_close_matches(str(value), valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"unknown {kind} {value!r}{hint}; valid: {', '.join(valid) or '(none)'}")


class Registry(Generic[T]):
    """Classes registered by their `name` attribute, in registration order.

    `kind` names what is registered in error messages ("quantizer", "update rule").
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._classes: dict[str, T] = {}

    def register(self, cls: T) -> T:
        """Class decorator: register `cls` under `cls.name`. Raises ValueError for an empty or taken name."""
        name = getattr(cls, "name", "")
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} class needs a non-empty string `name`, {cls.__name__} has {name!r}")
        if name in self._classes:
            raise ValueError(f"{self.kind} {name!r} is already registered (by {self._classes[name].__name__})")
        self._classes[name] = cls
        return cls

    def unregister(self, name: str) -> T:
        """Remove and return the class registered as `name` (tests that register a component of their own)."""
        try:
            return self._classes.pop(name)
        except KeyError:
            raise unknown(self.kind, name, self.names()) from None

    def names(self) -> list[str]:
        return list(self._classes)

    def cls(self, name: str) -> T:
        """The class registered as `name`; ValueError listing the valid names otherwise."""
        try:
            return self._classes[name]
        except (KeyError, TypeError):
            raise unknown(self.kind, name, self.names()) from None

    def build(self, name: str, **params):
        """An instance of the class registered as `name`, built with `params`."""
        return self.cls(name)(**params)

    def __contains__(self, name) -> bool:
        return name in self._classes

    def __iter__(self) -> Iterator[str]:
        return iter(self._classes)

    def __len__(self) -> int:
        return len(self._classes)
