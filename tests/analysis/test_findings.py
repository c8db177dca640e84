"""rtteval.analysis.findings on synthetic studies: two regimes, two sizes of T, two seeds (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rtteval.analysis.findings import (
    FINDINGS_FILES,
    VERDICT_LESS,
    VERDICT_MORE,
    VERDICT_SAME,
    VERDICT_UNDEFINED,
    RecoveryArm,
    analyze,
    dataset_infos,
    recovery_difference_ci,
    render_markdown,
    verdict,
    write_findings,
)
from rtteval.analysis.report import build_results, merge_results, write_report
from rtteval.attacks.records import EpochEval, FoldAttack, ModelAttack, RunResult

N = 20  # questions per fold
SPLITS = ["split_0", "split_1", "split_2"]  # full T = 2 splits
STEPS_PER_EPOCH = 7
CHANCE = 0.25


def _bits(acc: float, n: int = N, offset: int = 0) -> list[bool]:
    k = round(acc * n)
    return [((i + offset) % n) < k for i in range(n)]


def fake_attack(
    before: float,
    curves: dict[float, list[float]],
    holdout: dict[float, list[float]] | None = None,
    *,
    train_splits: int = 2,
    world: str = "w",
) -> ModelAttack:
    """Every fold shares the curve (accuracies are multiples of 1/N); the dataset dir is "world".

    ``world`` prefixes the question ids: one world per seed gives each seed its own questions.
    """
    epochs = len(next(iter(curves.values())))
    folds = []
    for fi, v in enumerate(SPLITS):
        t = [SPLITS[(fi + j) % len(SPLITS)] for j in range(1, train_splits + 1)]
        runs = []
        for lr, accs in curves.items():
            eps = [
                EpochEval(e, acc, _bits(acc, offset=fi),
                          None if holdout is None else holdout[lr][e - 1],
                          None if holdout is None else _bits(holdout[lr][e - 1], 10))
                for e, acc in enumerate(accs, 1)
            ]  # fmt: skip
            runs.append(RunResult(lr, "completed", eps, steps=STEPS_PER_EPOCH * epochs))
        folds.append(
            FoldAttack(v, t, [f"{world}:{v}-{i:04d}" for i in range(N)], [4] * N,
                       EpochEval(0, before, _bits(before, offset=fi)), runs, {"v": v, "t": t})
        )  # fmt: skip
    cfg = {"lrs": list(curves), "epochs": epochs}
    return ModelAttack("m", "world", cfg, {"mode": "likelihood"}, folds)


HOLD = {1e-4: [0.5, 0.5], 1e-3: [0.5, 0.5]}  # flat: the honest pick is (1e-4, epoch 1)


def _original(k: int = 2, world: str = "w") -> ModelAttack:
    return fake_attack(
        1.0, {1e-4: [1.0, 0.95], 1e-3: [0.9, 0.85]}, HOLD, train_splits=k, world=world
    )


def _control(k: int = 2, world: str = "w") -> ModelAttack:
    return fake_attack(
        0.25, {1e-4: [0.25, 0.3], 1e-3: [0.2, 0.25]}, HOLD, train_splits=k, world=world
    )


def _gd_seeds(k: int = 2, scale: float = 1.0, worlds: tuple[str, str] = ("w", "w")):
    """Seed 0 peaks at (1e-4, epoch 2) = 0.9, seed 1 at (1e-3, epoch 2) = 0.8 (times ``scale``)."""
    curves = [{1e-4: [0.5, 0.9], 1e-3: [0.8, 0.6]}, {1e-4: [0.6, 0.7], 1e-3: [0.7, 0.8]}]
    return [
        fake_attack(0.25, {lr: [a * scale for a in accs] for lr, accs in c.items()}, HOLD,
                    train_splits=k, world=w)
        for c, w in zip(curves, worlds, strict=True)
    ]  # fmt: skip


def _dataset(
    label: str,
    regime: str,
    gd: list[ModelAttack],
    k: int = 2,
    worlds: tuple[str, ...] = ("w",),
    base: str | None = None,
) -> dict[str, Any]:
    """One dataset's results; one original and control per world (several: paired seeds)."""
    return build_results(
        {"GD": gd},
        [_original(k, w) for w in worlds],
        [_control(k, w) for w in worlds],
        dataset=label,
        n_boot=300,
        info={"base_dataset": base, "regime": regime},
    )


def study(ft_scale: float = 0.3, ft_world: str = "w") -> dict[str, Any]:
    """world (pretrained, |T|=2), world |T|=1 (pretrained), world-ft (finetuned, |T|=2).

    Labelled as the runner labels configs/findings.yaml: world-ft is its own
    dataset entry (base_dataset "world-ft") on the same world as "world".
    """
    return merge_results(
        _dataset("world", "pretrained", _gd_seeds()),
        _dataset("world |T|=1", "pretrained", _gd_seeds(1, 0.7), 1, base="world"),
        _dataset("world-ft", "finetuned", _gd_seeds(scale=ft_scale, worlds=(ft_world,) * 2),
                 worlds=(ft_world,)),
    )  # fmt: skip


