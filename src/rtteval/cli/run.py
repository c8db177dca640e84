"""``rtteval run CONFIG.yaml [key=value ...]`` and ``rtteval status OUT_DIR``.

``run`` plans a study from its config and runs (or resumes) it; ``--dry-run``
prints the job plan and the job count without loading any model or
touching the output directory.  ``status`` reads the study's store
read-only and shows progress per stage.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from rtteval.errors import UserError

console = Console(stderr=True)


def _say(msg: str) -> None:
    console.print(msg, markup=False, highlight=False, soft_wrap=True)  # one line, never wrapped


def run_cmd(
    config: Annotated[Path, typer.Argument(help="study config (YAML)")],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="dotted key=value overrides, e.g. attacks.0.epochs=2 seeds=[0,1]"),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print the job plan and count; run nothing")
    ] = False,
    executor: Annotated[
        str | None, typer.Option(help="override executor.kind: sequential, processes or ray")
    ] = None,
) -> None:
    """Run (or resume) a study: every job of the config, skipping those already done."""
    from rtteval.config.study import load_config

    ov = list(overrides or [])
    if executor is not None:
        ov.append(f"executor.kind={executor}")
    loaded = load_config(config, ov, check_paths=not dry_run)
    for w in loaded.warnings:
        _say(f"warning: {w}")
    from rtteval.runner.driver import run_study

    try:
        if dry_run:
            _print_plan(loaded)
            return
        summary = run_study(loaded, say=_say)
    except UserError as e:  # a check that needs the data (fold names ...): name the config line
        raise loaded.locate(e) from None
    except KeyboardInterrupt:
        resume = ["rtteval", "run", str(config), *(overrides or [])]
        if executor is not None:
            resume += ["--executor", executor]
        print(
            f"rtteval: interrupted: {_finished(Path(loaded.config.output_dir))}; "
            f"resume with: {shlex.join(resume)}",
            file=sys.stderr,
        )
        raise SystemExit(130) from None  # not typer.Exit: main() would add its own line
    _print_counts(summary.counts, title=f"study {loaded.config.name!r} ({summary.wall_time:.0f} s)")
    print(json.dumps(summary.to_dict()))
    rep = summary.report
    no_result = rep is not None and not rep["result"]
    if no_result:
        out = Path(loaded.config.output_dir) / "report.md"
        print(
            f"rtteval: error: study {loaded.config.name!r} produced no result ({rep['why']}); "
            f"see {out}",
            file=sys.stderr,
        )
    if summary.failed:
        raise typer.Exit(1)
    if no_result:
        raise typer.Exit(3)


def _finished(out: Path) -> str:
    """'N of M jobs finished' from the store of an interrupted study (what a resume keeps)."""
    from rtteval.runner.store import DB_NAME, FINAL_OK, Store

    if not (out / DB_NAME).is_file():
        return "no job had started"
    with Store(out / DB_NAME, readonly=True) as store:
        keys = set((store.get_meta("plan") or {}).get("keys") or [])
        rows = [r for r in store.rows() if r.key in keys]
    done = sum(1 for r in rows if r.status in FINAL_OK)
    return f"{done} of {len(keys)} jobs finished and are kept"


def _print_plan(loaded) -> None:  # noqa: ANN001 - LoadedConfig, imported lazily
    from rtteval.runner.plan import build_plan

    cfg = loaded.config
    plan = build_plan(cfg, dry_run=True)
    out = Console()
    for p in plan.jobs:
        deps = len(p.job.deps)
        out.print(f"{p.job.stage:9s} {p.job.name}  [dim]({deps} deps, {p.job.key[:12]})[/dim]",
                  highlight=False)  # fmt: skip
    counts = plan.counts()
    t = Table(title=f"plan of study {cfg.name!r} -> {cfg.output_dir}")
    t.add_column("stage")
    t.add_column("jobs", justify="right")
    for stage, n in counts.items():
        t.add_row(stage, str(n))
    t.add_row("total", str(len(plan.jobs)))
    out.print(t)
    for n in plan.notes:
        _say(f"note: {n}")
    print(json.dumps({"dry_run": True, "jobs": len(plan.jobs), "by_stage": counts,
                      "executor": cfg.executor.kind, "notes": plan.notes}))  # fmt: skip


def _print_counts(counts: dict[str, dict[str, int]], *, title: str) -> None:
    from rtteval.runner.store import STATUSES

    t = Table(title=title)
    t.add_column("stage")
    for s in STATUSES:
        t.add_column(s, justify="right")
    t.add_column("total", justify="right")
    order = ["world", "finetune", "pretrain", "unlearn", "select", "attack"]
    for stage in sorted(counts, key=lambda s: (order.index(s) if s in order else 99, s)):
        row = counts[stage]
        t.add_row(stage, *(str(row.get(s, 0)) for s in STATUSES), str(sum(row.values())))
    Console().print(t)


def status_cmd(
    out_dir: Annotated[Path, typer.Argument(help="a study's output directory")],
    report: Annotated[
        bool,
        typer.Option(
            "--report", help="also write results.json and the report from the attacks done so far"
        ),
    ] = False,
) -> None:
    """Progress of a study: jobs per stage and status (read-only; safe while it runs)."""
    from rtteval.runner.driver import driver_alive
    from rtteval.runner.store import DB_NAME, Store

    db = out_dir / DB_NAME
    if not db.is_file():
        raise UserError(f"no {DB_NAME} here (not a study output directory?)", file=out_dir)
    alive = driver_alive(out_dir)
    with Store(db, readonly=True) as store:
        plan = store.get_meta("plan") or {}
        keys = plan.get("keys")
        counts = store.counts_by_stage(keys)
        failed = [r for r in store.rows(status="failed") if keys is None or r.key in set(keys)]
        stale = store.n_rows() - len(keys) if keys is not None else 0
    interrupted = 0
    if not alive:  # rows a killed driver left `running` are not running: the next run redoes them
        for row in counts.values():
            interrupted += row.get("running", 0)
            row["pending"] = row.get("pending", 0) + row.get("running", 0)
            row["running"] = 0
    _print_counts(counts, title=f"study {plan.get('study', '?')!r}: {out_dir}")
    for r in failed[:10]:
        _say(f"failed: {r.name}: {r.error} (attempts {r.attempts})")
    if stale > 0:
        _say(f"note: {stale} job(s) in the store belong to an earlier version of the config")
    if interrupted:
        _say(
            f"note: no driver is running; {interrupted} job(s) it left running were interrupted "
            "and count as pending (`rtteval run` on the same config resumes them)"
        )
    totals: dict[str, int] = {}
    for row in counts.values():
        for s, n in row.items():
            totals[s] = totals.get(s, 0) + n
    info = None
    if report:
        from rtteval.runner.results import report_from_store

        info = report_from_store(out_dir, n_boot=int(plan.get("n_boot", 1000)))
        if not info["result"]:
            _say(f"report: report.md (no result: {info['why']})")
        else:
            _say(f"report: {', '.join(info['files'])}{' (partial)' if info['partial'] else ''}")
    print(
        json.dumps(
            {"out": str(out_dir), "driver_running": alive, "interrupted": interrupted,
             "counts": counts, "totals": totals, "report": info}
        )
    )  # fmt: skip
