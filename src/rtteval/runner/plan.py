"""Study config -> job DAG.

For every seed and dataset::

    world ──> pretrain original ──> unlearn (one per grid point) ──> select ──> attack (per fold)
          └─> pretrain control ─────────────────────────────────────────────> attack (per fold)
                         original ───────────────────────────────────────────> attack (per fold)

With ``model.hf`` there is no world or pretrain job: the original is the
loaded model (or a ``finetune`` job's output when the dataset has
``finetune_first``, in which case the base model is the control).  A tiny
model with ``finetune_first`` has no "pretrain original": the original is
the control fine-tuned on the forget facts (``pretrain control ──> finetune``).

Pretraining jobs carry no dataset name, so two dataset entries on the same
world (the pretrained and the fine-tuned regime) share their world and
control.  ``world.vary_with_seed`` makes one world per seed.  Each extra
``datasets[].t_sizes`` entry repeats every attack with a smaller T, as its own
attack groups under the dataset label ``"<name> |T|=k"``.

Attacks on the original and the control do not depend on any method, so
they are shared by all methods and run as soon as their model exists.  Each
entry of ``attacks:`` gets its own jobs on every arm (settings under the
attack's name in the job config); an attack other than RTT reports under the
dataset label ``"<name> [attack]"``.

Job configs hold everything that determines a job's output (so it goes into
the key) and nothing that does not: the device, batch size of evaluation and
the like travel in :attr:`PlannedJob.runtime`, so moving a study from CPU to
GPU or changing workers never invalidates finished jobs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rtteval.config.study import DatasetSpec, StudyConfig
from rtteval.errors import ConfigError
from rtteval.runner.jobs import Job

#: Placeholder fold used by --dry-run when a dataset's splits are unknown (data not present).
UNKNOWN_FOLD = "*"
STAGES = ("world", "finetune", "pretrain", "unlearn", "select", "attack")
#: Stages that train, so take the study's ``precision``.
TRAINING_STAGES = ("finetune", "pretrain", "unlearn", "attack")


@dataclass
class PlannedJob:
    job: Job
    runtime: dict[str, Any] = field(default_factory=dict)


@dataclass
class AttackGroup:
    """The attack jobs of one model (role) on one dataset and seed, in fold order."""

    dataset: str
    seed: int
    role: str  # original | control | unlearned
    label: str
    method: str | None
    keys: list[str]
    folds: list[str]
    select_key: str | None = None
    base_dataset: str | None = None  # the dataset entry, when ``dataset`` is a |T| variant
    regime: str = "pretrained"  # when the facts were learned: pretrained | finetuned
    train_splits: int | None = None  # |T| of this group's folds (None: all splits but V)
    attack: str = "rtt"  # the registered attack that ran


@dataclass
class _Scope:
    """One (dataset, seed) of the plan: what its jobs share."""

    dataset: str
    tag: str
    seed: int
    splits: list[str] | None  # forget split names (None: unknown until the data exists)
    data_cfg: dict[str, Any]
    base_deps: list[Job]
    regime: str
    t_sizes: list[int]


@dataclass
class Plan:
    jobs: list[PlannedJob]
    groups: list[AttackGroup]
    notes: list[str] = field(default_factory=list)

    @property
    def by_key(self) -> dict[str, PlannedJob]:
        return {p.job.key: p for p in self.jobs}

    def restricted(self, stages: tuple[str, ...]) -> Plan:
        """The jobs of ``stages`` and everything they depend on (``unlearn --sweep``: no attacks)."""
        by_key = self.by_key
        keep: set[str] = set()
        todo = [p.job.key for p in self.jobs if p.job.stage in stages]
        while todo:
            k = todo.pop()
            if k not in keep:
                keep.add(k)
                todo.extend(by_key[k].job.deps)
        groups = [g for g in self.groups if set(g.keys) <= keep]
        return Plan([p for p in self.jobs if p.job.key in keep], groups, self.notes)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.jobs:
            out[p.job.stage] = out.get(p.job.stage, 0) + 1
        return out


def fingerprint_dir(path: str | Path, *, max_hash_bytes: int = 256 << 20) -> str:
    """A content hash of a dataset directory's ``*.jsonl`` and ``manifest.json`` files.

    Content rather than mtimes, so a copied dataset still matches its
    finished jobs; files beyond ``max_hash_bytes`` in total contribute their
    size only, which keeps planning fast on very large corpora.
    """
    root = Path(path)
    if not root.is_dir():
        return "missing"
    h = hashlib.sha256()
    budget = max_hash_bytes
    for f in sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")):
        if f.suffix != ".jsonl" and f.name != "manifest.json":
            continue
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        if size <= budget:
            budget -= size
            with open(f, "rb") as fh:
                for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:32]


def fingerprint_model(path: str | Path) -> str:
    """A content hash of a model directory: every file's name and bytes (weights included).

    A model given by path (``model.hf.path``, ``unlearned[].path``, ``rtteval
    attack --model``) enters its jobs' keys by content: a model retrained or
    edited at the same path is not mistaken for the old one, and a copied
    or ``touch``ed one still matches its finished jobs.  Hashing reads the
    whole model once per plan (docs/runner.md gives the cost).
    """
    root = Path(path)
    if not root.is_dir():
        return "missing"
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        h.update(f"{rel}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:32]


def model_ref(ref: Any, **extra: Any) -> dict[str, Any]:
    """A job config's model: hub ``id``, or local ``path`` plus its content fingerprint."""
    out: dict[str, Any] = {"id": ref.id, "path": ref.path, **extra}
    if ref.path is not None:
        out["fingerprint"] = fingerprint_model(ref.path)
    return out


