"""The experiment runner: YAML study -> job DAG -> executors -> SQLite store -> report.

* :mod:`rtteval.config.study` — the study config (pydantic) and YAML loading with line numbers;
* :mod:`rtteval.runner.plan` — config -> jobs (world, pretrain, finetune, unlearn, select, attack);
* :mod:`rtteval.runner.jobs` — job keys (content hashes), the kind registry, the worker wrapper;
* :mod:`rtteval.runner.kinds` — the built-in job kinds;
* :mod:`rtteval.runner.executors` — sequential, local processes, Ray;
* :mod:`rtteval.runner.store` — the SQLite (WAL) store the driver alone writes;
* :mod:`rtteval.runner.driver` — the scheduling loop, resume, and the report step.

See ``docs/runner.md``.
"""

from rtteval.runner.jobs import Dep, Job, JobOutput, job_key, job_kind
from rtteval.runner.store import STATUSES, Store

__all__ = ["STATUSES", "Dep", "Job", "JobOutput", "Store", "job_key", "job_kind"]