def _strip_regime_fields(res: dict[str, Any]) -> dict[str, Any]:
    """What results.json looked like before the runner recorded base_dataset/regime/|T|."""
    for row in [*res["summary"], *res["folds"], *res["attacks"]]:
        for k in ("base_dataset", "regime", "train_splits", "paired_seeds"):
            row.pop(k, None)
    return res


@pytest.fixture(scope="module")
def findings() -> dict[str, Any]:
    return analyze(study())


def test_finding1_recovery_matches_hand_computation(findings):
    (row,) = findings["finding1"]["rows"]
    assert (row["dataset"], row["method"], row["regime"], row["n_seeds"]) == (
        "world", "GD", "pretrained", 2,
    )  # fmt: skip
    opt = row["optimistic"]
    # per seed best V: 0.9 and 0.8 -> mean 0.85; original 1.0 at (1e-4, 1); control 0.3
    assert opt["unlearned_rtt"] == pytest.approx(0.85)
    assert opt["original_rtt"] == 1.0 and opt["control_rtt"] == pytest.approx(0.3)
    assert opt["recovery"] == pytest.approx((0.85 - CHANCE) / (1.0 - CHANCE))
    assert opt["recovery_ci"][0] <= opt["recovery"] <= opt["recovery_ci"][1]
    # honest: flat holdout -> (1e-4, epoch 1): seeds 0.5 and 0.6
    assert row["honest"]["unlearned_rtt"] == pytest.approx(0.55)
    assert row["honest"]["recovery"] == pytest.approx((0.55 - CHANCE) / 0.75)
    json.dumps(findings, allow_nan=False)


def test_finding2_finetuned_clearly_lower_agrees_with_the_paper(findings):
    (row,) = findings["finding2"]["rows"]
    assert row["dataset"] == "world-ft"
    # 0.3 x (0.9, 0.8) = (0.27, 0.24) -> multiples of 1/20: 0.25 and 0.25 (round half to even)
    rft = row["optimistic"]["recovery"]
    (c,) = findings["finding2"]["comparison"]
    opt = c["optimistic"]
    assert (c["pretrained_dataset"], c["finetuned_dataset"]) == ("world", "world-ft")
    assert c["same_facts"] and opt["resampling"] == "same questions"
    assert opt["difference"] == pytest.approx(rft - 0.8)
    lo, hi = opt["difference_ci"]
    assert lo <= opt["difference"] <= hi < 0
    assert opt["verdict"] == VERDICT_LESS
    assert c["honest"]["verdict"] in (VERDICT_LESS, VERDICT_SAME)


def test_finding2_equal_regimes_show_no_clear_difference():
    (c,) = analyze(study(ft_scale=1.0))["finding2"]["comparison"]
    assert c["optimistic"]["difference"] == pytest.approx(0.0)
    assert c["optimistic"]["resampling"] == "same questions"  # one world: the same facts
    lo, hi = c["optimistic"]["difference_ci"]
    assert lo <= 0 <= hi
    assert c["optimistic"]["verdict"] == VERDICT_SAME


def test_difference_ci_shares_draws_when_regimes_score_the_same_facts():
    u, o = np.array([_bits(0.6, 60)], float), np.array([_bits(0.9, 60)], float)
    ids = [[f"q{i}" for i in range(60)]]
    same = RecoveryArm(u, o, CHANCE, ids, ids)
    ci, mode = recovery_difference_ci(same, same, n_boot=200)
    assert mode == "same questions" and ci == (0.0, 0.0)  # identical regimes, shared draws
    other = RecoveryArm(u, o, CHANCE, [["x"] * 60], [["x"] * 60])
    ci, mode = recovery_difference_ci(same, other, n_boot=200)
    assert mode == "independent" and ci[0] < 0 < ci[1]


def test_one_world_per_seed_pairs_seeds_across_regimes():
    worlds = ("a", "b")
    res = merge_results(
        _dataset("world", "pretrained", _gd_seeds(worlds=worlds), worlds=worlds),
        _dataset("world-ft", "finetuned", _gd_seeds(scale=0.3, worlds=worlds), worlds=worlds),
    )
    assert res["summary"][0]["paired_seeds"] is True
    (c,) = analyze(res, n_boot=300)["finding2"]["comparison"]
    assert c["optimistic"]["resampling"] == "paired worlds"
    assert c["optimistic"]["verdict"] == VERDICT_LESS


def test_finetuned_facts_from_another_world_are_compared_independently():
    (c,) = analyze(study(ft_world="other"), n_boot=300)["finding2"]["comparison"]
    assert not c["same_facts"] and c["optimistic"]["resampling"] == "independent"
    assert c["optimistic"]["verdict"] == VERDICT_LESS


def test_verdict_reads_only_the_sign_of_the_ci():
    assert verdict([-0.3, -0.1]) == VERDICT_LESS
    assert verdict([0.1, 0.3]) == VERDICT_MORE
    assert verdict([-0.1, 0.2]) == VERDICT_SAME
    assert verdict(None) == VERDICT_UNDEFINED and verdict([None, 0.1]) == VERDICT_UNDEFINED


