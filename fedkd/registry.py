"""Name -> component registries (models, fusion methods, sensitivity scorers, ...).

One small class so every kind of component is looked up the same way: unknown names
raise and list the valid ones, and registering a name twice is an error rather than a
silent overwrite.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of components.

    >>> scorers = Registry[Callable]("scorer")
    >>> @scorers.register("zero")
    ... def zero(x):
    ...     return 0
    >>> scorers.get("zero")(1)
    0
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, *, force: bool = False) -> Callable[[T], T]:
        """Decorator that adds a component under ``name``."""

        def decorator(item: T) -> T:
            if name in self._items and not force:
                raise ValueError(
                    f"{self.kind} '{name}' is already registered; pass force=True to replace it"
                )
            self._items[name] = item
            return item

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.kind} '{name}'; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
