"""Jobs: what a unit of work is, its content key, the kind registry, and the worker wrapper.

A job is (stage, name, config, deps).  Its key is the SHA-256 of the
canonical JSON of its stage, config and its dependencies' keys, so the key
changes exactly when anything that determines its output changes (its own
settings or any upstream job's), and two plans of the same study agree on
every key: that is what makes "re-run the same command" resume.

A *job kind* is a function registered by stage name with
``@job_kind("pretrain")``.  It runs in a worker (the driver process, a pool
process or a Ray task), receives ``(config, deps, job_dir)`` and returns
``(metrics, artifacts)`` or ``(metrics, artifacts, status)``.  It writes its
files into ``job_dir``, which is a fresh temporary directory that
:func:`run_task` renames into place only once the job has returned: a job
directory is therefore complete or absent, whatever kills the worker.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from rtteval.atomic import write_json_atomic

#: Modules whose import registers the built-in job kinds (imported lazily so
#: that neither the driver nor a worker imports torch before it needs it).
KIND_MODULES = ("rtteval.runner.kinds", "rtteval.runner.testing")
RESULT_FILE = "_job.json"


# --------------------------------------------------------------------------- jobs and keys


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace, floats in repr form: the same value always hashes the same."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def job_key(stage: str, config: dict[str, Any], dep_keys: list[str] | tuple[str, ...]) -> str:
    """SHA-256 of the canonical JSON of (stage, config, sorted dependency keys)."""
    payload = canonical_json({"stage": stage, "config": config, "deps": sorted(dep_keys)})
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True)
class Job:
    """One node of the study DAG.  ``kind`` defaults to ``stage`` (tests swap in fakes)."""

    stage: str
    name: str
    config: dict[str, Any]
    deps: tuple[str, ...] = ()
    kind: str = ""
    key: str = ""

    @classmethod
    def make(
        cls, stage: str, name: str, config: dict[str, Any], deps: list[Job] | tuple[Job, ...] = (),
        *, kind: str | None = None,
    ) -> Job:  # fmt: skip
        dep_keys = tuple(d.key for d in deps)
        cfg = json.loads(canonical_json(config))  # plain JSON types only, as stored
        k = kind or stage
        if k != stage:
            cfg = {**cfg, "_kind": k}
        return cls(stage, name, cfg, dep_keys, k, job_key(stage, cfg, dep_keys))


@dataclass
class Dep:
    """A finished dependency as a job sees it: its metrics and artifacts (paths resolved)."""

    key: str
    stage: str
    name: str
    status: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    artifacts: dict[str, Any]


class JobOutput(NamedTuple):
    metrics: dict[str, Any]
    artifacts: dict[str, Any]
    status: str = "done"


KindFn = Callable[[dict[str, Any], list[Dep], Path], Any]


@dataclass(frozen=True)
class KindInfo:
    fn: KindFn
    #: Run in the driver process even with a process/Ray executor: cheap
    #: bookkeeping (selection) is not worth a worker round trip.
    inline: bool = False
    uses_torch: bool = True
    #: Whether the job wants an accelerator when the executor has them.
    gpu: bool = True


KINDS: dict[str, KindInfo] = {}


def job_kind(
    stage: str, *, inline: bool = False, uses_torch: bool = True, gpu: bool = True
) -> Callable[[KindFn], KindFn]:
    """Register ``fn`` as the job kind ``stage``."""

    def deco(fn: KindFn) -> KindFn:
        if stage in KINDS and KINDS[stage].fn is not fn:
            raise ValueError(f"job kind {stage!r} registered twice")
        KINDS[stage] = KindInfo(fn, inline, uses_torch, gpu)
        return fn

    return deco


def get_kind(kind: str) -> KindInfo:
    if kind not in KINDS:
        for mod in KIND_MODULES:
            importlib.import_module(mod)
    if kind not in KINDS:
        raise KeyError(f"no job kind {kind!r}; known: {', '.join(sorted(KINDS))}")
    return KINDS[kind]


# --------------------------------------------------------------------------- artifacts


def encode_artifacts(
    artifacts: dict[str, Any], tmp_dir: Path, job_dir: Path, out_dir: Path
) -> dict[str, Any]:
    """Path values -> ``{"path": <relative to OUT>}`` (paths in the temp dir moved to the job dir).

    Stored relative so an output directory can be moved or mounted elsewhere
    (a Ray cluster's shared filesystem) and still resume.
    """
    out: dict[str, Any] = {}
    for k, v in artifacts.items():
        if isinstance(v, Path):
            p = v if v.is_absolute() else tmp_dir / v
            with contextlib.suppress(ValueError):
                p = job_dir / p.relative_to(tmp_dir)
            try:
                out[k] = {"path": str(p.relative_to(out_dir))}
            except ValueError:
                out[k] = {"path": str(p)}
        else:
            out[k] = v
    return out


def decode_artifacts(artifacts: dict[str, Any] | None, out_dir: Path) -> dict[str, Any]:
    """Inverse of :func:`encode_artifacts`: ``{"path": ...}`` -> absolute :class:`Path`."""
    res: dict[str, Any] = {}
    for k, v in (artifacts or {}).items():
        if isinstance(v, dict) and set(v) == {"path"}:
            p = Path(v["path"])
            res[k] = p if p.is_absolute() else out_dir / p
        else:
            res[k] = v
    return res


def job_dir_for(out_dir: Path, stage: str, key: str) -> Path:
    return out_dir / "jobs" / stage / key


def log_path_for(out_dir: Path, stage: str, key: str) -> Path:
    return out_dir / "logs" / stage / f"{key}.log"


# --------------------------------------------------------------------------- tasks


@dataclass
class Task:
    """Everything a worker needs to run one job; plain data so it pickles (spawn, Ray)."""

    key: str
    stage: str
    kind: str
    name: str
    config: dict[str, Any]
    deps: list[Dep]
    out_dir: str
    threads: int | None = None
    attempt: int = 1
    #: Whether the job asks for a GPU (Ray requests ``num_gpus`` only for these).
    gpu: bool = True


@dataclass
class TaskResult:
    key: str
    status: str
    metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    wall_time: float = 0.0
    worker: str = ""


@contextlib.contextmanager
def capture_output(log: Path, fd_level: bool) -> Iterator[Any]:
    """Send the job's output to its log file.

    In a worker process (``fd_level``) file descriptors 1 and 2 are
    redirected, so output from C extensions and subprocesses lands in the
    log too; in the driver only ``sys.stdout``/``sys.stderr`` are swapped,
    so the driver's own console is untouched afterwards.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    f = open(log, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - closed below
    saved: tuple[int, int] | None = None
    try:
        if fd_level:
            sys.stdout.flush()
            sys.stderr.flush()
            saved = (os.dup(1), os.dup(2))
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
        with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            yield f
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        if saved is not None:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        f.close()


@contextlib.contextmanager
def _torch_threads(n: int | None, uses_torch: bool) -> Iterator[None]:
    if not n or not uses_torch:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _first_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text.splitlines()[0] if text else type(e).__name__


def finalize_dir(tmp: Path, final: Path) -> None:
    """Move a finished temp job dir into place, replacing a stale one (a retried job's)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(5):
        if final.exists():
            trash = final.parent / f".{final.name}.old-{os.getpid()}-{time.monotonic_ns()}"
            with contextlib.suppress(FileNotFoundError):
                final.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            tmp.rename(final)
            return
        except OSError:  # another finisher won the race: try again
            time.sleep(0.05)
    tmp.rename(final)


def sweep_leftovers(out_dir: Path) -> int:
    """Remove the temp and trash dirs of jobs killed mid-save; returns how many.

    Call only while holding the study's run lock: then no live driver (and,
    since workers die with their driver, no live worker) can own them.
    """
    n = 0
    for d in (out_dir / "jobs").glob("*/.*"):
        if d.is_dir() and (".tmp-" in d.name or ".old-" in d.name):
            shutil.rmtree(d, ignore_errors=True)
            n += 1
    return n


def run_task(task: Task, *, fd_level: bool = True) -> TaskResult:
    """Run one job in this process; never raises for a job's own error (it becomes ``failed``)."""
    out = Path(task.out_dir)
    final = job_dir_for(out, task.stage, task.key)
    log = log_path_for(out, task.stage, task.key)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{task.key}.tmp-", dir=final.parent))
    t0 = time.perf_counter()
    worker = f"{os.uname().nodename}:{os.getpid()}"
    status, metrics, artifacts, error = "failed", {}, {}, None
    try:
        info = get_kind(task.kind)
    except KeyError as e:
        info, error = None, _first_line(e)
    if info is not None:
        with capture_output(log, fd_level) as f:
            print(
                f"=== {task.name} key={task.key} attempt={task.attempt} "
                f"worker={worker} {time.strftime('%Y-%m-%d %H:%M:%S')}",
                file=f,
            )
            try:
                with _torch_threads(task.threads, info.uses_torch):
                    res = info.fn(task.config, task.deps, tmp)
                res = JobOutput(*res) if not isinstance(res, JobOutput) else res
                status, metrics = res.status, dict(res.metrics)
                artifacts = encode_artifacts(dict(res.artifacts), tmp, final, out)
                if status not in ("done", "diverged", "skipped"):
                    raise ValueError(f"job kind {task.kind!r} returned unknown status {status!r}")
            except Exception as e:
                status, error = "failed", _first_line(e)
                traceback.print_exc(file=f)
            print(f"=== {status} in {time.perf_counter() - t0:.1f} s", file=f)
    wall = time.perf_counter() - t0
    if status == "failed":
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        write_json_atomic(
            tmp / RESULT_FILE,
            {"key": task.key, "status": status, "metrics": metrics, "artifacts": artifacts,
             "wall_time": wall},
        )  # fmt: skip
        finalize_dir(tmp, final)
    return TaskResult(task.key, status, metrics, artifacts, error, wall, worker)


def finished_on_disk(out_dir: Path, stage: str, key: str) -> TaskResult | None:
    """A job whose directory is complete but whose result never reached the store.

    Happens when the driver is killed between a worker finishing and the
    store write; the job is adopted instead of recomputed.
    """
    p = job_dir_for(out_dir, stage, key) / RESULT_FILE
    try:
        d = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if d.get("key") != key or d.get("status") not in ("done", "diverged", "skipped"):
        return None
    return TaskResult(
        key, d["status"], d.get("metrics") or {}, d.get("artifacts") or {}, None,
        float(d.get("wall_time") or 0.0), "adopted",
    )  # fmt: skip
