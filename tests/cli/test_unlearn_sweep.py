"""``rtteval unlearn --sweep`` is a one-stage study: the same points and selection as single runs."""

from __future__ import annotations

import json
from pathlib import Path

from rtteval.stages.unlearn import select_point


def _unlearn(pretrained_tiny: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "unlearn", "--model", str(pretrained_tiny["original"]), "--data",
        str(pretrained_tiny["world"]), "--method", "gd", "--max-steps", "6",
        "--eval-every-steps", "3", "--out", str(out), *extra,
    ]  # fmt: skip


def test_sweep_selects_the_point_single_runs_select(pretrained_tiny, tmp_path: Path, cli) -> None:
    lrs = [1e4, 1e-5, 3e-3]  # 1e4 diverges; the sweep records it and goes on
    out = tmp_path / "sweep"
    args = _unlearn(pretrained_tiny, out, "--grid", json.dumps({"lr": lrs}))
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    sw = json.loads((out / "sweep.json").read_text())
    assert [p["params"] for p in sw["points"]] == [{"lr": lr} for lr in lrs]
    assert sw["points"][0]["status"] == "diverged" and sw["points"][0]["message"]
    # each point again as a single run (the command without --sweep)
    singles = []
    for i, lr in enumerate(lrs):
        one = tmp_path / f"one{i}"
        r1 = cli(*_unlearn(pretrained_tiny, one, "--lr", str(lr)))
        assert r1.returncode == (1 if i == 0 else 0), r1.stderr  # the diverged run writes no model
        singles.append(json.loads((one / "metrics.json").read_text()))
    rows = [
        {"status": m["status"], "forget_acc": m["after"]["forget_acc"],
         "retain_acc": m["after"]["retain_acc"]}
        for m in singles
    ]  # fmt: skip
    for p, row in zip(sw["points"], rows, strict=True):
        assert (p["status"], p["forget_acc"], p["retain_acc"]) == tuple(row.values())
    chosen = select_point(rows, singles[0]["before"]["retain_acc"], 0.05)
    assert chosen is not None and sw["selected"] == chosen and sw["points"][chosen]["selected"]
    # OUT holds the selected point's model, the very weights its single run wrote
    weights = (out / "model.safetensors").read_bytes()
    assert weights == (tmp_path / f"one{chosen}" / "model.safetensors").read_bytes()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model_written"] and metrics["after"] == singles[chosen]["after"]
    assert json.loads(r.stdout.strip().splitlines()[-1])["selected"] == chosen
    # run again: every job is found by content and nothing is recomputed
    again = cli(*args)
    assert again.returncode == 0, again.stderr
    assert "(0 new, 4 already finished)" in again.stderr and "] done " not in again.stderr
    assert (out / "model.safetensors").read_bytes() == weights


def test_sweep_with_no_qualifying_point_writes_no_model(pretrained_tiny, tmp_path: Path, cli):
    out = tmp_path / "sweep"
    r = cli(*_unlearn(pretrained_tiny, out, "--grid", '{"lr": [1e4]}'))
    assert r.returncode == 1, r.stderr  # no model written
    sw = json.loads((out / "sweep.json").read_text())
    assert sw["selected"] is None and "nothing selected" in sw["note"]
    assert not sw["points"][0]["selected"] and sw["points"][0]["status"] == "diverged"
    assert not (out / "model.safetensors").exists()
    assert json.loads((out / "metrics.json").read_text())["model_written"] is False
