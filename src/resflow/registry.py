"""A name -> object registry, used for model families, presets, networks and data sets.

Each family or network registers itself where it is defined (its own module), so
adding one edits no central list.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named objects of one kind (``what`` names the kind in error messages)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        """Add ``item`` under ``name``; a name can be registered once."""
        if name in self._items:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        """The object registered as ``name`` (a clear error listing the choices)."""
        try:
            return self._items[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.what} {name!r}; choose from {', '.join(sorted(self._items))}"
            ) from None

    def unregister(self, name: str) -> T:
        """Remove ``name`` and return its object (the same error as :meth:`get` if unknown)."""
        item = self.get(name)
        del self._items[name]
        return item

    @contextmanager
    def registered(self, name: str, item: T) -> Iterator[T]:
        """Register ``item`` as ``name`` for the ``with`` block only (tests, experiments).

        >>> colors: Registry[int] = Registry("color")
        >>> with colors.registered("red", 1):
        ...     "red" in colors
        True
        >>> "red" in colors
        False
        """
        self.register(name, item)
        try:
            yield item
        finally:
            self.unregister(name)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> list[tuple[str, T]]:
        return list(self._items.items())

    def names(self) -> list[str]:
        return list(self._items)
