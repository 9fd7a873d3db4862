"""Registries of the two plug-in points: phase-1 methods (``teacher.method``) and phase-2
distillers (``student.mode``). A registry maps a config name to a class; registering one from a
script, notebook or test file needs no edit to raypipe:

    from raypipe.methods import SSLMethod, register_method

    @register_method("byol")
    class BYOL(SSLMethod): ...

The driver resolves the name once (before any Ray resource is asked for) and hands the class to
the Train workers and Tune trials with their config; a class defined outside an installed package
is pickled by value, so the workers need not be able to import the file that defined it.
"""
from __future__ import annotations

import sys
from typing import Callable, TypeVar

from .config import ConfigError

T = TypeVar("T", bound=type)


class Registry(dict):
    """name -> class, with a decorator to add one and an error that lists the names on a miss."""

    def __init__(self, key: str, base: type):
        super().__init__()
        self.key, self.base = key, base

    def register(self, name: str) -> Callable[[T], T]:
        def add(cls: T) -> T:
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise TypeError(f"{self.key}={name!r}: {cls!r} is not a subclass of {self.base.__name__}")
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


def _registries() -> dict[str, Registry]:
    from .distillers import DISTILLERS
    from .methods import METHODS
    return {"teacher.method": METHODS, "student.mode": DISTILLERS}


def _name(cfg, key: str) -> str:
    section, field = key.split(".")
    return getattr(getattr(cfg, section), field)


def check(cfg) -> None:
    """Config validation: each plug-in name is registered (a ConfigError listing them if not)."""
    for key, registry in _registries().items():
        registry.check(_name(cfg, key))


def selected(cfg) -> dict[str, tuple[str, type]]:
    """The classes ``cfg`` selects, to send with it to Train workers and Tune trials."""
    return {key: (_name(cfg, key), registry.get_class(_name(cfg, key))) for key, registry in _registries().items()}


def install(classes: dict[str, tuple[str, type]] | None) -> None:
    """Register classes sent by the driver (``selected``) in this process (a worker or trial)."""
    registries = _registries()
    for key, (name, cls) in (classes or {}).items():
        registries[key][name] = cls
