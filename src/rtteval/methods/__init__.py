"""Unlearning methods: one file each, registered by name.

Adding a method is one file (a :class:`~rtteval.methods.base.Method`
subclass decorated with ``@register("name")``) plus its import below.
"""

from __future__ import annotations

from collections.abc import Callable

from rtteval.errors import ConfigError
from rtteval.methods.base import Method, UnlearnContext

METHODS: dict[str, type[Method]] = {}


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make a method available as ``--method name``."""

    def deco(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise ValueError(f"unlearning method {name!r} registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def get_method(name: str) -> Method:
    """An instance of the method registered as ``name`` (case-insensitive)."""
    cls = METHODS.get(name.lower())
    if cls is None:
        raise ConfigError(
            f"unknown unlearning method {name!r}; known: {', '.join(sorted(METHODS))}"
        )
    return cls()


# One line per method: importing a module registers it.
from rtteval.methods import fwf, gd, npo, ria, rmu, simnpo  # noqa: E402, F401

__all__ = ["METHODS", "Method", "UnlearnContext", "get_method", "register"]
