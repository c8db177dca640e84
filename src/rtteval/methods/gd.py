"""GD — Gradient Difference: ascend the NLL of the forget prose, descend the retain NLL.

Loss: ``-NLL(forget corpus) + λ·NLL(retain text)`` (``λ`` = ``retain_coef``).
The forget term is unbounded, so a run is stopped as soon as forget accuracy
reaches the target; left running, plain GD becomes unstable (the prototype
hit chance in ~200 steps at lr 3e-4 and then fell apart).
"""

from __future__ import annotations

from rtteval.methods import register
from rtteval.methods.base import (
    PAPER_TRAIN,
    TINY_TRAIN,
    Method,
    Trainable,
    UnlearnContext,
    nll_pair,
)
from rtteval.methods.losses import gradient_difference
from rtteval.train import LossFn


@register("gd")
class GradientDifference(Method):
    corpus = "corpus"
    hparam_names = ("retain_coef",)
    defaults = {
        "tiny": TINY_TRAIN | dict(lr=1e-3, retain_coef=1.0),
        "paper": PAPER_TRAIN | dict(lr=4e-7, retain_coef=1.0),
    }
    grid = {
        "tiny": {"lr": [3e-4, 1e-3, 3e-3], "retain_coef": [1.0, 3.0]},
        "paper": {"lr": [1e-7, 4e-7, 1.6e-6], "retain_coef": [1.0, 4.0]},
    }

    def build(self, ctx: UnlearnContext) -> tuple[LossFn, Trainable]:
        lam = float(ctx.hparams["retain_coef"])

        def loss_fn(model, batch):
            parts = nll_pair(model, batch)
            return gradient_difference(parts.forget, parts.retain, lam), parts.logs

        return loss_fn, None
