"""The driver's report step: results.json from whatever attack jobs are done.

Each attack job saved one fold of one model (``attack.json``, a one-fold
:class:`~rtteval.attacks.records.ModelAttack`).  Here the folds of each model
are put back together in plan order and handed to
:func:`rtteval.analysis.report.build_results`, which needs every model of a dataset
to cover the same folds (its bootstrap pairs questions).  On partial
results we therefore report the folds the original model has finished,
include the control only if it covers them, and include a method only if
every seed of it does; whatever is left out is listed under
``config.run.missing``, so a partial report says what it is missing.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rtteval.atomic import write_text_atomic
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
    from rtteval.attacks.records import ModelAttack

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
    return _study_results(plan, store, out_dir, n_boot=n_boot, study=study)[0]


@dataclass
class _Rows:
    """The store's rows of the stages the report reads, by job key."""

    attack: dict[str, Any]
    select: dict[str, Any]
    unlearn: dict[str, Any]


def _done_folds(
    groups: list[AttackGroup], rows: _Rows, out_dir: Path
) -> dict[int, dict[str, dict[str, Any]]]:
    """Per attack group (by index), its finished folds' one-fold attacks."""
    done: dict[int, dict[str, dict[str, Any]]] = {}  # group idx -> fold -> attack dict
    for gi, g in enumerate(groups):
        done[gi] = {}
        for key, fold in zip(g.keys, g.folds, strict=True):
            r = rows.attack.get(key)
            if r is not None and r.status == "done":
                a = _load_attack(out_dir, r.artifacts)
                if a is not None:
                    done[gi][fold] = a
    return done


def _unlearned_models(
    dataset: str,
    groups: list[AttackGroup],
    rows: _Rows,
    covered: Any,
    model: Any,
    missing: list[str],
) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
    """Each method whose every seed is complete, as merged attacks; and its selections.

    A method with a seed whose unlearning selected no point, or whose folds are not all done,
    is left out and named in ``missing``.
    """
    methods: dict[str, list[Any]] = defaultdict(list)
    incomplete: set[str] = set()
    selections: dict[str, list[Any]] = defaultdict(list)
    for gi, g in enumerate(groups):
        if g.role != "unlearned":
            continue
        srow = rows.select.get(g.select_key or "")
        if srow is not None and srow.metrics is not None:
            selections[g.label].append(
                {"seed": g.seed, "status": srow.status, "selected": srow.metrics.get("selected"),
                 "point": srow.metrics.get("point"), "note": srow.metrics.get("note"),
                 "diverged": _diverged_points(srow.deps, rows.unlearn)}
            )  # fmt: skip
        if srow is not None and srow.status == "skipped":
            incomplete.add(g.label)
            n_div = len(_diverged_points(srow.deps, rows.unlearn))
            missing.append(
                f"{dataset}: {g.label} seed {g.seed}: no grid point selected "
                f"({n_div} of {sum(k in rows.unlearn for k in srow.deps)} diverged)"
            )
        elif covered(gi):
            methods[g.label].append(model(gi))
        else:
            incomplete.add(g.label)
            missing.append(f"{dataset}: {g.label} seed {g.seed} (not every fold done)")
    return {m: a for m, a in methods.items() if m not in incomplete}, selections


def _dataset_results(
    dataset: str,
    groups: list[AttackGroup],
    rows: _Rows,
    out_dir: Path,
    missing: list[str],
    *,
    n_boot: int,
    study: str,
) -> dict[str, Any] | None:
    """One dataset's results dict from its done folds, or None; what is left out goes to ``missing``."""
    from rtteval.analysis.report import build_results

    done = _done_folds(groups, rows, out_dir)
    originals = [gi for gi, g in enumerate(groups) if g.role == "original"]
    if not originals:
        missing.append(f"{dataset}: the original model is not attacked (attacks[].controls: "
                       "false), and recovery is measured against it")  # fmt: skip
        return None
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
        return None

    def covered(gi: int) -> bool:
        return all(f in done[gi] for f in common)

    def model(gi: int) -> Any:
        return _merge([done[gi][f] for f in common])

    originals_m = [model(gi) for gi in originals]
    controls = [gi for gi, g in enumerate(groups) if g.role == "control"]
    controls_m = None
    if controls and all(covered(gi) for gi in controls):
        controls_m = [model(gi) for gi in controls]
    elif controls:
        missing.append(f"{dataset}: control (not every fold done)")
    methods_ok, selections = _unlearned_models(dataset, groups, rows, covered, model, missing)
    if not methods_ok:
        missing.append(f"{dataset}: no method has finished attacks yet")
        return None
    all_folds = fold_order
    if common != all_folds:
        missing.append(f"{dataset}: folds {[f for f in all_folds if f not in common]}")
    return build_results(
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
        info={
            "base_dataset": groups[0].base_dataset,
            "regime": groups[0].regime,
            "attack": groups[0].attack,
        },  # fmt: skip
    )