def test_controls_floor_and_ceiling(findings):
    rows = {r["dataset"]: r for r in findings["controls"]["rows"]}
    assert set(rows) == {"world", "world |T|=1", "world-ft"}
    opt = rows["world"]["optimistic"]
    assert opt["control_rtt"] == pytest.approx(0.3) and opt["original_rtt"] == 1.0
    assert opt["control_rtt_minus_chance"] == pytest.approx(0.05)
    assert opt["floor"].startswith("at chance")  # 0.3 on 60 questions: CI includes 0.25


def test_train_size_rows_per_method_and_size(findings):
    rows = [r for r in findings["train_size"]["rows"] if r["regime"] == "pretrained"]
    assert [(r["method"], r["train_splits"], r["full_t"]) for r in rows] == [
        ("GD", 1, False),
        ("GD", 2, True),
    ]
    # |T|=1: 0.7 x (0.9, 0.8) -> 0.65 and 0.55 (multiples of 1/20) -> mean 0.6
    assert rows[0]["optimistic"]["unlearned_rtt"] == pytest.approx(0.6)
    assert rows[0]["optimistic"]["recovery"] == pytest.approx((0.6 - CHANCE) / 0.75)
    assert rows[1]["optimistic"]["recovery"] == pytest.approx(0.8)


def test_steps_pick_the_best_lr_at_each_epoch(findings):
    rows = [r for r in findings["steps"]["rows"] if r["dataset"] == "world"]
    assert {r["label"] for r in rows} == {"original", "control", "GD"}
    gd = {r["epoch"]: r for r in rows if r["label"] == "GD"}
    orig = {r["epoch"]: r for r in rows if r["label"] == "original"}
    assert gd[1]["lrs"] == [1e-3, 1e-3] and gd[2]["lrs"] == [1e-4, 1e-3]
    assert gd[1]["v_acc"] == pytest.approx(0.75) and gd[2]["v_acc"] == pytest.approx(0.85)
    assert orig[1]["v_acc"] == 1.0 and orig[2]["v_acc"] == pytest.approx(0.95)
    assert gd[1]["recovery"] == pytest.approx(0.5 / 0.75)
    assert gd[2]["recovery"] == pytest.approx(0.6 / 0.7)  # the original at the same epoch
    assert (gd[1]["steps"], gd[2]["steps"]) == (STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH)
    assert orig[1]["recovery"] is None
    # only full-T datasets; the finetuned one has its own (lower) curves, not world's
    assert {r["dataset"] for r in findings["steps"]["rows"]} == {"world", "world-ft"}
    ft = [r for r in findings["steps"]["rows"] if r["dataset"] == "world-ft" and r["label"] == "GD"]
    assert max(r["v_acc"] for r in ft) < 0.3


def test_missing_regime_fields_fall_back():
    res = _strip_regime_fields(study())
    infos = dataset_infos(res)
    assert infos["world"].regime == "pretrained" and infos["world"].base_dataset == "world"
    assert infos["world"].train_splits == 2 and infos["world"].full
    assert infos["world |T|=1"].train_splits == 1 and not infos["world |T|=1"].full
    assert set(infos["world"].fallback) == {"base_dataset", "regime", "train_splits"}
    f = analyze(res, n_boot=100)
    # without regimes everything is "pretrained": no finetuned rows, no comparison
    assert [r["dataset"] for r in f["finding1"]["rows"]] == ["world", "world-ft"]
    assert f["finding2"]["rows"] == [] and f["finding2"]["comparison"] == []
    md = render_markdown(f)
    assert "No dataset with regime 'finetuned'" in md
    assert "base_dataset, regime, train_splits" in md


def test_markdown_states_the_numbers(findings):
    md = render_markdown(findings)
    for title in ("Finding 1", "Finding 2", "Controls", "|T| splits", "RTT steps"):
        assert title in md
    assert VERDICT_LESS in md
    assert "world \\|T\\|=1" in md  # pipes in labels are escaped inside tables
    assert "recovery is 0.80 (GD)" in md


def test_write_findings_and_cli(tmp_path: Path, cli):
    write_report(tmp_path, study(), plots=False)
    paths = write_findings(tmp_path)
    assert sorted(paths) == sorted(FINDINGS_FILES)
    for name in FINDINGS_FILES:
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "fig_findings_steps.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "findings.json").read_text())["schema"] == "rtteval-findings"
    (tmp_path / "findings.md").unlink()
    r = cli("findings", tmp_path)
    assert r.returncode == 0, r.stderr
    assert "findings.md" in json.loads(r.stdout.strip().splitlines()[-1])["files"]
    assert (tmp_path / "findings.md").exists()


def test_cli_errors_are_one_line(tmp_path: Path, cli):
    r = cli("findings", tmp_path)
    assert r.returncode == 2 and "no results.json" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli("findings", tmp_path / "missing")
    assert r.returncode == 2 and "not a directory" in r.stderr
