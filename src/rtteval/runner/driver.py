"""The driver loop: schedule ready jobs, record each result, write the report.

Resume is not a mode, it is what running does: the plan is rebuilt from the
config, its jobs are inserted into the store (existing rows are kept),
``running`` rows left by a killed driver go back to ``pending``, and only
jobs not yet ``done``/``diverged``/``skipped`` are run.  A job whose
directory is complete on disk but whose result never reached the store (the
driver died in between) is adopted rather than re-run.  So a SIGKILL loses
at most the jobs that were in flight.

Failed jobs are retried up to ``retries`` more times within one invocation,
and again on every new invocation (a failure may have been an OOM or a lost
node); their dependants wait, and the rest of the study goes on.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rtteval.atomic import write_text_atomic
from rtteval.config.study import ExecutorSpec, LoadedConfig, StudyConfig
from rtteval.errors import UserError
from rtteval.outputs import ResumableOutput
from rtteval.runner.executors import (
    Executor,
    ProcessExecutor,
    RayExecutor,
    SequentialExecutor,
    detect_gpus,
)
from rtteval.runner.jobs import (
    Dep,
    Task,
    TaskResult,
    decode_artifacts,
    finished_on_disk,
    get_kind,
    log_path_for,
    run_task,
    sweep_leftovers,
)
from rtteval.runner.plan import Plan, build_plan
from rtteval.runner.store import FINAL_OK, Store

REPORT_EVERY_S = 60.0


@dataclass
class RunSummary:
    out_dir: Path
    n_jobs: int
    counts: dict[str, dict[str, int]]
    ran: int = 0
    adopted: int = 0
    failed: list[str] = field(default_factory=list)
    blocked: int = 0
    report: dict[str, Any] | None = None
    wall_time: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out_dir),
            "jobs": self.n_jobs,
            "ran": self.ran,
            "adopted": self.adopted,
            "failed": self.failed,
            "blocked": self.blocked,
            "counts": self.counts,
            "report": self.report,
            "wall_time": round(self.wall_time, 2),
        }


LOCK_NAME = ".rtteval.lock"
#: How long a starting driver retries the lock: :func:`driver_alive` holds it for an instant.
LOCK_WAIT_S = 1.0


class DirLock:
    """An exclusive lock on an output directory: one driver per study at a time.

    ``flock`` is released by the kernel when the process dies, SIGKILL
    included, so a killed driver never leaves a stale lock behind, and
    :func:`driver_alive` can tell a running study from a killed one.
    """

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / LOCK_NAME
        self.fd: int | None = None

    def __enter__(self) -> DirLock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                os.close(self.fd)
                self.fd = None
                raise UserError(
                    "another `rtteval run` is using this output directory", file=self.path.parent
                ) from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def driver_alive(out_dir: Path) -> bool:
    """Whether a driver holds ``out_dir``'s lock, i.e. its ``running`` jobs are really running.

    Probes with a shared lock taken and dropped at once (read-only: creates
    nothing); a driver starting in that instant retries (``LOCK_WAIT_S``).
    """
    try:
        fd = os.open(out_dir / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return False  # never locked: no driver has run here
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def make_executor(spec: ExecutorSpec) -> Executor:
    """An executor for the config (see :class:`rtteval.config.study.ExecutorSpec`)."""
    workers = None if spec.workers == "auto" else int(spec.workers)
    if spec.kind == "sequential":
        return SequentialExecutor(spec.threads_per_worker)
    if spec.kind == "processes":
        n_gpus = detect_gpus()
        per = int(spec.gpus_per_job) if spec.gpus_per_job else 1
        if n_gpus and spec.gpus_per_job != 0:
            return ProcessExecutor(
                workers, spec.threads_per_worker, gpus=list(range(n_gpus)), gpus_per_worker=per
            )
        return ProcessExecutor(workers, spec.threads_per_worker or 1)
    return RayExecutor(
        spec.address,
        num_cpus=spec.cpus_per_job,
        num_gpus=spec.gpus_per_job,
        threads_per_worker=spec.threads_per_worker,
        max_in_flight=workers,
        local_num_cpus=workers,
    )


class Driver:
    """Runs a study's plan against its store with one executor."""

    def __init__(
        self,
        cfg: StudyConfig,
        plan: Plan,
        store: Store,
        executor: Executor,
        *,
        say: Callable[[str], None] = print,
        tracker: Any = None,
    ) -> None:
        self.cfg, self.plan, self.store, self.ex = cfg, plan, store, executor
        self.out = Path(cfg.output_dir)
        self.say = say
        self.tracker = tracker
        self.by_key = plan.by_key
        self.status: dict[str, str] = {}
        self.tries: Counter[str] = Counter()
        self.in_flight: set[str] = set()
        self.summary = RunSummary(self.out, len(plan.jobs), {})
        self.last_report = time.monotonic()
        self.report_dirty = False

    # ------------------------------------------------------------------ helpers

    def _deps(self, key: str) -> list[Dep]:
        out = []
        for dk in self.by_key[key].job.deps:
            r = self.store.get(dk)
            assert r is not None
            out.append(
                Dep(dk, r.stage, r.name, r.status, r.config, r.metrics or {},
                    decode_artifacts(r.artifacts, self.out))
            )  # fmt: skip
        return out

    def _task(self, key: str) -> Task:
        pj = self.by_key[key]
        info = get_kind(pj.job.kind)
        return Task(
            key=key, stage=pj.job.stage, kind=pj.job.kind, name=pj.job.name,
            config={**pj.job.config, "_runtime": pj.runtime}, deps=self._deps(key),
            out_dir=str(self.out), attempt=self.tries[key] + 1, gpu=info.gpu,
        )  # fmt: skip

    def _record(self, res: TaskResult) -> None:
        key = res.key
        pj = self.by_key[key]
        self.in_flight.discard(key)
        self.store.record(
            key, res.status, metrics=res.metrics, artifacts=res.artifacts, error=res.error,
            wall_time=res.wall_time,
        )  # fmt: skip
        self.status[key] = res.status
        if self.tracker is not None:
            self.tracker.log_job(pj.job.stage, pj.job.name, res.status, res.metrics)
        done = sum(1 for s in self.status.values() if s in FINAL_OK)
        head = f"[{done}/{len(self.plan.jobs)}] {res.status:8s} {pj.job.name}"
        if res.status == "failed":
            log = log_path_for(self.out, pj.job.stage, key)
            retry = self.tries[key] <= self.cfg.retries
            self.say(f"{head}: {res.error} (log: {log}){'; will retry' if retry else ''}")
        else:
            self.say(
                f"{head} ({res.wall_time:.1f} s{', adopted' if res.worker == 'adopted' else ''})"
            )
        if pj.job.stage == "attack" and res.status == "done":
            self.report_dirty = True

    def _ready(self) -> tuple[list[str], int]:
        """Pending jobs whose dependencies are all final-ok (plan order), and the blocked count."""
        ready, blocked = [], 0
        for pj in self.plan.jobs:
            k = pj.job.key
            st = self.status.get(k)
            if k in self.in_flight or st in FINAL_OK:
                continue
            if st == "failed" and self.tries[k] > self.cfg.retries:
                continue
            dep_st = [self.status.get(d) for d in pj.job.deps]
            if any(s == "skipped" for s in dep_st):
                ready.append(k)  # recorded as skipped without running
            elif all(s in FINAL_OK for s in dep_st):
                ready.append(k)
            elif any(
                s == "failed" and self.tries[d] > self.cfg.retries
                for d, s in zip(pj.job.deps, dep_st, strict=True)
            ) or any(self._is_blocked(d) for d in pj.job.deps):
                blocked += 1
        return ready, blocked

    def _is_blocked(self, key: str, _seen: set[str] | None = None) -> bool:
        st = self.status.get(key)
        if st in FINAL_OK:
            return False
        if st == "failed" and self.tries[key] > self.cfg.retries:
            return True
        return any(self._is_blocked(d) for d in self.by_key[key].job.deps)

    # ------------------------------------------------------------------ the loop

    def run(self) -> RunSummary:
        t0 = time.perf_counter()
        for r in self.store.rows():
            if r.key in self.by_key:
                self.status[r.key] = r.status
        try:
            while True:
                ready, blocked = self._ready()
                self.summary.blocked = blocked
                launched = False
                for key in ready:
                    pj = self.by_key[key]
                    if any(self.status.get(d) == "skipped" for d in pj.job.deps):
                        self.store.mark_running(key)
                        self._record(
                            TaskResult(key, "skipped", {"note": "an upstream job was skipped"})
                        )
                        launched = True
                        continue
                    adopted = finished_on_disk(self.out, pj.job.stage, key)
                    if adopted is not None:
                        self.store.mark_running(key)
                        self._record(adopted)
                        self.summary.adopted += 1
                        launched = True
                        continue
                    info = get_kind(pj.job.kind)
                    if info.inline:
                        self.store.mark_running(key)
                        self.tries[key] += 1
                        self.in_flight.add(key)
                        self._record(run_task(self._task(key), fd_level=False))
                        self.summary.ran += 1
                        launched = True
                        continue
                    if len(self.in_flight) >= self.ex.slots:
                        continue
                    task = self._task(key)
                    self.store.mark_running(key)
                    self.tries[key] += 1
                    self.status[key] = "running"
                    self.in_flight.add(key)
                    self.ex.submit(task)
                    launched = True
                if not self.in_flight:
                    if launched:
                        continue  # inline/adopted/skipped results may have unblocked more jobs
                    break
                for res in self.ex.wait(timeout=None):
                    self._record(res)
                    self.summary.ran += 1
                self._maybe_report(final=False)
        finally:
            self.ex.close()
            if self.tracker is not None:
                self.tracker.finish()
        self.summary.counts = self.store.counts_by_stage(self.by_key)
        self.summary.failed = [
            f"{r.name}: {r.error}" for r in self.store.rows(status="failed") if r.key in self.by_key
        ]
        self.summary.wall_time = time.perf_counter() - t0
        return self.summary

    def _maybe_report(self, *, final: bool) -> None:
        if self.cfg.debug.fake_jobs or not self.report_dirty:
            return
        if not final and time.monotonic() - self.last_report < REPORT_EVERY_S:
            return
        self.write_report(plots=final and self.cfg.report.plots)

    def write_report(self, *, plots: bool, final: bool = False) -> dict[str, Any] | None:
        """results.json (+ csv, report.md, plots) from the attacks done so far.

        The ``final`` report is written whatever happened: without a result
        it is a report.md that says why (:func:`~rtteval.runner.results.write_study_report`);
        while the study runs, a report is only written once there is a result.
        """
        from rtteval.runner.results import write_study_report

        self.last_report = time.monotonic()
        self.report_dirty = False
        info = write_study_report(
            self.plan, self.store, self.out, n_boot=self.cfg.report.n_boot, study=self.cfg.name,
            plots=plots, keys=list(self.by_key), explain=final,
        )  # fmt: skip
        if info is not None:
            self.summary.report = info
        return info


