"""Budget summaries on synthetic records: steps to 50% recovery, AUC, where the control learns."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from rtteval.analysis.budget import budget_entry, teaching_sentence
from rtteval.analysis.metrics import CurvePoint
from rtteval.analysis.report import build_results, render_markdown, write_report
from rtteval.attacks.records import EpochEval, FoldAttack, ModelAttack, RunResult, StepEval

N = 40  # questions per fold, 4 choices: chance 0.25
STEPS = 10  # two epochs of five steps


def _correct(k: int) -> list[bool]:
    return [i < k for i in range(N)]


def _attack(label: str, count: Callable[[int], int], *, curve: bool = True) -> ModelAttack:
    """Two folds whose V count correct after ``s`` steps is ``count(s)``, V every step."""
    folds = []
    for v in ("a", "b"):
        c = [StepEval(s, 100 * s, count(s) / N, _correct(count(s))) for s in range(1, STEPS + 1)]
        epochs = [EpochEval(e, count(5 * e) / N, _correct(count(5 * e))) for e in (1, 2)]
        run = RunResult(1e-3, "completed", epochs, STEPS, curve=c if curve else [])
        folds.append(FoldAttack(v, ["x"], [f"{v}{i}" for i in range(N)], [4] * N,
                                EpochEval(0, count(0) / N, _correct(count(0))), [run]))  # fmt: skip
    return ModelAttack(label, "w", {"lrs": [1e-3], "epochs": 2}, {}, folds)


def _original(s: int) -> int:
    return N


def _unlearned(s: int) -> int:
    return 10 + 3 * s  # recovery 0.1 per step: 0.5 at step 5, 1 at step 10


def _late_learner(s: int) -> int:
    return 10 if s < 7 else 36  # at chance until step 7, then far above it


def _chance(s: int) -> int:
    return 10


@pytest.mark.parametrize("curve", [True, False])
def test_steps_to_half_auc_and_where_the_control_starts_to_learn(curve: bool) -> None:
    o, u, c = (_attack(n, f, curve=curve) for n, f in
               (("o", _original), ("u", _unlearned), ("c", _late_learner)))  # fmt: skip
    chosen = {r: [CurvePoint(1e-3, 2, 0.0)] for r in ("original", "unlearned", "control")}
    b = budget_entry("rtt", [o], [u], [c], chosen, 0.25, n_boot=200)
    assert b is not None
    steps = [p["step"] for p in b["points"]]
    if not curve:  # epoch ends only: the same summaries, coarser
        assert b["source"] == "epochs" and steps == [0, 5, 10]
        assert b["steps_to_half"] == 5 and b["control_learns_at"] == 10
        assert b["auc"] == pytest.approx((0.25 + 0.75) / 2)  # trapezoids over 0, 0.5, 1
        return
    assert b["source"] == "steps" and steps == list(range(STEPS + 1))
    assert [p["recovery"] for p in b["points"]] == pytest.approx([s / 10 for s in steps])
    assert b["points"][3]["tokens"] == 300 and b["selected_steps"]["control"] == 10
    assert b["steps_to_half"] == 5
    lo, hi = b["steps_to_half_ci"]
    assert lo is not None and lo <= 5 <= (hi or STEPS + 1) and lo < (hi or STEPS + 1)
    assert b["auc"] == pytest.approx(0.5)
    assert b["auc_ci"][0] < 0.5 < b["auc_ci"][1]
    assert b["control_learns_at"] == 7  # its CI leaves chance exactly where it starts to learn
    for p in b["points"]:
        assert p["control_ci"][0] <= p["control"] <= p["control_ci"][1]
    # an unlearned model that never recovers: never half, AUC 0
    never = budget_entry("rtt", [o], [_attack("n", _chance)], [c], chosen, 0.25, n_boot=200)
    assert never["steps_to_half"] is None and never["steps_to_half_ci"] == [None, None]
    assert never["auc"] == pytest.approx(0.0)
    # attacks that do not train have no budget
    assert budget_entry("icl", [o], [u], [c], chosen, 0.25) is None


@pytest.mark.parametrize("control, teaches", [(_late_learner, True), (_chance, False)])
def test_report_says_whether_the_attack_teaches_at_the_selected_budget(
    control: Callable[[int], int], teaches: bool, tmp_path: Path
) -> None:
    res = build_results({"gd": _attack("u", _unlearned)}, _attack("o", _original),
                        _attack("c", control), dataset="w [lora_rtt]", n_boot=100,
                        info={"attack": "lora_rtt"})  # fmt: skip
    (e,) = res["summary"]
    assert e["budget"]["control_learns_at"] == (7 if teaches else None)
    sentence = teaching_sentence(e)
    md = render_markdown(res)
    assert "## Attack budget" in md and sentence in md
    assert ("the attack teaches at that budget" in sentence) is teaches
    assert ("does not teach V at that budget" in sentence) is not teaches
    if teaches:  # the control's chosen point is the end of training: 10 steps
        assert "lr 0.001, epoch 2; 10 steps" in sentence
    paths = write_report(tmp_path, res)
    assert (tmp_path / "fig_budget_lora_rtt.png").is_file() and "fig_budget_lora_rtt.png" in paths
    assert "budget_points" not in (tmp_path / "results.csv").read_text()


def test_without_bootstrap_there_are_no_intervals_and_no_claim_about_the_control(
    tmp_path: Path,
) -> None:
    res = build_results({"gd": _attack("u", _unlearned)}, _attack("o", _original),
                        _attack("c", _late_learner), dataset="w", n_boot=0)  # fmt: skip
    b = res["summary"][0]["budget"]
    assert b["steps_to_half"] == 5 and b["steps_to_half_ci"] is None
    assert b["control_learns_at"] is None and b["points"][3]["control_ci"] == [None, None]
    assert "fig_budget_rtt.png" in write_report(tmp_path, res)  # the figure draws without bands
