"""The results store: one SQLite database per study output directory.

Why SQLite: a study is hundreds of jobs, and "which jobs are done" must
survive any crash, including SIGKILL in the middle of a write.  SQLite in WAL
mode gives atomic, durable transactions from the standard library, and a
reader (``rtteval status``) never blocks the writer.

Only the driver process writes the database.  Workers (processes, Ray tasks
on other machines) return their results to the driver, which records them;
so there is never more than one writer and no cross-machine locking on a
network filesystem, where SQLite locking is unreliable.

A job's row is keyed by its content hash (:func:`rtteval.runner.jobs.job_key`),
so re-planning the same study finds the same rows, and ``key`` being the
PRIMARY KEY makes a duplicated job row impossible.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rtteval.errors import UserError

#: Job statuses.  ``done``, ``diverged`` and ``skipped`` are final and count
#: as success for dependants (a diverged unlearning point is a valid result:
#: the selection step needs to know it diverged); ``failed`` is retried.
STATUSES = ("pending", "running", "done", "failed", "diverged", "skipped")
FINAL_OK = frozenset({"done", "diverged", "skipped"})
SCHEMA_VERSION = 1
DB_NAME = "runs.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    key        TEXT PRIMARY KEY,
    stage      TEXT NOT NULL,
    name       TEXT NOT NULL,
    status     TEXT NOT NULL DEFAULT 'pending',
    attempts   INTEGER NOT NULL DEFAULT 0,
    config     TEXT NOT NULL,
    deps       TEXT NOT NULL,
    metrics    TEXT,
    artifacts  TEXT,
    error      TEXT,
    created    REAL NOT NULL,
    started    REAL,
    finished   REAL,
    wall_time  REAL
);
CREATE INDEX IF NOT EXISTS jobs_stage_status ON jobs(stage, status);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


@dataclass
class JobRow:
    """One row of the ``jobs`` table, JSON columns decoded."""

    key: str
    stage: str
    name: str
    status: str
    attempts: int
    config: dict[str, Any]
    deps: list[str]
    metrics: dict[str, Any] | None = None
    artifacts: dict[str, Any] | None = None
    error: str | None = None
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    wall_time: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _dumps(obj: Any) -> str | None:
    return None if obj is None else json.dumps(obj, sort_keys=True, default=str)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


class Store:
    """The ``runs.db`` of an output directory.

    ``readonly=True`` opens it for ``rtteval status``/``report`` without
    creating anything, so inspecting a directory never modifies it.
    """

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        try:
            self._open()
        except sqlite3.DatabaseError as e:
            with contextlib.suppress(AttributeError, sqlite3.Error):
                self.conn.close()
            raise UserError(
                f"corrupt study database ({e}); move it aside (mv {self.path} "
                f"{self.path}.corrupt) and rerun `rtteval run`: finished jobs are adopted from "
                "their directories under jobs/, the others run again",
                file=self.path,
            ) from None
        self.conn.row_factory = sqlite3.Row

    def _open(self) -> None:
        if self.readonly:
            uri = f"file:{self.path}?mode=ro"
            self.conn = sqlite3.connect(uri, uri=True, timeout=30, check_same_thread=False)
            self.conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # is it a database?
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
            self.conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed job survives power loss too, not only a process kill.
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.executescript(_SCHEMA)
            with self.tx():
                self.conn.execute(
                    "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )

    @classmethod
    def in_dir(cls, out_dir: str | Path, *, readonly: bool = False) -> Store:
        return cls(Path(out_dir) / DB_NAME, readonly=readonly)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """An IMMEDIATE transaction: all of its writes land, or none do."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # ------------------------------------------------------------------ writes

    def add_jobs(self, jobs: Iterable[Any]) -> int:
        """Insert planned jobs as ``pending``; rows that exist (any status) are kept as they are.

        ``jobs`` are :class:`rtteval.runner.jobs.Job` objects (anything with
        ``key``, ``stage``, ``name``, ``config``, ``deps``).  Returns the number
        of new rows.
        """
        now = time.time()
        n = 0
        with self.tx() as c:
            for j in jobs:
                cur = c.execute(
                    "INSERT OR IGNORE INTO jobs(key, stage, name, status, attempts, config, deps,"
                    " created) VALUES (?, ?, ?, 'pending', 0, ?, ?, ?)",
                    (j.key, j.stage, j.name, _dumps(j.config), _dumps(list(j.deps)), now),
                )
                n += cur.rowcount
        return n

    def mark_running(self, key: str) -> None:
        with self.tx() as c:
            c.execute(
                "UPDATE jobs SET status='running', attempts=attempts+1, started=?, error=NULL"
                " WHERE key=?",
                (time.time(), key),
            )

    def record(
        self,
        key: str,
        status: str,
        *,
        metrics: dict[str, Any] | None = None,
        artifacts: dict[str, Any] | None = None,
        error: str | None = None,
        wall_time: float | None = None,
    ) -> None:
        """Record a finished job (any final status) in one transaction."""
        if status not in STATUSES:
            raise ValueError(f"unknown job status {status!r}")
        with self.tx() as c:
            c.execute(
                "UPDATE jobs SET status=?, metrics=?, artifacts=?, error=?, finished=?,"
                " wall_time=? WHERE key=?",
                (status, _dumps(metrics), _dumps(artifacts), error, time.time(), wall_time, key),
            )

    def update_artifacts(self, key: str, artifacts: dict[str, Any]) -> None:
        with self.tx() as c:
            c.execute("UPDATE jobs SET artifacts=? WHERE key=?", (_dumps(artifacts), key))

    def reset_running(self) -> int:
        """Back to ``pending`` every ``running`` row: left by a driver that was killed.

        Safe because the caller holds the output directory's lock, so no
        other driver is running these jobs.
        """
        with self.tx() as c:
            return c.execute("UPDATE jobs SET status='pending' WHERE status='running'").rowcount

    def set_meta(self, key: str, value: Any) -> None:
        with self.tx() as c:
            c.execute(
                "INSERT INTO meta(key, value) VALUES (?, ?)"
                " ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (key, json.dumps(value, default=str)),
            )

    # ------------------------------------------------------------------ reads

    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None else json.loads(row["value"])

    def get(self, key: str) -> JobRow | None:
        row = self.conn.execute("SELECT * FROM jobs WHERE key=?", (key,)).fetchone()
        return None if row is None else self._row(row)

    def rows(self, stage: str | None = None, status: str | None = None) -> list[JobRow]:
        q, args = "SELECT * FROM jobs", []
        cond = []
        if stage is not None:
            cond.append("stage=?")
            args.append(stage)
        if status is not None:
            cond.append("status=?")
            args.append(status)
        if cond:
            q += " WHERE " + " AND ".join(cond)
        q += " ORDER BY created, name"
        return [self._row(r) for r in self.conn.execute(q, args).fetchall()]

    def counts_by_stage(self, keys: Iterable[str] | None = None) -> dict[str, dict[str, int]]:
        """``{stage: {status: n}}``, over all rows or only those in ``keys`` (the current plan)."""
        wanted = set(keys) if keys is not None else None
        out: dict[str, dict[str, int]] = {}
        for r in self.conn.execute("SELECT key, stage, status FROM jobs").fetchall():
            if wanted is not None and r["key"] not in wanted:
                continue
            st = out.setdefault(r["stage"], {s: 0 for s in STATUSES})
            st[r["status"]] = st.get(r["status"], 0) + 1
        return out

    def n_rows(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])

    @staticmethod
    def _row(r: sqlite3.Row) -> JobRow:
        return JobRow(
            key=r["key"],
            stage=r["stage"],
            name=r["name"],
            status=r["status"],
            attempts=int(r["attempts"]),
            config=_loads(r["config"]) or {},
            deps=_loads(r["deps"]) or [],
            metrics=_loads(r["metrics"]),
            artifacts=_loads(r["artifacts"]),
            error=r["error"],
            created=r["created"],
            started=r["started"],
            finished=r["finished"],
            wall_time=r["wall_time"],
        )
