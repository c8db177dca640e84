"""Linear probes: trained on T only, deterministic, and they read what the model knows."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

import rtteval.attacks.probe as probe_mod
from rtteval.attacks import AttackContext, get_attack
from rtteval.attacks.folds import ProvenanceError
from rtteval.attacks.probe import (
    ProbeConfig,
    fit_probe,
    probe_correct,
    probe_features,
    probe_fold,
)
from rtteval.data import load_dataset
from rtteval.models import load_model
from rtteval.stages.pretrain import scoring_for
from tests.attacks._nontraining import chance_bound, run_cli


def test_the_probe_is_fitted_on_t_only_and_a_v_question_in_it_is_refused(
    pretrained_tiny, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = load_dataset(pretrained_tiny["world"])
    sc = scoring_for(ds)
    fold, train_q = probe_fold(ds, "split_2", sc)
    assert fold.t == ["split_0", "split_1", "split_3", "split_4"]
    assert {it.split for it in fold.items} == set(fold.t)
    assert len(fold.items) == 4 * len(train_q) == 4 * sum(len(ds.splits[s]) for s in fold.t)
    v = ds.splits["split_2"]
    text = "\n".join(fold.train_texts)
    assert not [q for q in v if q.question in text or q.extra["subject"] in text]
    # end to end: the attack's own pool with a V question in it fails before any probe is fitted
    real = probe_mod.probe_pool
    monkeypatch.setattr(
        probe_mod, "probe_pool", lambda d, vv: [("split_1", d.splits[vv][0]), *real(d, vv)]
    )
    model, tok = load_model(pretrained_tiny["original"], device="cpu")
    with pytest.raises(ProvenanceError, match="V=split_0"):
        get_attack("probe").run(
            ProbeConfig().resolved(0), AttackContext(model, tok, ds, folds=["split_0"])
        )


def test_probe_is_deterministic_and_reads_the_originals_knowledge(pretrained_tiny) -> None:
    ds = load_dataset(pretrained_tiny["world"])
    model, tok = load_model(pretrained_tiny["original"], device="cpu")
    ctx = AttackContext(model, tok, ds)
    a = get_attack("probe").run(ProbeConfig().resolved(0), ctx)
    b = get_attack("probe").run(ProbeConfig().resolved(0), ctx)
    assert [p.v_acc for p in a.curve_points()] == [p.v_acc for p in b.curve_points()]
    assert a.config["grid_axis"] == "layers" and a.lrs == [1.0, 2.0]  # the micro model's 2 blocks
    mean, half = chance_bound(a.n_choices)
    assert max(p.v_acc for p in a.curve_points()) > mean + half  # some layer beats chance


def test_a_probe_on_random_labels_stays_at_chance(pretrained_tiny) -> None:
    """The same probe, fitted on T with a random 'correct' choice per question: V at chance."""
    ds = load_dataset(pretrained_tiny["world"])
    model, tok = load_model(pretrained_tiny["original"], device="cpu")
    sc = scoring_for(ds)
    rng = random.Random(0)
    correct: list[bool] = []
    n_choices: list[int] = []
    for v in ds.split_names:
        _, train_q = probe_fold(ds, v, sc)
        x_tr = probe_features(model, tok, train_q, sc)
        x_v = probe_features(model, tok, ds.splits[v], sc)
        fake = [rng.randrange(len(q.choices)) for q in train_q]
        y = torch.tensor(
            [int(j == f) for q, f in zip(train_q, fake, strict=True) for j in range(len(q.choices))]
        )
        p = fit_probe(x_tr[-1], y, 1e-2, 100)
        correct += probe_correct(p, x_v[-1], ds.splits[v])
        n_choices += [len(q.choices) for q in ds.splits[v]]
    mean, half = chance_bound(n_choices)
    assert abs(sum(correct) / len(correct) - mean) <= half


def test_probe_from_the_cli(tmp_path: Path, cli, pretrained_tiny) -> None:
    """From YAML: tests/attacks/test_suite.py's study runs it beside two other attacks."""
    out = run_cli(cli, tmp_path, pretrained_tiny, "probe")
    (s,) = out["summary"]
    assert (s["dataset"], s["method"]) == ("tiny [probe]", "never")
    assert {a["role"] for a in out["attacks"]} == {"original", "unlearned"}
    assert all(a["config"]["grid_axis"] == "layers" for a in out["attacks"])
