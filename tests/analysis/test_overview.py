"""The methods × attacks overview: the worst case is the maximum over real attacks, never a probe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rtteval.analysis.overview import (
    FIGURE,
    OPTIMISM_NOTE,
    build_overview,
    overview_markdown,
    with_overview,
)
from rtteval.analysis.report import render_markdown


def _row(method: str, attack: str, rec: float, floor: float | None, **kw: Any) -> dict[str, Any]:
    label = "w" if attack == "rtt" else f"w [{attack}]"
    return {
        "dataset": label, "base_dataset": "w", "regime": "pretrained", "method": method,
        "attack": attack, "train_splits": 4, "recovery": rec,
        "recovery_ci": [rec - 0.1, rec + 0.1], "recovery_floor": floor,
        "recovery_floor_ci": None if floor is None else [floor - 0.2, floor + 0.2], **kw,
    }  # fmt: skip


def _summary() -> list[dict[str, Any]]:
    return [
        _row("gd", "rtt", 0.5, 0.4),
        _row("gd", "icl", 0.7, 0.6),
        _row("gd", "probe", 0.95, 0.9),  # the highest, but a diagnostic
        _row("rmu", "rtt", 0.8, 0.7),
        _row("rmu", "icl", 0.2, None),  # no control: the method falls back to chance-adjusted
        _row("rmu", "probe", 0.1, 0.05),
        _row("gd", "rtt", 0.99, 0.99, train_splits=1),  # a smaller-T row: not the attack's row
    ]


def test_worst_case_is_the_highest_real_attack_in_one_kind_of_number() -> None:
    ov = build_overview({"summary": _summary()})
    assert ov is not None and ov["attacks"] == ["rtt", "icl", "probe"]  # rtt first, probe last
    worst = {w["method"]: w for w in ov["worst_case"]}
    assert (worst["gd"]["attack"], worst["gd"]["metric"], worst["gd"]["recovery"]) == (
        "icl", "recovery_floor", 0.6,
    )  # fmt: skip
    assert worst["gd"]["ci"] == pytest.approx([0.4, 0.8]) and worst["gd"]["compared"] == [
        "rtt",
        "icl",
    ]
    # rmu: icl has no floor, so every rmu cell and its worst case are chance-adjusted
    assert (worst["rmu"]["attack"], worst["rmu"]["metric"], worst["rmu"]["recovery"]) == (
        "rtt", "recovery", 0.8,
    )  # fmt: skip
    cells = {(c["method"], c["attack"]): c for c in ov["cells"]}
    assert cells[("gd", "rtt")]["recovery"] == 0.4  # the full-T row, not the |T|=1 one
    assert cells[("gd", "probe")]["diagnostic"] and not cells[("gd", "icl")]["diagnostic"]
    assert cells[("rmu", "icl")]["metric"] == "recovery"


def test_one_attack_has_no_overview_and_the_report_is_unchanged(tmp_path: Path) -> None:
    only_rtt = [e for e in _summary() if e["attack"] == "rtt"]
    assert build_overview({"summary": only_rtt}) is None
    assert "overview" not in with_overview({"summary": only_rtt, "overview": {"stale": 1}})


def test_the_report_section_and_heatmap(tmp_path: Path) -> None:
    results = with_overview({"summary": _summary()})
    md = "\n".join(overview_markdown(results))
    assert "## Across attacks — worst case per method" in md and OPTIMISM_NOTE in md
    assert "| w | gd | 0.40 [0.20, 0.60] | 0.60 [0.40, 0.80] | 0.90 [0.70, 1.10] |" in md
    assert "probe (diagnostic)" in md and "`probe` is a diagnostic, not a recovery" in md
    assert "| w | gd | `icl` | 0.60 [0.40, 0.80] | floor-adjusted | rtt, icl |" in md
    from rtteval.analysis.overview import plot_overview

    assert plot_overview(results, tmp_path / FIGURE) and (tmp_path / FIGURE).stat().st_size > 0
    assert not plot_overview({"summary": []}, tmp_path / "none.png")
    assert "Across attacks" not in render_markdown({"summary": [], "config": {}})
