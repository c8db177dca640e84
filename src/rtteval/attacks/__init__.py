"""Attacks that test whether unlearned information is still in the weights.

A registry by name, so the CLI and the pipeline can pick an attack from a
config string.  Only RTT (retraining on T) exists today; an attack is any
callable with :func:`rtteval.attacks.rtt.attack_model`'s signature.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rtteval.attacks.rtt import (
    Fold,
    ModelAttack,
    ProvenanceError,
    RTTConfig,
    attack_model,
    build_folds,
    check_provenance,
)
from rtteval.errors import ConfigError

ATTACKS: dict[str, Callable[..., Any]] = {}


def register(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: make an attack available as ``get_attack(name)``."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in ATTACKS and ATTACKS[name] is not fn:
            raise ValueError(f"attack {name!r} registered twice")
        ATTACKS[name] = fn
        return fn

    return deco


def get_attack(name: str) -> Callable[..., Any]:
    if name not in ATTACKS:
        raise ConfigError(f"unknown attack {name!r}; known: {', '.join(sorted(ATTACKS))}")
    return ATTACKS[name]


register("rtt")(attack_model)

__all__ = [
    "ATTACKS",
    "Fold",
    "ModelAttack",
    "ProvenanceError",
    "RTTConfig",
    "attack_model",
    "build_folds",
    "check_provenance",
    "get_attack",
    "register",
]