def _study_results(
    plan: Plan, store: Store, out_dir: Path, *, n_boot: int, study: str
) -> tuple[dict[str, Any] | None, list[str]]:
    """:func:`build_study_results`, and what every dataset (reported or not) is missing."""
    from rtteval.analysis.report import merge_results

    per_dataset_missing: list[list[str]] = []
    rows = _Rows(
        attack={r.key: r for r in store.rows(stage="attack")},
        select={r.key: r for r in store.rows(stage="select")},
        unlearn={r.key: r for r in store.rows(stage="unlearn")},
    )
    per_dataset: dict[str, list[Any]] = defaultdict(list)
    for g in plan.groups:
        per_dataset[g.dataset].append(g)

    results = []
    for dataset, groups in per_dataset.items():
        missing: list[str] = []
        per_dataset_missing.append(missing)  # filled below, whether or not the dataset reports
        res = _dataset_results(dataset, groups, rows, out_dir, missing, n_boot=n_boot, study=study)
        if res is not None:
            results.append(res)
    all_missing = [m for ms in per_dataset_missing for m in ms]
    if not results:
        return None, all_missing
    out = results[0] if len(results) == 1 else merge_results(*results)
    # a dataset with no result at all is missing from the study, whichever dataset is first
    out["config"]["run"] = {**out["config"]["run"], "partial": bool(all_missing),
                            "missing": all_missing}  # fmt: skip
    return out, all_missing


def groups_meta(plan: Plan) -> list[dict[str, Any]]:
    """The plan's attack groups as JSON, stored in the store's meta for reports without the config."""
    return [asdict(g) for g in plan.groups]


def write_study_report(
    plan: Plan,
    store: Store,
    out_dir: Path,
    *,
    n_boot: int,
    study: str,
    plots: bool,
    keys: list[str] | None = None,
    explain: bool = True,
) -> dict[str, Any] | None:
    """The study's report from its store: results.json & co., or a report.md saying why not.

    A finished study always gets a report.  When no dataset has a result
    (every method diverged or was skipped, the original is not attacked,
    or nothing finished yet), report.md says so and lists each job that
    ended without a result and what happened to it, plus the attacks that
    did finish; ``result`` is then False and no results.json is written.
    ``explain=False`` (the driver's reports while a study runs) writes
    nothing and returns None then.
    """
    from rtteval.analysis.report import write_report

    results, missing = _study_results(plan, store, out_dir, n_boot=n_boot, study=study)
    if results is not None:
        paths = write_report(out_dir, results, plots=plots)
        run = results["config"].get("run", {})
        return {
            "files": sorted(p.name for p in paths.values()),
            "result": True,
            "partial": bool(run.get("partial")),
            "missing": run.get("missing", []),
        }
    if not explain:
        return None
    outcome = study_outcome(store, keys)
    write_text_atomic(out_dir / "report.md", render_outcome(study, outcome, missing, out_dir))
    return {
        "files": ["report.md"],
        "result": False,
        "partial": True,
        "missing": missing,
        "why": outcome["why"],
    }


