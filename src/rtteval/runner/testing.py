"""A cheap fake job kind, for testing the runner machinery in seconds.

With ``debug.fake_jobs: true`` every job of the real plan (same stages,
names, dependencies and keys scheme) runs this instead: it sleeps
``debug.sleep`` seconds, writes a small file, and appends one line to
``OUT/_fake_runs/<key>`` so a test can count how often each job actually
executed (a resumed study must not re-run finished jobs).  Its metrics are
deterministic in the job key, so two executors must record identical ones.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

from rtteval.runner.jobs import Dep, JobOutput, job_kind


def fake_value(key: str, salt: str = "") -> float:
    return int(hashlib.sha256((key + salt).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


@job_kind("fake", uses_torch=False, gpu=False)
def fake_job(config: dict[str, Any], deps: list[Dep], job_dir: Path) -> JobOutput:
    rt = config.get("_runtime", {})
    key = job_dir.name.split(".tmp-")[0].lstrip(".")
    out_dir = job_dir.parents[2]
    runs = out_dir / "_fake_runs"
    runs.mkdir(exist_ok=True)
    fd = os.open(runs / key, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, f"{os.getpid()} {time.time()}\n".encode())
    finally:
        os.close(fd)
    print(f"fake job {key} with {len(deps)} deps")
    if rt.get("sleep"):
        time.sleep(float(rt["sleep"]))
    if rt.get("fail"):
        raise RuntimeError("fake failure (debug.fail)")
    dep_sum = sum(float(d.metrics.get("value", 0.0)) for d in deps)
    value = round(fake_value(key) + dep_sum, 9)
    (job_dir / "out.txt").write_text(f"{key} {value}\n")
    metrics = {
        "value": value,
        "forget_acc": round(fake_value(key, "f"), 6),
        "retain_acc": round(fake_value(key, "r"), 6),
        "n_deps": len(deps),
    }
    return JobOutput(metrics, {"out": Path("out.txt")})
