"""GD — Gradient Difference: ascend the NLL of the forget prose, descend the retain NLL.

Loss: ``-NLL(forget corpus) + λ·NLL(retain text)`` (``λ`` = ``retain_coef``).
The forget term is unbounded, so a run is stopped as soon as forget accuracy
reaches the target; left running, plain GD becomes unstable (the prototype
hit chance in ~200 steps at lr 3e-4 and then fell apart).
"""

from __future__ import annotations

from rtteval.methods import register
from rtteval.methods.base import PAPER_TRAIN, TINY_TRAIN, NllPairMethod
from rtteval.methods.losses import gradient_difference


@register("gd")
class GradientDifference(NllPairMethod):
    corpus = "corpus"
    combine = staticmethod(gradient_difference)
    defaults = {
        "tiny": TINY_TRAIN | dict(lr=1e-3, retain_coef=1.0),
        "paper": PAPER_TRAIN | dict(lr=4e-7, retain_coef=1.0),
    }
