"""The driver's report step: results.json from whatever attack jobs are done.

Each attack job saved one fold of one model (``attack.json``, a one-fold
:class:`~rtteval.attacks.rtt.ModelAttack`).  Here the folds of each model
are put back together in plan order and handed to
:func:`rtteval.report.build_results`, which needs every model of a dataset
to cover the same folds (its bootstrap pairs questions).  On partial
results we therefore report the folds the original model has finished,
include the control only if it covers them, and include a method only if
every seed of it does; whatever is left out is listed under
``config.run.missing``, so a partial report says what it is missing.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rtteval.errors import UserError
from rtteval.runner.jobs import decode_artifacts
from rtteval.runner.plan import AttackGroup, Plan
from rtteval.runner.store import DB_NAME, Store


def _load_attack(out_dir: Path, artifacts: dict[str, Any] | None) -> dict[str, Any] | None:
    arts = decode_artifacts(artifacts, out_dir)
    p = arts.get("attack")
    if not p:
        return None
    try:
        return json.loads(Path(p).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _merge(parts: list[dict[str, Any]]) -> Any:
    """One ModelAttack from one-fold attacks of the same model, in the given order."""
    from rtteval.attacks.rtt import ModelAttack

    d = dict(parts[0])
    d["folds"] = [f for p in parts for f in p["folds"]]
    d["config"] = {**d["config"], "folds": [f["v"] for f in d["folds"]]}
    d["wall_time"] = sum(float(p.get("wall_time", 0.0)) for p in parts)
    return ModelAttack.from_dict(d)


def _diverged_points(keys: list[str], unlearn_rows: dict[str, Any]) -> list[dict[str, Any]]:
    """A method's diverged unlearning grid points: their parameters and what happened."""
    out = []
    for k in keys:
        r = unlearn_rows.get(k)
        if r is not None and r.status == "diverged":
            m = r.metrics or {}
            out.append({"params": m.get("point"), "message": m.get("message"), "job": r.name})
    return out


