"""The runner end to end on the real plan with fake jobs (seconds), plus the real pipeline.

Fake jobs (``debug.fake_jobs``) keep the plan, keys, store and executors
real but replace each job's work by a short sleep and a file, and count
every execution in ``OUT/_fake_runs/<key>`` so resume can be checked.
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

import pytest

from rtteval.config.study import load_config
from rtteval.runner.driver import run_study
from rtteval.runner.store import Store

STUDY = """\
name: fake
output_dir: {out}
model:
  tiny: {{preset: micro}}
datasets:
  - name: w
    world: {{preset: tiny, seed: 0}}
methods:
  - name: gd
    grid: {{lr: [1.0e-3, 3.0e-3]}}
  - name: rmu
    grid: {{steering_coef: [10.0, 20.0]}}
attacks:
  - name: rtt
    lrs: [1.0e-3, 3.0e-3]
    epochs: 2
executor: {{kind: sequential}}
retries: 1
debug: {{fake_jobs: true, sleep: {sleep}}}
"""
N_JOBS = 1 + 2 + 4 + 2 + 20  # world, pretrain x2, unlearn 2x2, select x2, attack 4 models x 5 folds


def _config(tmp_path: Path, name: str, sleep: float = 0.0) -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(STUDY.format(out=tmp_path / name, sleep=sleep))
    return p


def _run(path: Path, *overrides: str):
    return run_study(load_config(path, list(overrides)), say=lambda _m: None)


def _runs(out: Path) -> dict[str, int]:
    d = out / "_fake_runs"
    return {p.name: len(p.read_text().splitlines()) for p in d.iterdir()} if d.is_dir() else {}


def _db(out: Path) -> list[tuple]:
    c = sqlite3.connect(out / "runs.db")
    try:
        return c.execute("SELECT key, name, status, metrics FROM jobs ORDER BY key").fetchall()
    finally:
        c.close()


def test_sequential_then_rerun_skips_everything(tmp_path: Path) -> None:
    p = _config(tmp_path, "a")
    s = _run(p)
    assert s.n_jobs == N_JOBS and s.ran == N_JOBS and not s.failed
    assert {st: sum(c[st] for c in s.counts.values()) for st in ("done",)} == {"done": N_JOBS}
    out = tmp_path / "a"
    assert set(_runs(out).values()) == {1}
    s2 = _run(p)
    assert s2.ran == 0 and set(_runs(out).values()) == {1}
    # a changed RTT grid re-runs the attacks only; everything upstream is reused
    s3 = _run(p, "attacks.0.epochs=3")
    assert s3.ran == 20
    with Store.in_dir(out, readonly=True) as st:
        assert st.n_rows() == N_JOBS + 20
        plan_keys = st.get_meta("plan")["keys"]
        assert sum(c["done"] for c in st.counts_by_stage(plan_keys).values()) == N_JOBS


def test_processes_match_sequential(tmp_path: Path) -> None:
    seq = _run(_config(tmp_path, "seq"))
    par = _run(_config(tmp_path, "par"), "executor.kind=processes", "executor.workers=2")
    assert seq.counts == par.counts
    assert [r for r in _db(tmp_path / "seq")] == [r for r in _db(tmp_path / "par")]
    logs = list((tmp_path / "par" / "logs" / "attack").glob("*.log"))
    assert len(logs) == 20 and "fake job" in logs[0].read_text()


def test_failures_retry_block_dependants_and_resume(tmp_path: Path, cli) -> None:
    p = _config(tmp_path, "f")
    out = tmp_path / "f"
    s = _run(p, "debug.fail=['pretrain control w s0']")
    assert len(s.failed) == 1 and "fake failure" in s.failed[0]
    assert s.counts["pretrain"]["failed"] == 1
    assert s.counts["attack"]["pending"] == 5  # the control's attacks wait
    assert s.counts["attack"]["done"] == 15
    runs = _runs(out)
    row = next(r for r in _db(out) if r[1] == "pretrain control w s0")
    assert runs[row[0]] == 2  # first try + 1 retry
    res = cli("status", out)
    assert res.returncode == 0
    st = json.loads(res.stdout.strip().splitlines()[-1])
    assert st["totals"]["failed"] == 1 and st["totals"]["pending"] == 5
    assert "fake failure" in res.stderr
    s2 = _run(p)  # the failure is gone: the rerun finishes the study and only that
    assert s2.ran == 6 and not s2.failed
    assert sum(c["done"] for c in s2.counts.values()) == N_JOBS


def test_finished_job_dir_is_adopted_not_rerun(tmp_path: Path) -> None:
    p = _config(tmp_path, "ad")
    out = tmp_path / "ad"
    _run(p)
    c = sqlite3.connect(out / "runs.db")
    with c:
        c.execute("UPDATE jobs SET status='running' WHERE stage='unlearn'")  # as if killed
    c.close()
    s = _run(p)
    assert s.adopted == 4 and s.ran == 0
    assert set(_runs(out).values()) == {1}


def test_sigkill_and_resume(tmp_path: Path, cli) -> None:
    """SIGKILL the driver mid-study; a rerun completes it without redoing finished jobs."""
    ref = _run(_config(tmp_path, "ref"))
    p = _config(tmp_path, "k", sleep=0.3)
    out = tmp_path / "k"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rtteval.cli", "run", str(p), "executor.kind=processes",
         "executor.workers=2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            done = 0
            if (out / "runs.db").exists():
                with contextlib.suppress(sqlite3.OperationalError):
                    done = sum(1 for r in _db(out) if r[2] == "done")
            if done >= 8:
                break
            assert proc.poll() is None, "the study finished before it could be killed"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = {r[0]: r[2] for r in _db(out)}
    n_done = sum(1 for s in before.values() if s == "done")
    assert 8 <= n_done < N_JOBS
    mtimes = {
        k: (out / "jobs" / next(iter(r[1].split())) / k / "out.txt").stat().st_mtime_ns
        for k, r in ((r[0], r) for r in _db(out))
        if before[k] == "done"
    }
    time.sleep(0.5)  # let the killed workers' SIGKILL (PDEATHSIG) land
    res = cli("run", p)
    assert res.returncode == 0, res.stderr
    rows = _db(out)
    assert len(rows) == len({r[0] for r in rows}) == len({r[1] for r in rows}) == N_JOBS
    assert (
        sum(1 for r in rows if r[2] == "done")
        == sum(c["done"] for c in ref.counts.values())
        == N_JOBS
    )
    # finished jobs were reused, not recomputed; at most the 2 in-flight ones ran twice
    for k, m in mtimes.items():
        stage = next(r[1] for r in rows if r[0] == k).split()[0]
        assert (out / "jobs" / stage / k / "out.txt").stat().st_mtime_ns == m
    runs = _runs(out)
    assert all(runs[k] == 1 for k in mtimes)
    assert sum(1 for n in runs.values() if n > 1) <= 2
    # same metrics as the uninterrupted run
    assert [r[3] for r in rows] == [r[3] for r in _db(tmp_path / "ref")]


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="Ray not installed (pip install 'rtteval[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_matches_sequential_fake(tmp_path: Path, local_ray) -> None:
    seq = _run(_config(tmp_path, "seq"))
    ray_ = _run(_config(tmp_path, "ray"), "executor.kind=ray")
    assert seq.counts == ray_.counts and not ray_.failed
    assert _db(tmp_path / "seq") == _db(tmp_path / "ray")
    assert local_ray.is_initialized()  # the executor reused the instance and left it running


REAL = """\
name: real
output_dir: {out}
model:
  tiny:
    preset: micro
    pretrain: {{batch_size: 32, max_epochs: 150}}