def _split_names(ds: DatasetSpec, i: int, *, dry_run: bool) -> list[str] | None:
    """Forget split names from the config, the world's config, or the data; None if unknown."""
    if ds.world is not None:
        return ds.world.split_names()
    if ds.splits is not None:
        return list(ds.splits)
    assert ds.path is not None
    if dry_run and (ds.path.startswith("hf://") or not Path(ds.path).is_dir()):
        return None
    from rtteval.data import load_dataset

    kept = set(ds.retain_splits or [])
    return [n for n in load_dataset(ds.path).split_names if n not in kept]


def build_plan(cfg: StudyConfig, *, dry_run: bool = False) -> Plan:
    """All jobs of a study, dependencies first.  Reads dataset directories, never loads a model."""
    planner = _Planner(cfg)
    for di, ds in enumerate(cfg.datasets):
        planner.plan_dataset(di, ds, dry_run=dry_run)
    names = [p.job.name for p in planner.jobs]
    if len(set(names)) != len(names):  # pragma: no cover - a planning bug, not a user error
        dup = sorted({n for n in names if names.count(n) > 1})
        raise RuntimeError(f"duplicate job names in plan: {dup[:3]}")
    return Plan(planner.jobs, planner.groups, planner.notes)


def _data_cfg(ds: DatasetSpec) -> dict[str, Any]:
    """A dataset's part of its jobs' configs: where the data is and a hash of its content."""
    data_cfg: dict[str, Any]
    if ds.world is not None:
        data_cfg = {"from": "world"}
    else:
        assert ds.path is not None
        data_cfg = {"path": ds.path, "fingerprint": fingerprint_dir(ds.path)}
    if ds.retain is not None:
        data_cfg["retain"] = ds.retain
        data_cfg["retain_fingerprint"] = fingerprint_dir(ds.retain)
    if ds.retain_splits:
        data_cfg["retain_splits"] = list(ds.retain_splits)
    return data_cfg


def _checked_t_sizes(
    cfg: StudyConfig, di: int, ds: DatasetSpec, splits: list[str] | None
) -> list[int]:
    """The extra |T| sizes to plan, after refusing folds and sizes the dataset cannot have.

    Checked at planning because only here are the dataset's splits known.
    """
    dname = ds.label
    for ai, att in enumerate(cfg.attacks):
        bad = [f for f in att.folds or [] if splits is not None and f not in splits]
        if bad:
            raise ConfigError(
                f"fold(s) {bad} are not forget splits of dataset {dname!r} ({splits})",
                field=f"attacks.{ai}.folds",
            )
    t_sizes = sorted(set(ds.t_sizes))
    if splits is not None:
        too_big = [k for k in t_sizes if k > len(splits) - 1]
        if too_big:
            raise ConfigError(
                f"dataset {dname!r} has {len(splits)} forget splits, so T has at most "
                f"{len(splits) - 1}; got {too_big}",
                field=f"datasets.{di}.t_sizes",
            )
        t_sizes = [k for k in t_sizes if k < len(splits) - 1]  # the full T runs anyway
    return t_sizes


@dataclass
class _Models:
    """One scope's original and control: a job's artifact or a model reference (or absent)."""

    original: Job | None = None
    control: Job | None = None
    original_ref: dict[str, Any] | None = None
    control_ref: dict[str, Any] | None = None


