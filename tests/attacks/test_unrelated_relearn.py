"""Unrelated-data relearning: its texts state no forget fact, a leak is refused, the floor stays."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rtteval.attacks import AttackContext, get_attack
from rtteval.attacks.folds import ProvenanceError
from rtteval.attacks.unrelated_relearn import (
    UNRELATED,
    UnrelatedRelearnConfig,
    resolve_ks,
    source_texts,
    unrelated_folds,
)
from rtteval.data import load_dataset
from rtteval.data.types import Dataset, Passage
from rtteval.data.world import QA_TEMPLATE
from rtteval.errors import ConfigError
from rtteval.models import load_model
from tests.attacks._nontraining import assert_at_chance, run_cli


def test_ks_cap_at_the_source_and_smaller_ks_are_subsets(tiny_world: Path) -> None:
    assert resolve_ks([10, 100, "all"], 16) == [10, 16]
    assert resolve_ks(["all", 3], 40) == [3, 40]
    ds = load_dataset(tiny_world)
    passages, where = source_texts(ds, None)
    assert where.endswith("corpus_dev.jsonl") and passages == ds.corpus["dev"]
    small = unrelated_folds(ds, passages, 5, ["split_0"], seed=0)[0].train_texts
    large = unrelated_folds(ds, passages, len(passages), ["split_0"], seed=0)[0].train_texts
    assert (
        len(small) == 5 and small == large[:5] and sorted(large) == sorted(p.text for p in passages)
    )
    other = unrelated_folds(ds, passages, 5, ["split_0"], seed=1)[0].train_texts
    assert other != small  # the order is the seed's


def test_the_texts_state_no_forget_fact_and_a_leaked_one_is_refused(tiny_world: Path) -> None:
    ds = load_dataset(tiny_world)
    passages, _ = source_texts(ds, None)
    (fold,) = unrelated_folds(ds, passages, len(passages), ["split_0"], seed=0)
    assert {it.split for it in fold.items} == {UNRELATED} and fold.t == []
    # independent of the check: no forget subject, question or fact id in any text
    forget = [q for s in ds.split_names for q in ds.splits[s]]
    text = "\n".join(fold.train_texts)
    assert not [q for q in forget if q.question in text]
    assert not [q for q in forget if re.search(rf"\b{re.escape(q.extra['subject'])}\b", text)]
    assert all(not str(it.fact_id).startswith("split_") for it in fold.items)
    # a fact of a split that is not attacked (T, not V), injected as one more text: refused
    q = ds.splits["split_3"][0]
    leak = Passage(QA_TEMPLATE.format(question=q.question, answer=q.answer_text), "dev")
    with pytest.raises(ProvenanceError, match="split_3"):
        unrelated_folds(ds, [*passages, leak], len(passages) + 1, ["split_0"], seed=0)


def test_a_user_corpus_that_states_a_forget_fact_fails_before_training(
    tmp_path: Path, pretrained_tiny
) -> None:
    """End to end through ``corpus:``: a .jsonl of texts, one of them a V fact in other words."""
    ds = load_dataset(pretrained_tiny["world"])
    q = ds.splits["split_0"][2]
    lines = [p.text for p in ds.corpus["dev"]] + [f"{q.extra['subject']} is {q.answer_text}."]
    corpus = tmp_path / "texts.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    model, tok = load_model(pretrained_tiny["original"], device="cpu")
    cfg = UnrelatedRelearnConfig(ks=["all"], corpus=str(corpus), epochs=1).resolved(0)
    assert cfg["corpus"] == str(corpus.resolve())
    with pytest.raises(ProvenanceError, match="split_0"):
        get_attack("unrelated_relearn").run(cfg, AttackContext(model, tok, ds, folds=["split_1"]))


def test_paper_data_needs_a_named_corpus_and_its_fact_matcher_catches_a_leak(
    shared_datasets: Path,
) -> None:
    bd = load_dataset(shared_datasets / "random_bd")
    with pytest.raises(ConfigError, match="corpus"):
        source_texts(bd, None)
    # another dataset's prose states none of Random Birthdays' facts ...
    years = load_dataset(shared_datasets / "years")
    other = [p for ps in years.corpus.values() for p in ps][:200]
    unrelated_folds(bd, other, len(other), [bd.split_names[0]], seed=0)
    # ... but Random Birthdays' own prose of a forget split does (no fact ids: the matcher's rule)
    own = bd.corpus[bd.split_names[1]][:1]
    with pytest.raises(ProvenanceError, match="is stated in training text"):
        unrelated_folds(bd, [*other, *own], len(other) + 1, [bd.split_names[1]], seed=0)


def test_the_never_learned_control_stays_at_chance(pretrained_tiny) -> None:
    """The texts teach no forget fact, so fine-tuning the control on them leaves V at chance."""
    ds = load_dataset(pretrained_tiny["world"])
    model, tok = load_model(pretrained_tiny["control"], device="cpu")
    settings = UnrelatedRelearnConfig(ks=[10, "all"], lr=3e-3, epochs=2).resolved(0)
    a = get_attack("unrelated_relearn").run(settings, AttackContext(model, tok, ds))
    assert a.lrs == [10.0, float(len(ds.corpus["dev"]))] and a.config["grid_axis"] == "texts"
    assert len(a.question_ids) == sum(len(ds.splits[s]) for s in ds.split_names)
    for f in a.folds:
        assert f.provenance["n_train_texts_per_k"] == [10, len(ds.corpus["dev"])]
        assert all(r.epochs[-1].loss < r.epochs[0].loss for r in f.runs)  # it did train
    assert_at_chance(a)


def test_unrelated_relearn_from_the_cli(tmp_path: Path, cli, pretrained_tiny) -> None:
    """From YAML: tests/attacks/test_suite.py's study runs it beside two other attacks."""
    out = run_cli(cli, tmp_path, pretrained_tiny, "unrelated_relearn", "--epochs", "1")
    (s,) = out["summary"]
    assert (s["dataset"], s["method"]) == ("tiny [unrelated_relearn]", "never")
    assert {a["role"] for a in out["attacks"]} == {"original", "unlearned"}
    assert all(a["config"]["lrs"] == [10.0, 16.0] for a in out["attacks"])


def test_a_dataset_that_is_no_world_and_names_no_corpus_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a synthetic world"):
        source_texts(Dataset(tmp_path / "paper", {"split_0": []}), None)
    with pytest.raises(ConfigError, match="no such file"):
        source_texts(Dataset(tmp_path / "paper", {"split_0": []}), str(tmp_path / "nope"))