datasets:
  - name: w
    world: {{preset: tiny, seed: 0}}
methods:
  - name: gd
    grid: {{lr: [1.0e-4, 3.0e-4]}}
    fixed: {{max_steps: 20, retain_coef: 2.0}}
  - name: rmu
    grid: {{steering_coef: [10.0, 40.0]}}
    fixed: {{max_steps: 20}}
selection: {{retain_threshold: 0.5}}
attacks:
  - name: rtt
    lrs: [1.0e-3, 3.0e-3]
    epochs: 2
executor: {{kind: sequential, threads_per_worker: 1}}
report: {{n_boot: 100, plots: false}}
"""


def _numbers(results: dict) -> dict:
    drop = {"wall_time", "created", "meta"}

    def clean(o):
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items() if k not in drop}
        if isinstance(o, list):
            return [clean(v) for v in o]
        return o

    return clean({k: results[k] for k in ("summary", "folds", "attacks")})


@pytest.mark.slow
def test_real_study_local_and_ray_identical(tmp_path: Path, local_ray, cli) -> None:
    """Acceptance: 2 methods x 2 points x all folds x 2 RTT lrs, same results.json numbers."""
    outs = {}
    for name, extra in (("local", []), ("ray", ["executor.kind=ray"])):
        p = tmp_path / f"{name}.yaml"
        p.write_text(REAL.format(out=tmp_path / name))
        s = _run(p, *extra)
        assert not s.failed, s.failed
        assert s.report is not None and "results.json" in s.report["files"]
        outs[name] = json.loads((tmp_path / name / "results.json").read_text())
    a, b = outs["local"], outs["ray"]
    assert {e["method"] for e in a["summary"]} == {"gd", "rmu"}
    assert len(a["folds"]) == 2 * 5 and a["attacks"][0]["config"]["lrs"] == [1e-3, 3e-3]
    assert _numbers(a) == _numbers(b)
    res = cli("report", tmp_path / "ray")  # regenerates from results.json alone
    assert res.returncode == 0, res.stderr

    # Partial results, as after a kill: the original's last fold and one rmu fold not done.
    out = tmp_path / "local"
    c = sqlite3.connect(out / "runs.db")
    with c:
        c.execute("UPDATE jobs SET status='pending' WHERE name IN (?, ?)",
                  ("attack original w s0 split_4", "attack rmu w s0 split_0"))  # fmt: skip
    c.close()
    (out / "results.json").unlink()
    res = cli("status", out, "--report")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["totals"]["pending"] == 2 and info["report"]["partial"]
    part = json.loads((out / "results.json").read_text())
    assert [e["method"] for e in part["summary"]] == ["gd"]
    assert part["summary"][0]["folds"] == ["split_0", "split_1", "split_2", "split_3"]
    assert any("rmu" in m for m in part["config"]["run"]["missing"])
    assert cli("report", out).returncode == 0