def build_study_results(
    plan: Plan, store: Store, out_dir: Path, *, n_boot: int = 1000, study: str = "study"
) -> dict[str, Any] | None:
    """results.json's dict for every dataset with enough done attacks, or None if none has."""
    from rtteval.report import build_results, merge_results

    rows = {r.key: r for r in store.rows(stage="attack")}
    select_rows = {r.key: r for r in store.rows(stage="select")}
    unlearn_rows = {r.key: r for r in store.rows(stage="unlearn")}
    per_dataset: dict[str, list[Any]] = defaultdict(list)
    for g in plan.groups:
        per_dataset[g.dataset].append(g)

    results = []
    for dataset, groups in per_dataset.items():
        missing: list[str] = []
        done: dict[int, dict[str, dict[str, Any]]] = {}  # group idx -> fold -> attack dict
        for gi, g in enumerate(groups):
            done[gi] = {}
            for key, fold in zip(g.keys, g.folds, strict=True):
                r = rows.get(key)
                if r is not None and r.status == "done":
                    a = _load_attack(out_dir, r.artifacts)
                    if a is not None:
                        done[gi][fold] = a
        originals = [gi for gi, g in enumerate(groups) if g.role == "original"]
        if not originals:
            continue
        fold_order = groups[originals[0]].folds
        # seeds run one after another: report the seeds whose original is complete
        # rather than no fold at all while a later seed has not started
        full = {groups[gi].seed for gi in originals if all(f in done[gi] for f in fold_order)}
        if full and len(full) < len({groups[gi].seed for gi in originals}):
            late = sorted({groups[gi].seed for gi in originals} - full)
            missing.append(f"{dataset}: seed(s) {late} (the original is not done on every fold)")
            keep = [gi for gi, g in enumerate(groups) if g.seed in full]
            groups = [groups[gi] for gi in keep]
            done = {i: done[gi] for i, gi in enumerate(keep)}
            originals = [gi for gi, g in enumerate(groups) if g.role == "original"]
        common = [f for f in fold_order if all(f in done[gi] for gi in originals)]
        if not common:
            missing.append(f"{dataset}: no fold finished on the original model yet")
            continue

        def covered(gi: int, common: list[str] = common, done: dict = done) -> bool:
            return all(f in done[gi] for f in common)

        def model(gi: int, common: list[str] = common, done: dict = done) -> Any:
            return _merge([done[gi][f] for f in common])

        originals_m = [model(gi) for gi in originals]
        controls = [gi for gi, g in enumerate(groups) if g.role == "control"]
        controls_m = None
        if controls and all(covered(gi) for gi in controls):
            controls_m = [model(gi) for gi in controls]
        elif controls:
            missing.append(f"{dataset}: control (not every fold done)")
        methods: dict[str, list[Any]] = defaultdict(list)
        incomplete: set[str] = set()
        selections: dict[str, list[Any]] = defaultdict(list)
        for gi, g in enumerate(groups):
            if g.role != "unlearned":
                continue
            srow = select_rows.get(g.select_key or "")
            if srow is not None and srow.metrics is not None:
                selections[g.label].append(
                    {"seed": g.seed, "status": srow.status, "selected": srow.metrics.get("selected"),
                     "point": srow.metrics.get("point"), "note": srow.metrics.get("note"),
                     "diverged": _diverged_points(srow.deps, unlearn_rows)}
                )  # fmt: skip
            if srow is not None and srow.status == "skipped":
                incomplete.add(g.label)
                missing.append(f"{dataset}: {g.label} seed {g.seed}: no grid point selected")
            elif covered(gi):
                methods[g.label].append(model(gi))
            else:
                incomplete.add(g.label)
                missing.append(f"{dataset}: {g.label} seed {g.seed} (not every fold done)")
        methods_ok = {m: a for m, a in methods.items() if m not in incomplete}
        if not methods_ok:
            missing.append(f"{dataset}: no method has finished attacks yet")
            continue
        all_folds = fold_order
        if common != all_folds:
            missing.append(f"{dataset}: folds {[f for f in all_folds if f not in common]}")
        results.append(
            build_results(
                methods_ok,
                originals_m,
                controls_m,
                dataset=dataset,
                config={
                    "study": study,
                    "partial": bool(missing),
                    "missing": missing,
                    "selection": dict(selections),
                },
                n_boot=n_boot,
                seed=min(g.seed for g in groups),
                info={"base_dataset": groups[0].base_dataset, "regime": groups[0].regime},
            )
        )
    if not results:
        return None
    return results[0] if len(results) == 1 else merge_results(*results)


def groups_meta(plan: Plan) -> list[dict[str, Any]]:
    """The plan's attack groups as JSON, stored in the store's meta for reports without the config."""
    return [asdict(g) for g in plan.groups]


def report_from_store(
    out_dir: str | Path, *, plots: bool = True, n_boot: int = 1000
) -> dict[str, Any]:
    """Write results.json and the report from a study's store, finished or not.

    Needs only the output directory (the driver records its attack groups in
    the store), so it works on a study that was killed, or that is still
    running in another process: the store is opened read-only.
    """
    from rtteval.report import write_report

    out = Path(out_dir)
    if not (out / DB_NAME).is_file():
        raise UserError(f"no {DB_NAME} here (not a study output directory?)", file=out)
    with Store(out / DB_NAME, readonly=True) as store:
        meta = store.get_meta("plan") or {}
        groups = [AttackGroup(**g) for g in meta.get("groups", [])]
        results = build_study_results(
            Plan([], groups), store, out, n_boot=n_boot, study=meta.get("study", "study")
        )
    if results is None:
        raise UserError("no model has finished attacks on every fold of the original yet", file=out)
    paths = write_report(out, results, plots=plots)
    return {
        "files": sorted(p.name for p in paths.values()),
        "partial": bool(results["config"].get("run", {}).get("partial")),
        "missing": results["config"].get("run", {}).get("missing", []),
    }
