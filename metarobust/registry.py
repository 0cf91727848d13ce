"""Registries turn a config string into a component (models, datasets, recipes, attacks).

Example:
    >>> MODELS = Registry("model")
    >>> @MODELS.register("conv4", "Conv-4: four 3x3 conv blocks, the few-shot standard")
    ... def conv4(**kw): ...
    >>> MODELS.get("conv4")
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from metarobust.errors import ConfigError


class Registry:
    """A named table of factories, each with a one-line description."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, tuple[Callable[..., Any], str]] = {}

    def register(self, name: str, description: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorator(factory: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = (factory, description)
            return factory

        return decorator

    def get(self, name: str, field: str | None = None) -> Callable[..., Any]:
        if name not in self._entries:
            where = f"{field}: " if field else ""
            raise ConfigError(
                f"{where}unknown {self.kind} {name!r}; choose one of {sorted(self._entries)}"
            )
        return self._entries[name][0]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return sorted(self._entries)

    def describe(self) -> list[tuple[str, str]]:
        """``(name, one-line description)`` for every entry, sorted by name."""
        return [(n, self._entries[n][1]) for n in self.names()]
