"""No RTT training text may state a V fact: exact by fact id on worlds, by FactMatcher on paper data."""

from __future__ import annotations

import pytest

from rtteval.attacks.facts import FactMatcher
from rtteval.attacks.folds import (
    Fold,
    ProvenanceError,
    TrainItem,
    build_folds,
    check_provenance,
)
from rtteval.attacks.rtt import RTTConfig
from rtteval.data import load_dataset
from rtteval.data.types import MCQ
from rtteval.errors import DataError


def _q(question: str, answer: str, others: tuple[str, ...] = ("1", "2", "3")) -> MCQ:
    return MCQ(question, (answer, *others), 0)


def test_matcher_needs_the_answer_and_most_subject_words():
    names = [
        "Eli Harris",
        "Ann Li",
        "Bo Yu",
        "Cy Ng",
        "Di Ho",
        "Ed Wu",
        "Fa Ma",
        "Gu Ko",
        "Hu Lo",
        "Io Su",
    ]
    born = [_q(f"When was {n} born?", "1959" if i == 0 else "1970") for i, n in enumerate(names)]
    m = FactMatcher(born)  # ten questions: "when", "was", "born" are template words
    assert m.subject(born[0]) == {"eli", "harris"}
    m.index(
        [
            "Eli Harris was born in 1959.",  # states it
            "Marie Harris was born in 1959.",  # same surname and year, another person
            "Eli Harris was born in 1960.",  # another year
            "When was Eli Harris born?\nA. 1959\nB. 1960\nAnswer: B. 1960",  # 1959 only an option
            "When was Eli Harris born?\nA. 1959\nB. 1960\nAnswer: A. 1959",  # the same MCQ
        ]
    )
    assert m.stated_in(born[0]) == [0, 4]
    # an MCQ text states its own subject's fact, not a near-namesake's with the same answer
    voyager = [
        _q(f"When did the following event happen?\nVoyager {k} launched.", "1977") for k in "12"
    ]
    m = FactMatcher(voyager).index(
        ["When did the following event happen?\nVoyager 2 launched.\nAnswer: A. 1977"]
    )
    assert m.stated_in(voyager[0]) == [] and m.stated_in(voyager[1]) == [0]


def test_world_check_is_exact_by_fact_id(tiny_world):
    world = load_dataset(tiny_world)
    (fold,) = build_folds(
        world, RTTConfig(folds=["split_0"], text_format="corpus", holdout_fraction=0.0)
    )
    v_fid = str(world.splits["split_0"][0].extra["fact_id"])
    assert all(it.fact_id is not None and not it.fact_id.startswith("split_0") for it in fold.items)
    fold.items.append(TrainItem("nothing about anyone", fold.t[0], "x", fact_id=v_fid))
    with pytest.raises(ProvenanceError, match=f"states V fact {v_fid}"):
        check_provenance(fold, world)


def test_years_corpus_leak_is_caught_and_random_bd_passes(shared_datasets):
    """The paper's Years: corpus_split_K is not split_K's partition, so T's prose states V facts.

    Measured with this rule: 121-130 of the 157-158 V facts per fold (623 of 789 in all,
    docs/paper-fidelity.md).  Random Birthdays' prose lines up with its splits; its few facts
    repeated across splits (same name, same year) leave T with their questions (overlap drop),
    and their prose must go with them.
    """
    years = load_dataset(shared_datasets / "years")
    with pytest.raises(
        DataError, match=r"dataset 'years': T's prose states 1[2-3]\d of 15[78] V=split_0"
    ):
        build_folds(years, RTTConfig(folds=["split_0"], text_format="corpus", holdout_fraction=0.0))
    # the last line of defence catches the same leak in a fold built by hand
    t = [n for n in years.split_names if n != "split_0"]
    items = [
        TrainItem(p.text, s, f"corpus_{s}#{i}") for s in t for i, p in enumerate(years.corpus[s])
    ]
    with pytest.raises(ProvenanceError, match=r"V=split_0: 1[2-3]\d provenance violation"):
        check_provenance(Fold("split_0", t, "corpus", items), years)
    # mcq RTT on Years is clean: near-namesake events with one year are different facts
    (fold,) = build_folds(
        years, RTTConfig(folds=["split_0"], text_format="mcq", holdout_fraction=0.0)
    )
    assert len(fold.items) > 600

    rb = load_dataset(shared_datasets / "random_bd")
    folds = build_folds(
        rb, RTTConfig(folds=["split_4", "split_6"], text_format="corpus", holdout_fraction=0.0)
    )
    for f in folds:
        assert len(f.items) > 4000 and f.dropped  # checked by check_provenance inside build_folds
    # without dropping the repeated facts' prose, the check would have failed
    t6 = [n for n in rb.split_names if n != "split_6"]
    raw = [TrainItem(p.text, s, f"corpus_{s}#{i}") for s in t6 for i, p in enumerate(rb.corpus[s])]
    with pytest.raises(ProvenanceError, match="Flavie Schmitt"):
        check_provenance(Fold("split_6", t6, "corpus", raw), rb)
