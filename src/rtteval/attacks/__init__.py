"""Attacks that test whether unlearned information is still in the weights.

The seam is :mod:`rtteval.attacks.base` (the :class:`Attack` protocol and the
``@register_attack`` registry); the arms, folds, provenance and result
records are shared by every attack.  Importing an attack's module registers
it: one line below per attack (docs/architecture.md, "Adding an attack").
"""

from __future__ import annotations

# the registry: one import per attack
import rtteval.attacks.icl  # noqa: F401
import rtteval.attacks.lora_rtt  # noqa: F401
import rtteval.attacks.probe  # noqa: F401
import rtteval.attacks.quantize  # noqa: F401
import rtteval.attacks.retain_relearn  # noqa: F401
import rtteval.attacks.rtt  # noqa: F401
import rtteval.attacks.unrelated_relearn  # noqa: F401
from rtteval.attacks.base import (
    ATTACKS,
    Attack,
    AttackConfig,
    AttackContext,
    attack_adapter,
    get_attack,
    register_attack,
)

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackConfig",
    "AttackContext",
    "attack_adapter",
    "get_attack",
    "register_attack",
]
