"""The attack suite as a study: the shipped configs/attacks.yaml, and resuming after SIGKILL."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from rtteval.attacks import ATTACKS
from rtteval.config.study import load_config
from rtteval.runner.plan import build_plan
from tests.attacks._nontraining import micro_study

REPO = Path(__file__).resolve().parents[2]


def test_the_shipped_attack_suite_validates_and_names_every_registered_attack() -> None:
    """A new attack must be added to configs/attacks.yaml (and so to the suite's table)."""
    path = REPO / "configs" / "attacks.yaml"
    cfg = load_config(path, check_paths=False).config
    assert sorted(a.name for a in cfg.attacks) == sorted(ATTACKS)
    demo = load_config(REPO / "configs" / "demo.yaml", check_paths=False).config
    # the demo's models: same world, pretraining, methods and seeds
    assert cfg.model == demo.model and cfg.datasets == demo.datasets
    assert [m.name for m in cfg.methods] == [m.name for m in demo.methods]
    assert cfg.seeds == demo.seeds == [0, 1]
    plan = build_plan(cfg)
    attacked = {j.job.config["attack"] for j in plan.jobs if j.job.stage == "attack"}
    assert attacked == set(ATTACKS)


def _done(out: Path) -> dict[str, str]:
    """Finished attack jobs: key -> stage (from the study's store)."""
    c = sqlite3.connect(out / "runs.db")
    try:
        rows = c.execute("SELECT key, stage, status FROM jobs").fetchall()
    finally:
        c.close()
    return {k: s for k, s, st in rows if st == "done"}


def test_an_attack_suite_study_resumes_after_sigkill(tmp_path: Path, cli, pretrained_tiny) -> None:
    """SIGKILL the driver after some attacks finished; a rerun completes without redoing them."""
    out = tmp_path / "suite"
    p = tmp_path / "suite.yaml"
    p.write_text(
        micro_study(
            "suite",
            out,
            pretrained_tiny,
            [
                "{name: unrelated_relearn, ks: [4, all], lr: 3.0e-3, epochs: 2, folds: [split_0]}",
                "{name: quantize, schemes: [int8-channel, int4-group], folds: [split_0]}",
                "{name: probe, folds: [split_0]}",
            ],
            plots=True,
        )
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rtteval.cli", "run", str(p)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            done: dict[str, str] = {}
            if (out / "runs.db").exists():
                with contextlib.suppress(sqlite3.OperationalError):
                    done = _done(out)
            if sum(1 for s in done.values() if s == "attack") >= 2:
                break
            assert proc.poll() is None, "the study finished before it could be killed"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = {k: s for k, s in _done(out).items() if s == "attack"}
    n_attacks = 3 * 3  # attacks x arms, one fold
    assert 2 <= len(before) < n_attacks
    mtimes = {k: (out / "jobs" / "attack" / k / "attack.json").stat().st_mtime_ns for k in before}
    res = cli("run", p)
    assert res.returncode == 0, res.stderr
    after = _done(out)
    assert sum(1 for s in after.values() if s == "attack") == n_attacks
    for k, m in mtimes.items():  # reused, not recomputed
        assert (out / "jobs" / "attack" / k / "attack.json").stat().st_mtime_ns == m
    results = json.loads((out / "results.json").read_text())
    assert {e["attack"] for e in results["summary"]} == {"unrelated_relearn", "quantize", "probe"}
    for name in ("unrelated_relearn", "quantize", "probe"):  # each from YAML, on every arm
        rows = [a for a in results["attacks"] if a["dataset"] == f"w [{name}]"]
        assert {a["role"] for a in rows} == {"original", "control", "unlearned"}, name
    assert all(
        a["config"]["lrs"] == [4.0, 16.0]
        for a in results["attacks"]
        if a["dataset"] == "w [unrelated_relearn]"
    )
    ov = results["overview"]
    assert ov["attacks"] == ["unrelated_relearn", "quantize", "probe"]  # diagnostics last
    (worst,) = ov["worst_case"]
    assert worst["method"] == "gd" and worst["attack"] != "probe"
    assert (out / "fig_attacks.png").is_file()
    md = (out / "report.md").read_text()
    assert "## Across attacks — worst case per method" in md and "`probe` is a diagnostic" in md
