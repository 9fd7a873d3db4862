"""The two plug-in points as plain registries (solo-learn's ``METHODS``, mdistiller's
``distiller_dict``): phase-1 methods, selected by ``teacher.method``, and phase-2 distillers,
selected by ``student.mode``. A registry maps a config name to a class. The built-in plug-ins
(``raypipe.methods``, ``raypipe.distillers``) register themselves when the registry is first
used; one registered from a script, notebook or test file needs no edit to raypipe
(``raypipe.methods.register_method``, ``raypipe.distillers.register_distiller``). So that the
``raypipe`` command and ``tune_margin.py`` can run plug-ins defined elsewhere, the modules an
installed package declares in the entry-point group ``raypipe.plugins`` and those named in
``$RAYPIPE_PLUGINS`` (comma-separated, importable from ``sys.path``) are imported then too.

The driver resolves the names once, before any Ray resource is asked for, and sends the registered
classes with the config to Train workers and Tune trials (``snapshot`` / ``install``); a class
defined outside an installed package is pickled by value, so the workers need not be able to
import the file that defined it.
"""
from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from importlib import import_module
from typing import Callable, TypeVar

from .errors import ConfigError

T = TypeVar("T", bound=type)
PLUGINS_ENV = "RAYPIPE_PLUGINS"     # plug-in modules to import, comma-separated
PLUGINS_GROUP = "raypipe.plugins"   # entry-point group of installed packages' plug-in modules
_plugins_pending = True


def plugin_modules() -> list[tuple[str, str]]:
    """(module, where it is declared) of every plug-in module: entry points, then ``$RAYPIPE_PLUGINS``."""
    from importlib.metadata import entry_points
    found = [(ep.module, f"entry point {ep.name!r} of {ep.dist.name if ep.dist else '?'}")
             for ep in entry_points(group=PLUGINS_GROUP)]
    return found + [(m.strip(), f"${PLUGINS_ENV}") for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]


def load_plugins() -> None:
    """Import every plug-in module (:func:`plugin_modules`) once per process; one that fails is a
    config error naming it and where it was declared."""
    global _plugins_pending
    if not _plugins_pending:
        return
    _plugins_pending = False    # first: a plug-in's own registration comes back here
    for module, where in plugin_modules():
        try:
            import_module(module)
        except Exception as exc:
            raise ConfigError(f"plug-in module {module!r} ({where}) failed to import: "
                              f"{type(exc).__name__}: {exc}") from exc


class Registry(MutableMapping):
    """name -> class, with a decorator to add one and an error that lists the names on a miss.
    ``builtins`` names the module whose import registers the built-in plug-ins: it is imported on
    first use (so ``raypipe --help`` does not import torch)."""

    def __init__(self, key: str, builtins: str):
        self.key, self._classes, self._builtins = key, {}, [builtins]

    def _load(self) -> dict:
        while self._builtins:
            import_module(self._builtins.pop())
        load_plugins()
        return self._classes

    def __getitem__(self, name: str) -> type:
        return self._load()[name]

    def __setitem__(self, name: str, cls: type) -> None:
        self._load()[name] = cls

    def __delitem__(self, name: str) -> None:
        del self._load()[name]

    def __iter__(self):
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())

    def register(self, name: str, base: type) -> Callable[[T], T]:
        def add(cls: T) -> T:
            if not (isinstance(cls, type) and issubclass(cls, base)):
                raise TypeError(f"{self.key}={name!r}: {cls!r} is not a subclass of {base.__name__}")
            if cls.Settings.model_fields and "section" not in vars(cls):
                cls.section = name   # its config section: the name it was first registered under
            self[name] = cls
            return cls
        return add

    def check(self, name: str) -> None:
        if name not in self:
            raise ConfigError(f"{self.key}={name!r} is not registered; choose one of {sorted(self)} "
                              f"(or register one: see docs/architecture.md)")

    def get_class(self, name: str) -> type:
        """The class registered as ``name``, made ready to travel to Ray workers."""
        self.check(name)
        cls = self[name]
        module = sys.modules.get(cls.__module__)
        if module is not None and cls.__module__ != "__main__" and not cls.__module__.startswith("raypipe."):
            from ray import cloudpickle  # workers may not be able to import a script or test file
            cloudpickle.register_pickle_by_value(module)
        return cls

    def sections(self) -> dict[str, type]:
        """Config section name -> settings model of every registered plug-in that has settings."""
        return {cls.section or name: cls.Settings for name, cls in self.items() if cls.Settings.model_fields}


METHODS = Registry("teacher.method", builtins="raypipe.methods")
DISTILLERS = Registry("student.mode", builtins="raypipe.distillers")
REGISTRIES = {"teacher": METHODS, "student": DISTILLERS}   # config section -> its plug-in registry


def snapshot() -> dict[str, dict[str, type]]:
    """Every registered class, to send with a config to Train workers and Tune trials."""
    return {section: {name: registry.get_class(name) for name in registry} for section, registry in REGISTRIES.items()}


def install(classes: dict[str, dict[str, type]] | None) -> None:
    """Register classes sent by the driver (``snapshot``) in this process (a worker or trial). The
    plug-in modules are not imported here: their classes came with the snapshot, and a module the
    driver found may not be importable on a worker's node."""
    global _plugins_pending
    _plugins_pending = False
    for section, named in (classes or {}).items():
        REGISTRIES[section].update(named)
