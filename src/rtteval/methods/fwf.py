"""FWF — Fixed Wrong Fact: train on prose stating one fixed wrong answer per fact.

Loss: ``NLL(fwf_corpus_split_K) + λ·NLL(retain text)``, the same as RIA but
every passage about a fact names the *same* wrong answer, so the model
learns a replacement fact; accuracy can fall well below chance.
"""

from __future__ import annotations

from rtteval.methods import register
from rtteval.methods.ria import RandomIncorrectAnswer


@register("fwf")
class FixedWrongFact(RandomIncorrectAnswer):
    """RIA's loss and defaults on the fixed-wrong-fact corpus; only the data differ."""

    corpus = "fixed_wrong_corpus"
