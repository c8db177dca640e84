"""RIA — Random Incorrect Answer: train on prose stating wrong answers.

Loss: ``NLL(whp_corpus_split_K) + λ·NLL(retain text)``.  Each forget fact
appears with several different wrong answers (the "who's Harry Potter"-style
corpus), so the model is pushed off the true answer without a single new
one to learn; accuracy falls to about chance or below.
"""

from __future__ import annotations

from rtteval.methods import register
from rtteval.methods.base import PAPER_TRAIN, TINY_TRAIN, NllPairMethod
from rtteval.methods.losses import relearn_with_retain


@register("ria")
class RandomIncorrectAnswer(NllPairMethod):
    corpus = "wrong_corpus"
    combine = staticmethod(relearn_with_retain)
    defaults = {
        # ε 1e-3 rather than the shared 1e-4: held-out retain 0.99 / 0.99 / 1.00
        # on three seeds' models at lr 3e-3, against 0.99 / 0.84 / 0.99 at
        # ε 1e-4, lr 1e-3 (docs/methods.md)
        "tiny": TINY_TRAIN | dict(lr=3e-3, adam_eps=1e-3, retain_coef=1.0),
        # the paper's lr for RIA (its "WHP") and FWF on Years (docs/paper-fidelity.md)
        "paper": PAPER_TRAIN | dict(lr=8e-7, retain_coef=1.0),
    }
