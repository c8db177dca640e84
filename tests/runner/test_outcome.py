"""What a study says about itself when it did not simply succeed (issue 13: 3, 5, 16, 17).

A killed driver's jobs must not show as running, an interrupted run must say how to resume, and
a study that produced no result must say so, in a report and in its exit status.
"""

from __future__ import annotations

import json
import sqlite3
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
attack:
  lrs: [1.0e-3]
  epochs: 1
executor: {{kind: sequential}}
debug: {{fake_jobs: true, sleep: {sleep}}}
"""


def _fake(tmp_path: Path, sleep: float = 0.0) -> tuple[Path, Path]:
    p = tmp_path / "fake.yaml"
    p.write_text(FAKE.format(out=tmp_path / "out", sleep=sleep))
    return p, tmp_path / "out"


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
