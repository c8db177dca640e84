"""build_results / write_report / `rtteval report` on synthetic attacks (no model needed)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from rtteval.analysis.report import (
    RESULT_FILES,
    build_results,
    load_results,
    merge_results,
    regenerate,
    render_markdown,
    summary_table,
    write_report,
)
from rtteval.attacks.records import EpochEval, FoldAttack, ModelAttack, RunResult
from rtteval.errors import UserError

N = 20  # questions per fold
FOLDS = ["split_0", "split_1"]


def _bits(acc: float, n: int = N, offset: int = 0) -> list[bool]:
    k = round(acc * n)
    return [((i + offset) % n) < k for i in range(n)]


def fake_attack(
    label: str,
    before: float,
    curves: dict[float, list[float]],
    holdout: dict[float, list[float]] | None = None,
    retain: float = 0.9,
    dataset: str = "world",
) -> ModelAttack:
    """Both folds share the curve; accuracies are exact multiples of 1/N."""
    lrs = list(curves)
    epochs = len(next(iter(curves.values())))
    folds = []
    for fi, v in enumerate(FOLDS):
        runs = []
        for lr in lrs:
            eps = []
            for e, acc in enumerate(curves[lr], 1):
                h = None if holdout is None else holdout[lr][e - 1]
                eps.append(
                    EpochEval(
                        e,
                        acc,
                        _bits(acc, offset=fi),
                        h,
                        None if h is None else _bits(h, 10),
                        retain - 0.01 * e,
                        1.0 / e,
                    )
                )
            runs.append(RunResult(lr, "completed", eps, steps=10 * epochs))
        folds.append(
            FoldAttack(
                v=v,
                t=[f for f in FOLDS if f != v],
                question_ids=[f"{v}-{i:04d}" for i in range(N)],
                n_choices=[4] * N,
                before=EpochEval(0, before, _bits(before, offset=fi), None, None, retain),
                runs=runs,
                provenance={"v": v, "t": [f for f in FOLDS if f != v], "checked": True,
                            "n_train_texts": 30, "holdout_ids": [], "dropped_overlap": []},
            )
        )  # fmt: skip
    cfg = {"lrs": lrs, "epochs": epochs, "holdout_fraction": 0.2 if holdout else 0.0}
    return ModelAttack(label, dataset, cfg, {"mode": "likelihood"}, folds, retain_before=retain)


@pytest.fixture
def attacks():
    lrs = [1e-4, 1e-3]
    original = fake_attack(
        "original",
        1.0,
        {1e-4: [1.0, 0.95], 1e-3: [0.9, 0.85]},
        {1e-4: [1.0, 1.0], 1e-3: [0.9, 0.9]},
    )
    unlearned = fake_attack(
        "gd",
        0.25,
        {1e-4: [0.5, 0.7], 1e-3: [0.8, 0.75]},
        {1e-4: [0.5, 0.9], 1e-3: [0.6, 0.7]},  # the holdout prefers lr 1e-4, epoch 2
        retain=0.8,
    )
    control = fake_attack(
        "control", 0.25, {1e-4: [0.25, 0.3], 1e-3: [0.2, 0.25]}, {lr: [0.3, 0.2] for lr in lrs}
    )
    return original, unlearned, control


def test_build_results_numbers_and_selection(attacks):
    original, unlearned, control = attacks
    res = build_results({"GD": unlearned}, original, control, config={"who": "test"}, n_boot=300)
    (s,) = res["summary"]
    assert (s["dataset"], s["method"], s["chance"], s["n_questions"]) == ("world", "GD", 0.25, 40)
    assert s["original"] == 1.0 and s["unlearned"] == 0.25 and s["control"] == 0.25
    # optimistic: best V over the grid (shared across folds)
    assert s["original_rtt"] == 1.0 and s["unlearned_rtt"] == 0.8 and s["control_rtt"] == 0.3
    assert s["chosen"]["unlearned_rtt"] == [{"lr": 1e-3, "epoch": 1}]
    assert s["recovery"] == pytest.approx((0.8 - 0.25) / (1.0 - 0.25))
    assert s["recovery_raw"] == pytest.approx(0.8)
    lo, hi = s["recovery_ci"]
    assert lo <= s["recovery"] <= hi
    assert s["unlearned_rtt_ci"][0] <= 0.8 <= s["unlearned_rtt_ci"][1]
    # retain before and at the chosen point
    assert s["retain_original"] == 0.9 and s["retain_unlearned"] == 0.8
    assert s["retain_unlearned_rtt"] == pytest.approx(0.79)
    # honest: chosen on the holdout, V reported there
    h = s["honest"]
    assert h["chosen"]["unlearned_rtt"] == [{"lr": 1e-4, "epoch": 2}]
    assert h["unlearned_rtt"] == 0.7
    assert h["original_rtt"] == 1.0  # holdout tie at 1.0 -> smaller lr, earlier epoch
    assert h["chosen"]["original_rtt"] == [{"lr": 1e-4, "epoch": 1}]
    assert h["recovery"] == pytest.approx((0.7 - 0.25) / 0.75)
    # per fold
    assert [f["fold"] for f in res["folds"]] == FOLDS
    assert all(f["unlearned_rtt"] == 0.8 and f["n_questions"] == N for f in res["folds"])
    assert res["config"]["run"] == {"who": "test"}
    assert {a["role"] for a in res["attacks"]} == {"original", "control", "unlearned"}
    json.dumps(res, allow_nan=False)  # strict JSON


def test_without_holdout_only_the_optimistic_attacker_is_reported():
    o = fake_attack("o", 1.0, {1e-3: [1.0]})
    u = fake_attack("u", 0.25, {1e-3: [0.5]})
    res = build_results({"m": u}, o)
    (s,) = res["summary"]
    assert s["honest"] is None and s["control_rtt"] is None
    assert s["recovery"] == pytest.approx(1 / 3)
    assert "only the optimistic attacker" in render_markdown(res)


def test_several_seeds_average_and_widen_the_ci(attacks):
    original, unlearned, control = attacks
    worse = fake_attack(
        "gd", 0.25, {1e-4: [0.3, 0.3], 1e-3: [0.4, 0.3]}, {1e-4: [0.5, 0.5], 1e-3: [0.5, 0.5]}
    )
    one = build_results({"GD": unlearned}, original, control, n_boot=300)["summary"][0]
    two = build_results({"GD": [unlearned, worse]}, original, control, n_boot=300)["summary"][0]
    assert two["n_seeds"]["unlearned"] == 2
    assert two["unlearned_rtt"] == pytest.approx((0.8 + 0.4) / 2)
    assert two["chosen"]["unlearned_rtt"] == [{"lr": 1e-3, "epoch": 1}] * 2
    w1 = one["recovery_ci"][1] - one["recovery_ci"][0]
    w2 = two["recovery_ci"][1] - two["recovery_ci"][0]
    assert w2 > w1


def test_undefined_recovery_is_null_not_nan():
    o = fake_attack("o", 0.25, {1e-3: [0.2]})  # RTT leaves the original below chance
    u = fake_attack("u", 0.25, {1e-3: [0.5]})
    s = build_results({"m": u}, o)["summary"][0]
    assert s["recovery"] is None
    assert s["recovery_raw"] == pytest.approx(2.5)


def test_misaligned_attacks_are_refused(attacks):
    original, unlearned, _ = attacks
    unlearned.folds = unlearned.folds[:1]
    with pytest.raises(ValueError, match="different folds"):
        build_results({"GD": unlearned}, original)


def test_report_files_and_regeneration_from_json_alone(attacks, tmp_path: Path):
    original, unlearned, control = attacks
    res = build_results({"GD": unlearned, "RMU": control}, original, control, n_boot=200)
    paths = write_report(tmp_path, res)
    assert sorted(p for p in paths if p != "fig_budget_rtt.png") == sorted(RESULT_FILES)
    assert "fig_budget_rtt.png" in paths  # RTT fine-tunes: it has a budget figure
    for name in RESULT_FILES:
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "fig_recovery.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "report.md").read_text()
    assert "| world | GD |" in md and "Provenance" in md and "fig_rtt_curves.png" in md
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["method"] for r in rows] == ["GD", "RMU"]
    assert float(rows[0]["recovery"]) == pytest.approx(0.55 / 0.75)
    assert {"recovery_ci_lo", "recovery_ci_hi", "honest_recovery", "chosen_unlearned_rtt"} <= set(
        rows[0]
    )
    assert rows[0]["chosen_unlearned_rtt"] == "0.001@1"
    folds_csv = list(csv.DictReader((tmp_path / "results_folds.csv").open()))
    assert len(folds_csv) == 4
    # regenerate everything from results.json alone
    saved_csv, saved_md = (tmp_path / "results.csv").read_text(), md
    for name in RESULT_FILES[1:]:
        (tmp_path / name).unlink()
    regenerate(tmp_path)
    assert (tmp_path / "results.csv").read_text() == saved_csv
    assert (tmp_path / "report.md").read_text() == saved_md
    assert (tmp_path / "fig_rtt_curves.png").exists()
    assert load_results(tmp_path)["summary"] == json.loads(json.dumps(res["summary"]))


def test_report_cli(attacks, tmp_path: Path, cli):
    original, unlearned, control = attacks
    write_report(
        tmp_path, build_results({"GD": unlearned}, original, control, n_boot=100), plots=False
    )
    r = cli("report", tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["files"]
    assert (tmp_path / "fig_recovery.png").exists()
    r = cli("report", tmp_path / "missing")
    assert r.returncode == 2 and "not a directory" in r.stderr


def test_load_results_rejects_foreign_files(tmp_path: Path):
    with pytest.raises(UserError, match="no results.json"):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text('{"hello": 1}')
    with pytest.raises(UserError, match="not an rtteval results file"):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text("{")
    with pytest.raises(UserError, match="invalid JSON"):
        load_results(tmp_path)


def test_merge_results_and_terminal_table(attacks):
    original, unlearned, control = attacks
    a = build_results({"GD": unlearned}, original, control, dataset="years", n_boot=50)
    b = build_results({"GD": unlearned}, original, control, dataset="random_bd", n_boot=50)
    m = merge_results(a, b)
    assert m["datasets"] == ["years", "random_bd"]
    assert [(s["dataset"], s["method"]) for s in m["summary"]] == [
        ("years", "GD"),
        ("random_bd", "GD"),
    ]
    assert set(m["config"]["per_dataset"]) == {"years", "random_bd"}
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(summary_table(m))
    text = console.export_text()
    assert "random_bd" in text and "0.73" in text
    assert not math.isnan(m["summary"][0]["recovery"])


def _reworlded(a: ModelAttack, world: str) -> ModelAttack:
    """The same attack on another world: other V question ids, same folds and sizes."""
    d = a.to_dict()
    for f in d["folds"]:
        f["question_ids"] = [f"{world}-{q}" for q in f["question_ids"]]
    return ModelAttack.from_dict(d)


def test_one_world_per_seed_pairs_seeds_and_carries_regime_info(attacks):
    original, unlearned, control = attacks
    o2, u2, c2 = (_reworlded(a, "w2") for a in attacks)
    res = build_results(
        {"GD": [unlearned, u2]}, [original, o2], [control, c2], n_boot=200,
        info={"base_dataset": "world", "regime": "finetuned"},
    )  # fmt: skip
    (s,) = res["summary"]
    assert s["paired_seeds"] and s["n_seeds"] == {"unlearned": 2, "original": 2, "control": 2}
    assert (s["regime"], s["base_dataset"], s["train_splits"]) == ("finetuned", "world", 1)
    assert s["recovery"] == pytest.approx((0.8 - 0.25) / 0.75)
    assert all(f["regime"] == "finetuned" for f in res["folds"])
    # shared questions: not paired, defaults filled in
    plain = build_results({"GD": unlearned}, original, control, n_boot=50)["summary"][0]
    assert not plain["paired_seeds"] and plain["regime"] == "pretrained"
    assert plain["base_dataset"] == "world"
    # different questions with unequal seed counts cannot be paired
    with pytest.raises(ValueError, match="not paired"):
        build_results({"GD": [unlearned, u2]}, [original], control)


def test_floor_adjusted_recovery_and_a_control_above_chance_in_words():
    o = fake_attack("o", 1.0, {1e-3: [1.0]})
    u = fake_attack("u", 0.25, {1e-3: [0.8]})
    c = fake_attack("c", 0.25, {1e-3: [0.6]})  # RTT teaches the control 0.35 above chance
    (s,) = build_results({"m": u}, o, c, n_boot=300)["summary"]
    assert s["recovery_floor"] == pytest.approx((0.8 - 0.6) / (1.0 - 0.6))
    assert s["recovery_floor"] < s["recovery"]
    lo, hi = s["recovery_floor_ci"]
    assert lo <= s["recovery_floor"] <= hi
    assert s["control_rtt_ci"][0] > s["chance"]
    assert set(s["components"]) == {"unlearned_rtt", "recovery", "recovery_floor"}
    md = render_markdown(build_results({"m": u}, o, c, n_boot=300))
    assert "its CI lies **above chance**" in md and "floor-adjusted recovery is the primary" in md
    # a control at chance is said to be at chance
    c0 = fake_attack("c", 0.25, {1e-3: [0.25]})
    md = render_markdown(build_results({"m": u}, o, c0, n_boot=300))
    assert "its CI includes chance" in md and "above chance**" not in md


def _with_replicate(a: ModelAttack, acc: float) -> ModelAttack:
    """``a`` plus a second RTT replicate whose every run scores ``acc``."""
    d = a.to_dict()
    d["config"] = {**d["config"], "replicates": 2}
    for f in d["folds"]:
        extra = []
        for r in f["runs"]:
            r2 = json.loads(json.dumps(r))
            r2["replicate"] = 1
            for e in r2["epochs"]:
                e["v_acc"], e["v_correct"] = acc, "".join("1" if b else "0" for b in _bits(acc))
            extra.append(r2)
        f["runs"] += extra
    return ModelAttack.from_dict(d)


def test_replicates_are_averaged_kept_apart_and_widen_the_ci():
    o = fake_attack("o", 1.0, {1e-3: [1.0]})
    u = fake_attack("u", 0.25, {1e-3: [0.8]})
    o2, u2 = _with_replicate(o, 1.0), _with_replicate(u, 0.4)
    one = build_results({"m": u}, o, n_boot=300)
    two = build_results({"m": u2}, o2, n_boot=300)
    s1, s2 = one["summary"][0], two["summary"][0]
    assert s2["replicates"] == 2 and s2["unlearned_rtt"] == pytest.approx((0.8 + 0.4) / 2)
    w1 = s1["unlearned_rtt_ci"][1] - s1["unlearned_rtt_ci"][0]
    w2 = s2["unlearned_rtt_ci"][1] - s2["unlearned_rtt_ci"][0]
    assert w2 > w1
    # results.json keeps every replicate's curve
    rec = next(a for a in two["attacks"] if a["role"] == "unlearned")
    assert sorted(r["replicate"] for r in rec["folds"][0]["runs"]) == [0, 1]
    back = ModelAttack.from_dict(json.loads(json.dumps(rec)))
    assert back.correct_grid([(1e-3, 1)]).shape == (2, 1, 2 * N)
