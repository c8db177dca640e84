"""RIA — Random Incorrect Answer: train on prose stating wrong answers.

Loss: ``NLL(whp_corpus_split_K) + λ·NLL(retain text)``.  Each forget fact
appears with several different wrong answers (the "who's Harry Potter"-style
corpus), so the model is pushed off the true answer without a single new
one to learn; accuracy falls to about chance or below.
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
from rtteval.methods.losses import relearn_with_retain
from rtteval.train import LossFn


@register("ria")
class RandomIncorrectAnswer(Method):
    corpus = "wrong_corpus"
    hparam_names = ("retain_coef",)
    defaults = {
        "tiny": TINY_TRAIN | dict(lr=3e-4, retain_coef=1.0),
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
            return relearn_with_retain(parts.forget, parts.retain, lam), parts.logs

        return loss_fn, None
