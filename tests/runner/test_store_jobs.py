"""The store (SQLite WAL, one row per key) and jobs (content keys, the worker wrapper)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from rtteval.runner.jobs import (
    RESULT_FILE,
    Job,
    JobOutput,
    Task,
    finished_on_disk,
    job_key,
    job_kind,
    log_path_for,
    run_task,
)
from rtteval.runner.store import Store


def test_job_key_is_canonical_and_sensitive() -> None:
    a = job_key("unlearn", {"lr": 1e-3, "method": "gd"}, ["k1", "k2"])
    assert a == job_key("unlearn", {"method": "gd", "lr": 0.001}, ["k2", "k1"])
    assert a != job_key("unlearn", {"lr": 2e-3, "method": "gd"}, ["k1", "k2"])
    assert a != job_key("unlearn", {"lr": 1e-3, "method": "gd"}, ["k1", "k3"])
    assert a != job_key("attack", {"lr": 1e-3, "method": "gd"}, ["k1", "k2"])
    parent = Job.make("world", "w", {"seed": 0})
    child = Job.make("pretrain", "p", {"seed": 0}, [parent])
    other_parent = Job.make("world", "w", {"seed": 1})
    assert Job.make("pretrain", "p", {"seed": 0}, [other_parent]).key != child.key
    assert Job.make("pretrain", "p", {"seed": 0}, [parent], kind="fake").key != child.key


def test_store_upsert_record_counts_and_wal(tmp_path: Path) -> None:
    jobs = [Job.make("world", "w", {"i": 0}), Job.make("attack", "a", {"i": 1})]
    with Store.in_dir(tmp_path) as s:
        assert s.add_jobs(jobs) == 2
        assert s.add_jobs(jobs) == 0  # same keys: kept, never duplicated
        s.mark_running(jobs[0].key)
        s.record(jobs[0].key, "done", metrics={"x": 1.5}, artifacts={"d": {"path": "jobs/w"}})
        s.mark_running(jobs[1].key)
        assert s.reset_running() == 1
        row = s.get(jobs[0].key)
        assert row is not None and row.status == "done" and row.metrics == {"x": 1.5}
        assert row.attempts == 1 and row.finished is not None
        assert s.counts_by_stage() == {
            "world": {"pending": 0, "running": 0, "done": 1, "failed": 0, "diverged": 0,
                      "skipped": 0},
            "attack": {"pending": 1, "running": 0, "done": 0, "failed": 0, "diverged": 0,
                       "skipped": 0},
        }  # fmt: skip
        assert s.counts_by_stage([jobs[1].key]).keys() == {"attack"}
        with pytest.raises(ValueError):
            s.record(jobs[1].key, "weird")
    c = sqlite3.connect(tmp_path / "runs.db")
    assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(sqlite3.IntegrityError):
        c.execute(
            "INSERT INTO jobs(key, stage, name, config, deps, created) VALUES (?,?,?,?,?,?)",
            (jobs[0].key, "world", "dup", "{}", "[]", 0.0),
        )
    with Store.in_dir(tmp_path, readonly=True) as ro:
        assert ro.n_rows() == 2
        with pytest.raises(sqlite3.OperationalError):
            ro.conn.execute("DELETE FROM jobs")


@job_kind("_test_ok", uses_torch=False)
def _ok(config, deps, job_dir: Path):
    (job_dir / "f.txt").write_text("hi")
    print("hello from the job")
    return {"v": config["v"]}, {"file": Path("f.txt"), "note": "text"}


@job_kind("_test_diverged", uses_torch=False)
def _diverged(config, deps, job_dir: Path):
    return JobOutput({"loss": "nan"}, {}, "diverged")


@job_kind("_test_raise", uses_torch=False)
def _raise(config, deps, job_dir: Path):
    (job_dir / "partial.txt").write_text("half")
    raise ValueError("boom\nsecond line")


def _task(tmp: Path, kind: str, key: str = "k" * 64) -> Task:
    return Task(key=key, stage="s", kind=kind, name=kind, config={"v": 3}, deps=[],
                out_dir=str(tmp))  # fmt: skip


def test_run_task_success_moves_dir_into_place_and_logs(tmp_path: Path) -> None:
    res = run_task(_task(tmp_path, "_test_ok"), fd_level=False)
    assert res.status == "done" and res.metrics == {"v": 3} and res.error is None
    final = tmp_path / "jobs" / "s" / ("k" * 64)
    assert res.artifacts == {"file": {"path": f"jobs/s/{'k' * 64}/f.txt"}, "note": "text"}
    assert (final / "f.txt").read_text() == "hi"
    assert json.loads((final / RESULT_FILE).read_text())["status"] == "done"
    assert not [p for p in final.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    assert "hello from the job" in log_path_for(tmp_path, "s", "k" * 64).read_text()
    adopted = finished_on_disk(tmp_path, "s", "k" * 64)
    assert adopted is not None and adopted.metrics == {"v": 3}
    assert finished_on_disk(tmp_path, "s", "x" * 64) is None
    # a rerun replaces the directory atomically
    assert run_task(_task(tmp_path, "_test_ok"), fd_level=False).status == "done"


def test_run_task_failure_and_divergence(tmp_path: Path) -> None:
    res = run_task(_task(tmp_path, "_test_raise"), fd_level=False)
    assert res.status == "failed" and res.error == "ValueError: boom"
    assert not (tmp_path / "jobs" / "s" / ("k" * 64)).exists()  # nothing half-written
    assert "Traceback" in log_path_for(tmp_path, "s", "k" * 64).read_text()
    res = run_task(_task(tmp_path, "_test_diverged", "d" * 64), fd_level=False)
    assert res.status == "diverged"
    res = run_task(_task(tmp_path, "_no_such_kind", "n" * 64), fd_level=False)
    assert res.status == "failed" and "no job kind" in (res.error or "")
