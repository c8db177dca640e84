"""Diverged RTT runs are recorded but never selected, and report.md names them (issue 13.5)."""

from __future__ import annotations

import pytest

from rtteval.analysis.report import build_results, render_markdown
from rtteval.attacks.records import ModelAttack
from tests.analysis.test_report import fake_attack


def _diverge(a: ModelAttack, lr: float, fold: int, after_epochs: int) -> ModelAttack:
    run = next(r for r in a.folds[fold].runs if r.lr == lr)
    run.status, run.message = "diverged", "loss nan at step 13"
    run.epochs = run.epochs[:after_epochs]
    return a


def test_a_diverged_rtt_lr_is_never_the_chosen_point():
    # lr 1e-3 has the best V and held-out accuracy at epoch 1 on both folds, then diverges on one
    curves = {1e-4: [0.5, 0.6], 1e-3: [0.9, 0.95]}
    hold = {1e-4: [0.5, 0.7], 1e-3: [1.0, 1.0]}
    original = _diverge(fake_attack("original", 1.0, curves, hold), 1e-3, 1, 1)
    unlearned = _diverge(fake_attack("gd", 0.25, curves, hold), 1e-3, 1, 1)
    assert (1e-3, 1) in unlearned.grid()  # still in the grid: only selection leaves it out
    res = build_results({"GD": unlearned}, original, n_boot=50)
    (s,) = res["summary"]
    for block in (s, s["honest"]):
        assert block["chosen"]["unlearned_rtt"] == [{"lr": 1e-4, "epoch": 2}]
        assert block["chosen"]["original_rtt"] == [{"lr": 1e-4, "epoch": 2}]
    assert s["unlearned_rtt"] == pytest.approx(0.6) and s["honest"]["unlearned_rtt"] == 0.6
    # the choice redone inside the bootstrap never picks the diverged lr's 0.9 either
    assert s["unlearned_rtt_ci"][1] < 0.85, s["unlearned_rtt_ci"]
    md = render_markdown(res)
    section = md.split("## Divergence")[1].split("\n## ")[0]
    rows = [r for r in section.splitlines() if "loss nan at step 13" in r]
    assert len(rows) == 2  # the original's and the unlearned model's run on split_1
    assert all("split_1" in r and "0.001" in r for r in rows)
    assert any("unlearned: GD" in r for r in rows)


def test_every_lr_diverged_means_no_chosen_point():
    a = fake_attack("gd", 0.25, {1e-3: [0.9, 0.95]})
    a = _diverge(a, 1e-3, 0, 2)
    o = fake_attack("original", 1.0, {1e-3: [1.0, 1.0]})
    (s,) = build_results({"GD": a}, o, n_boot=20)["summary"]
    assert s["chosen"]["unlearned_rtt"] == [None] and s["unlearned_rtt"] is None
