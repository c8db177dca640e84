"""FWF — Fixed Wrong Fact: train on prose stating one fixed wrong answer per fact.

Loss: ``NLL(fwf_corpus_split_K) + λ·NLL(retain text)``, the same as RIA but
every passage about a fact names the *same* wrong answer, so the model
learns a replacement fact; accuracy can fall well below chance.
"""

from __future__ import annotations

from rtteval.methods import register
from rtteval.methods.base import TINY_TRAIN
from rtteval.methods.ria import RandomIncorrectAnswer


@register("fwf")
class FixedWrongFact(RandomIncorrectAnswer):
    """RIA's loss on the fixed-wrong-fact corpus; only the data and tiny defaults differ."""

    corpus = "fixed_wrong_corpus"
    defaults = RandomIncorrectAnswer.defaults | {
        # measured on the annealed tiny-1m (docs/methods.md): held-out retain
        # when forget reaches 0.35 is 0.97 at lr 1e-4 (320 steps), 0.95 at
        # 3e-4, 0.92 at 1e-3; the slowest needs more than the shared 300 steps
        "tiny": TINY_TRAIN | dict(lr=1e-4, retain_coef=1.0, target_forget_acc=0.35, max_steps=600)
    }