def study_outcome(store: Store, keys: list[str] | None = None) -> dict[str, Any]:
    """What happened to a study's jobs, from the store alone (for a report without a result).

    ``jobs``: every job of the plan that did not end ``done``, with what
    happened to it (a divergence's message and step, a failure's error, a
    skip's reason); ``attacks``: the finished attacks' V accuracy before and
    best after RTT; ``why``: one line of counts, e.g. ``unlearn: 2 diverged;
    select: 1 skipped``.
    """
    wanted = set(keys) if keys is not None else None
    rows = [r for r in store.rows() if wanted is None or r.key in wanted]
    jobs, attacks = [], []
    by_stage: dict[str, dict[str, int]] = {}
    for r in rows:
        if r.status == "done":
            if r.stage == "attack":
                m = r.metrics or {}
                attacks.append(
                    {"job": r.name, "v_acc_before": m.get("v_acc_before"),
                     "v_acc_best": m.get("v_acc_best")}
                )  # fmt: skip
            continue
        st = by_stage.setdefault(r.stage, {})
        st[r.status] = st.get(r.status, 0) + 1
        jobs.append({"job": r.name, "stage": r.stage, "status": r.status, "what": _what(r)})
    order = ["world", "finetune", "pretrain", "unlearn", "select", "attack"]
    jobs.sort(key=lambda j: ((order + [j["stage"]]).index(j["stage"]), j["job"]))
    why = "; ".join(
        f"{stage}: " + ", ".join(f"{n} {status}" for status, n in sorted(c.items()))
        for stage, c in sorted(by_stage.items(), key=lambda x: (order + [x[0]]).index(x[0]))
    )
    return {"jobs": jobs, "attacks": attacks, "why": why or "every job is done"}


def _what(r: Any) -> str:
    """What happened to a job that did not end ``done``, in a few words."""
    m = r.metrics or {}
    if r.status == "failed":
        return f"{r.error} (attempts {r.attempts})"
    if r.status == "diverged":
        msg = str(m.get("message") or "diverged")
        return f"{msg} at step {m['steps']}" if m.get("steps") is not None else msg
    if r.status == "skipped":
        return str(m.get("note") or "skipped")
    return r.status  # pending / running: not reached


def render_outcome(study: str, outcome: dict[str, Any], missing: list[str], out: Path) -> str:
    """report.md of a study without a result: why, and what each job that has none went through."""

    def cell(x: Any) -> str:
        return "-" if x is None else str(x).replace("|", "\\|").replace("\n", " ")

    def num(x: Any) -> str:
        return "-" if x is None else f"{float(x):.3f}"

    lines = [
        "# RTT report: no result",
        "",
        f"Study {study!r} has no result: no unlearned model has finished RTT on the folds the "
        f"original model finished, so there is no recovery to report ({outcome['why']}).",
        "",
        "## Why",
        "",
        *[f"- {m}" for m in missing],
        "",
        "## Jobs without a result",
        "",
        "| job | status | what happened |",
        "| --- | --- | --- |",
        *[f"| {cell(j['job'])} | {j['status']} | {cell(j['what'])} |" for j in outcome["jobs"]],
        "",
        "## Attacks that finished",
        "",
    ]
    if outcome["attacks"]:
        lines += ["| job | V acc before RTT | best V acc after RTT |", "| --- | --- | --- |"]
        lines += [
            f"| {cell(a['job'])} | {num(a['v_acc_before'])} | {num(a['v_acc_best'])} |"
            for a in outcome["attacks"]
        ]
    else:
        lines.append("None.")
    if (out / "results.json").exists():
        lines += ["", "The results.json in this directory is from an earlier run, not this one."]
    return "\n".join(lines) + "\n"


def report_from_store(
    out_dir: str | Path, *, plots: bool = True, n_boot: int = 1000
) -> dict[str, Any]:
    """Write the study's report from its store, finished or not (see :func:`write_study_report`).

    Needs only the output directory (the driver records its attack groups in
    the store), so it works on a study that was killed, or that is still
    running in another process: the store is opened read-only.
    """
    out = Path(out_dir)
    if not (out / DB_NAME).is_file():
        raise UserError(f"no {DB_NAME} here (not a study output directory?)", file=out)
    with Store(out / DB_NAME, readonly=True) as store:
        meta = store.get_meta("plan") or {}
        groups = [AttackGroup(**g) for g in meta.get("groups", [])]
        info = write_study_report(
            Plan([], groups), store, out, n_boot=n_boot, study=meta.get("study", "study"),
            plots=plots, keys=meta.get("keys"),
        )  # fmt: skip
    assert info is not None  # explain=True always writes a report
    return info