class _Planner:
    """Accumulates a study's jobs and attack groups, deduplicating jobs by key.

    A class rather than one function so that each stage's planning is a
    named step sharing :meth:`add`; the order of :meth:`add` calls is the
    plan's job order.
    """

    def __init__(self, cfg: StudyConfig) -> None:
        self.cfg = cfg
        self.jobs: list[PlannedJob] = []
        self.groups: list[AttackGroup] = []
        self.notes: list[str] = []
        self.seen: dict[str, Job] = {}
        self.fake = cfg.debug.fake_jobs
        hf = cfg.model.hf
        self.hf_ref = None
        if hf is not None:
            self.hf_ref = model_ref(hf, dtype=hf.dtype, trust_remote_code=hf.trust_remote_code)
        self.hf_runtime = {"device_map": hf.device_map} if hf is not None else {}
        self.unlearned_refs = [
            model_ref(u, dtype=hf.dtype if hf else "auto",
                      trust_remote_code=hf.trust_remote_code if hf else False)
            for u in cfg.unlearned
        ]  # fmt: skip

    def add(
        self, stage: str, name: str, config: dict[str, Any], deps: list[Job],
        precision: str | None = None, **runtime: Any,
    ) -> Job:  # fmt: skip
        """A job, or the identical one already planned (shared by datasets on one world)."""
        cfg = self.cfg
        precision = precision or cfg.precision
        if stage in TRAINING_STAGES and precision != "auto":
            # absent when auto, so the keys of jobs run before precision existed stay valid
            config = {**config, "precision": precision}
        j = Job.make(stage, name, config, deps, kind="fake" if self.fake else None)
        if j.key in self.seen:
            return self.seen[j.key]
        self.seen[j.key] = j
        rt = {"device": cfg.device, **runtime}
        if cfg.gradient_checkpointing:
            rt["gradient_checkpointing"] = True
        if self.fake:
            rt.update(sleep=cfg.debug.sleep, fail=name in cfg.debug.fail)
        self.jobs.append(PlannedJob(j, rt))
        return j

    @staticmethod
    def model_source(
        sc: _Scope, job: Job | None, ref: dict[str, Any] | None
    ) -> tuple[Any, list[Job]]:
        """A model is a dependency's artifact ("dep") or a hub id / path from the config."""
        if job is not None:
            return "dep", [*sc.base_deps, job]
        return ref, list(sc.base_deps)

    def attack_jobs(
        self, sc: _Scope, att: Any, role: str, label: str, method: str | None, src: Job | None,
        ref: dict[str, Any] | None, select_key: str | None = None,
    ) -> None:  # fmt: skip
        """One job of attack ``att`` per fold, for the full T and each extra |T| in ``t_sizes``.

        The job config holds the attack's resolved settings under its name
        (RTT's under ``"rtt"``), so each attack's jobs are keyed by content.
        Attacks other than RTT report under the dataset label ``"<name> [attack]"``.
        """
        model, deps = self.model_source(sc, src, ref)
        folds = list(att.folds) if att.folds else (sc.splits or [UNKNOWN_FOLD])
        base = sc.dataset if att.name == "rtt" else f"{sc.dataset} [{att.name}]"
        for k in [None, *(sc.t_sizes if att.varies_t else [])]:
            dataset = base if k is None else f"{base} |T|={k}"
            tag = f"{dataset} s{sc.seed}"
            keys = []
            for fold in folds:
                j = self.add(
                    "attack", f"attack {label} {tag} {fold}",
                    # no dataset label in the key: the control's attacks serve both regimes
                    {"attack": att.name, "role": role, "label": label, "method": method,
                     "data": sc.data_cfg, "model": model, "fold": fold,
                     att.name: att.resolved(sc.seed, k), "seed": sc.seed},
                    deps, precision=att.precision, eval_batch_size=att.eval_batch_size,
                    **self.hf_runtime,
                )  # fmt: skip
                keys.append(j.key)
            self.groups.append(
                AttackGroup(
                    dataset,
                    sc.seed,
                    role,
                    label,
                    method,
                    keys,
                    folds,
                    select_key,
                    base_dataset=sc.dataset,
                    regime=sc.regime,
                    train_splits=k,
                    attack=att.name,
                )  # fmt: skip
            )

    def plan_dataset(self, di: int, ds: DatasetSpec, *, dry_run: bool) -> None:
        """Every job of one dataset entry, seed by seed."""
        cfg = self.cfg
        dname = ds.label
        data_cfg = _data_cfg(ds)
        splits = _split_names(ds, di, dry_run=dry_run)
        t_sizes = _checked_t_sizes(cfg, di, ds, splits)
        if splits is None and not all(att.folds for att in cfg.attacks):
            self.notes.append(
                f"dataset {dname!r}: forget splits unknown until {ds.path} exists; attack jobs "
                "are counted once per model here (list them in datasets[].splits for an exact count)"
            )
        regime = "finetuned" if ds.finetune_first else "pretrained"
        for seed in cfg.seeds:
            tag = f"{dname} s{seed}"
            base_deps = self.world_jobs(ds, seed)
            models = self.model_jobs(ds, seed, tag, data_cfg, base_deps)
            sc = _Scope(dname, tag, seed, splits, data_cfg, list(base_deps), regime, t_sizes)
            for att in cfg.attacks:
                if att.controls:
                    self.attack_jobs(
                        sc, att, "original", "original", None, models.original, models.original_ref
                    )
                    if models.control is not None or models.control_ref is not None:
                        self.attack_jobs(
                            sc, att, "control", "control", None, models.control, models.control_ref
                        )
            for m in cfg.methods:
                self.method_jobs(sc, m, models)
            for u, ref in zip(cfg.unlearned, self.unlearned_refs, strict=True):
                for att in cfg.attacks:
                    self.attack_jobs(sc, att, "unlearned", u.label, None, None, ref)

    def world_jobs(self, ds: DatasetSpec, seed: int) -> list[Job]:
        """The world job a synthetic dataset's jobs depend on (none for a dataset on disk)."""
        if ds.world is None:
            return []
        wseed = ds.world.seed_for(seed)
        return [
            self.add(
                "world",
                f"world {ds.label}" + (f" s{seed}" if ds.world.vary_with_seed else ""),
                {
                    "preset": ds.world.preset,
                    "seed": wseed,
                    "overrides": dict(ds.world.overrides),
                },
                [],
            )  # fmt: skip
        ]

    def model_jobs(
        self, ds: DatasetSpec, seed: int, tag: str, data_cfg: dict[str, Any], base_deps: list[Job]
    ) -> _Models:
        """The original and control of one (dataset, seed): pretrain/finetune jobs or references."""
        cfg = self.cfg
        dname = ds.label
        out = _Models()
        if cfg.model.tiny is not None:
            t = cfg.model.tiny
            # no dataset name in the key: two datasets on one world share these jobs
            common = {"model_preset": t.preset, "pretrain": t.pretrain.model_dump(),
                      "seed": seed}  # fmt: skip
            out.control = self.add(
                "pretrain", f"pretrain control {tag}",
                {**common, "role": "control", "exclude_forget": True}, base_deps,
            )  # fmt: skip
            if ds.finetune_first:
                out.original = self.add(
                    "finetune", f"finetune {tag}",
                    {"dataset": dname, "data": data_cfg, "model": "dep",
                     "finetune": cfg.finetune.resolved(tiny=True), "seed": seed},
                    [*base_deps, out.control],
                )  # fmt: skip
            else:
                out.original = self.add(
                    "pretrain", f"pretrain original {tag}",
                    {**common, "role": "original", "exclude_forget": False}, base_deps,
                )  # fmt: skip
            return out
        hf, hf_ref = cfg.model.hf, self.hf_ref
        assert hf_ref is not None and hf is not None
        if ds.finetune_first:
            out.original = self.add(
                "finetune", f"finetune {tag}",
                {"dataset": dname, "data": data_cfg, "model": hf_ref,
                 "finetune": cfg.finetune.resolved(tiny=False), "seed": seed},
                base_deps, **self.hf_runtime,
            )  # fmt: skip
            out.control_ref = hf_ref
        else:
            out.original_ref = hf_ref
            if hf.control is not None:
                out.control_ref = model_ref(
                    hf.control, dtype=hf.dtype, trust_remote_code=hf.trust_remote_code
                )
        return out

    def method_jobs(self, sc: _Scope, m: Any, models: _Models) -> None:
        """One method's unlearn job per grid point, its select job, and the attacks on the pick."""
        from rtteval.methods import get_method
        from rtteval.stages.unlearn import expand_grid

        model, deps = self.model_source(sc, models.original, models.original_ref)
        points = expand_grid(dict(m.grid))
        unlearn_jobs = []
        for pi, point in enumerate(points):
            shown = ",".join(f"{k}={v}" for k, v in point.items()) or "default"
            unlearn_jobs.append(
                self.add(
                    "unlearn",
                    f"unlearn {m.display} {sc.tag} {shown}",
                    {
                        "method": m.name,
                        "label": m.display,
                        "dataset": sc.dataset,
                        "data": sc.data_cfg,
                        "model": model,
                        "point": point,
                        "index": pi,
                        "fixed": dict(m.fixed),
                        "seed": sc.seed,
                        # in the key, so a run dir made under other
                        # method defaults is not silently reused
                        "method_defaults": get_method(m.name).defaults,
                    },
                    deps,
                    **self.hf_runtime,
                )  # fmt: skip
            )
        sel = self.add(
            "select", f"select {m.display} {sc.tag}",
            {"method": m.name, "label": m.display, "dataset": sc.dataset, "seed": sc.seed,
             "retain_threshold": self.cfg.selection.retain_threshold},
            unlearn_jobs,
        )  # fmt: skip
        for att in self.cfg.attacks:
            self.attack_jobs(sc, att, "unlearned", m.display, m.name, sel, None, select_key=sel.key)
