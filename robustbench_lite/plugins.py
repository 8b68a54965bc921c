"""Name -> factory registries for plug-ins, extended by Python entry points.

A third-party package adds an attack by declaring, in its own metadata::

    [options.entry_points]
    robustbench_lite.attacks =
        my-attack = my_package.attacks:MyAttack

and ``robustbench-lite evaluate --attacks my-attack`` finds it.
"""
from __future__ import annotations

import logging
from importlib.metadata import entry_points
from typing import Any, Callable, Generic, TypeVar

from .errors import UserInputError

log = logging.getLogger(__name__)
T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories; entry points of group ``group`` are read on first lookup."""

    def __init__(self, kind: str, group: str) -> None:
        self.kind = kind
        self.group = group
        self._factories: dict[str, Callable[..., T]] = {}
        self._entry_points_loaded = False

    def register(self, name: str, factory: Callable[..., T] | None = None):
        """Register ``factory`` under ``name``; usable as a decorator."""

        def add(f: Callable[..., T]) -> Callable[..., T]:
            key = name.lower()
            if key in self._factories and self._factories[key] is not f:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._factories[key] = f
            return f

        return add(factory) if factory is not None else add

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=self.group):
            if ep.name.lower() in self._factories:
                continue
            try:
                self._factories[ep.name.lower()] = ep.load()
            except Exception as exc:  # a broken third-party plug-in must not break the others
                log.warning("could not load %s plug-in %r from %s: %s", self.kind, ep.name, ep.value, exc)

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._factories)

    def get(self, name: str) -> Callable[..., T]:
        self._load_entry_points()
        try:
            return self._factories[name.lower()]
        except KeyError:
            raise UserInputError(
                f"unknown {self.kind} {name!r}: choose one of {', '.join(self.names()) or '(none registered)'}"
            ) from None

    def create(self, name: str, **kwargs: Any) -> T:
        return self.get(name)(**kwargs)

    def __contains__(self, name: str) -> bool:
        self._load_entry_points()
        return name.lower() in self._factories