def run_study(
    loaded: LoadedConfig,
    *,
    say: Callable[[str], None] = print,
    executor: Executor | None = None,
    output_kind: str = "study",
    stages: tuple[str, ...] | None = None,
) -> RunSummary:
    """Plan, run and report a study; re-running the same config resumes it.

    ``output_kind`` marks the output directory (:mod:`rtteval.outputs`):
    ``rtteval attack`` runs a one-stage study into an ``attack`` output.
    ``stages`` runs only those stages' jobs (and what they need), without a
    report: ``rtteval unlearn --sweep`` is the unlearn and select stages.
    """
    cfg = loaded.config
    target = ResumableOutput(cfg.output_dir, overwrite=False, kind=output_kind)
    before = set(os.listdir(target.path)) if target.path.is_dir() else set()
    foreign = before - set(target.entries)
    out = target.open()
    try:
        with DirLock(out):
            return _run_locked(cfg, out, say=say, executor=executor, stages=stages)
    finally:
        # everything the study wrote is rtteval's, so a later --overwrite may replace it
        target.add(*(set(os.listdir(out)) - foreign))


def _run_locked(
    cfg: StudyConfig,
    out: Path,
    *,
    say: Callable[[str], None],
    executor: Executor | None,
    stages: tuple[str, ...] | None,
) -> RunSummary:
    """:func:`run_study`'s work, under the output directory's lock."""
    import yaml

    swept = sweep_leftovers(out)
    if swept:
        say(f"removed {swept} unfinished job dir(s) left by a killed run")
    plan = build_plan(cfg)
    if stages is not None:
        plan = plan.restricted(stages)
    for note in plan.notes:
        say(f"note: {note}")
    with Store.in_dir(out) as store:
        stale = store.reset_running()
        if stale:
            say(f"resuming: {stale} job(s) were running when the last driver stopped")
        new = store.add_jobs(p.job for p in plan.jobs)
        from rtteval.runner.results import groups_meta

        store.set_meta(
            "plan",
            {"study": cfg.name, "keys": [p.job.key for p in plan.jobs],
             "groups": groups_meta(plan), "n_boot": cfg.report.n_boot},
        )  # fmt: skip
        write_text_atomic(
            out / "study.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
        )
        done_before = sum(
            1 for p in plan.jobs
            if (r := store.get(p.job.key)) is not None and r.status in FINAL_OK
        )  # fmt: skip
        say(
            f"study {cfg.name!r}: {len(plan.jobs)} jobs ({new} new, {done_before} already "
            f"finished) -> {out}"
        )
        from rtteval.runner.tracking import Tracker

        tracker = Tracker(cfg.logging, cfg.name, cfg.model_dump(mode="json"))
        ex = executor if executor is not None else make_executor(cfg.executor)
        drv = Driver(cfg, plan, store, ex, say=say, tracker=tracker)
        summary = drv.run()
        if not cfg.debug.fake_jobs and stages is None:
            drv.write_report(plots=cfg.report.plots, final=True)
        return summary
