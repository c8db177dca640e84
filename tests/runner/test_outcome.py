"""What a study says about itself when it did not simply succeed (issue 13: 3, 5, 16, 17).

A killed driver's jobs must not show as running, an interrupted run must say how to resume, and
a study that produced no result must say so, in a report and in its exit status.
"""

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

from rtteval.runner.driver import DirLock

FAKE = """\
name: fake
output_dir: {out}
model:
  tiny: {{preset: micro}}
datasets:
  - name: w
    world: {{preset: tiny, seed: 0}}
methods:
  - name: gd
    grid: {{lr: [1.0e-3]}}
attacks:
  - name: rtt
    lrs: [1.0e-3]
    epochs: 1
    folds: [split_0, split_1]
executor: {{kind: sequential}}
debug: {{fake_jobs: true, sleep: {sleep}}}
"""


def _fake(tmp_path: Path, sleep: float = 0.0) -> tuple[Path, Path]:
    p = tmp_path / "fake.yaml"
    p.write_text(FAKE.format(out=tmp_path / "out", sleep=sleep))
    return p, tmp_path / "out"


def _n_done(out: Path) -> int:
    if not (out / "runs.db").exists():
        return 0
    with contextlib.suppress(sqlite3.OperationalError), sqlite3.connect(out / "runs.db") as c:
        return c.execute("SELECT COUNT(*) FROM jobs WHERE status='done'").fetchone()[0]
    return 0


def test_status_tells_a_killed_driver_from_a_live_one(tmp_path: Path, cli) -> None:
    p, out = _fake(tmp_path)
    assert cli("run", p).returncode == 0
    c = sqlite3.connect(out / "runs.db")
    with c:  # as a SIGKILLed driver leaves them
        c.execute("UPDATE jobs SET status='running' WHERE stage='unlearn' OR name LIKE '%split_0'")
    c.close()
    res = cli("status", out)
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert res.returncode == 0 and info["driver_running"] is False
    assert info["totals"]["running"] == 0 and info["interrupted"] == 4
    assert info["totals"]["pending"] == 4
    assert "interrupted" in res.stderr
    with DirLock(out):  # a live driver holds the lock: its running jobs are running
        res = cli("status", out)
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["driver_running"] is True and info["totals"]["running"] == 4
    assert info["interrupted"] == 0 and "interrupted" not in res.stderr


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_says_what_finished_and_how_to_resume(tmp_path: Path, cli) -> None:
    """SIGINT (Ctrl-C) through the console entry point: exit 130 and one line with the resume command."""
    p, out = _fake(tmp_path, sleep=0.1)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "rtteval.cli", "run", str(p), "retries=0"]
    # as from a terminal: a shell that started this suite in the background (CI harnesses, `cmd &`)
    # passes SIGINT down as ignored, and Python then installs no KeyboardInterrupt handler
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env, preexec_fn=_default_sigint)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _n_done(out) < 2:
            assert proc.poll() is None, "the study finished before it could be interrupted"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err
    n = _n_done(out)
    assert 2 <= n < 11
    assert last == (
        f"rtteval: interrupted: {n} of 11 jobs finished and are kept; "
        f"resume with: rtteval run {p} retries=0"
    )
    res = cli(*last.split("resume with: rtteval ")[1].split())  # the printed command resumes
    assert res.returncode == 0, res.stderr
    assert _n_done(out) == 11


DIVERGE = """\
name: div
output_dir: {out}
model:
  hf: {{path: {model}}}
datasets:
  - name: w
    path: {world}
methods:
{methods}
attacks:
  - name: rtt
    lrs: [1.0e-3]
    epochs: 1
    folds: [split_0]
executor: {{kind: sequential, threads_per_worker: 1}}
report: {{n_boot: 20, plots: false}}
"""
BLOWS_UP = "  - {name: gd, label: gd_huge, grid: {lr: [1.0e+6]}, fixed: {max_steps: 3}}\n"
GENTLE = "  - {name: gd, label: gd_gentle, grid: {lr: [1.0e-6]}, fixed: {max_steps: 2}}\n"


def test_a_study_where_every_method_diverged_says_so(tmp_path: Path, cli, pretrained_tiny) -> None:
    out = tmp_path / "out"

    def config(methods: str) -> Path:
        p = tmp_path / "div.yaml"
        p.write_text(DIVERGE.format(out=out, model=pretrained_tiny["original"],
                                    world=pretrained_tiny["world"], methods=methods))  # fmt: skip
        return p

    res = cli("run", config(BLOWS_UP))
    assert res.returncode == 3, res.stderr
    errs = [ln for ln in res.stderr.splitlines() if ln.startswith("rtteval:")]
    assert len(errs) == 1 and "produced no result (unlearn: 1 diverged;" in errs[0]
    assert errs[0].endswith(f"see {out / 'report.md'}")
    assert not (out / "results.json").exists()
    md = (out / "report.md").read_text()
    assert md.startswith("# RTT report: no result")
    assert "- w: gd_huge seed 0: no grid point selected (1 of 1 diverged)" in md
    row = next(ln for ln in md.splitlines() if ln.startswith("| unlearn gd_huge"))
    assert "| diverged |" in row and "exceeded" in row and "at step" in row
    assert "| attack original w s0 split_0 |" in md  # what did finish is reported
    assert json.loads(res.stdout.strip().splitlines()[-1])["report"]["result"] is False

    (out / "report.md").unlink()
    res = cli("status", out, "--report")  # the truth, not "no attack finished"
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert res.returncode == 0 and info["report"]["result"] is False
    assert "report: report.md (no result: unlearn: 1 diverged;" in res.stderr
    assert (out / "report.md").read_text().startswith("# RTT report: no result")

    # a method that works joins: a partial result, which reports what it has and what it lacks
    res = cli("run", config(BLOWS_UP + GENTLE))
    assert res.returncode == 0, res.stderr
    results = json.loads((out / "results.json").read_text())
    assert [e["method"] for e in results["summary"]] == ["gd_gentle"]
    assert results["config"]["run"]["partial"] is True
    md = (out / "report.md").read_text()
    assert "**Partial results.**" in md and "gd_huge seed 0: no grid point selected" in md
    assert (
        "Unlearning grid points that diverged" in md and "1000000.0" in md.split("## Divergence")[1]
    )
