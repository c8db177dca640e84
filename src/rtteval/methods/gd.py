"""GD — Gradient Difference: ascend the NLL of the forget prose, descend the retain NLL.

Loss: ``-NLL(forget corpus) + λ·NLL(retain text)`` (``λ`` = ``retain_coef``).
The forget term is unbounded, so a run is stopped as soon as forget accuracy
reaches the target; left running, plain GD becomes unstable (the prototype
hit chance in ~200 steps at lr 3e-4 and then fell apart).
"""

from __future__ import annotations

from rtteval.methods import register
from rtteval.methods.base import Method, Trainable, UnlearnContext, nll_pair
from rtteval.methods.losses import gradient_difference
from rtteval.train import LossFn


@register("gd")
class GradientDifference(Method):
    corpus = "corpus"
    hparam_names = ("retain_coef",)
    defaults = {
        "tiny": dict(lr=3e-4, optimizer="adamw", epochs=20, target_forget_acc=0.3, retain_coef=1.0),
        "paper": dict(lr=4e-7, optimizer="lion", epochs=3, target_forget_acc=0.3, retain_coef=1.0),
    }
    grid = {"lr": [1e-4, 3e-4, 1e-3], "retain_coef": [0.5, 1.0, 2.0]}

    def build(self, ctx: UnlearnContext) -> tuple[LossFn, Trainable]:
        lam = float(ctx.hparams["retain_coef"])

        def loss_fn(model, batch):
            parts = nll_pair(model, batch)
            return gradient_difference(parts.forget, parts.retain, lam), parts.logs

        return loss_fn, None
