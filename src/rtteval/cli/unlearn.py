"""``rtteval unlearn``: run one unlearning method (or sweep its grid) on a model.

Kept out of ``cli.py`` so the command is one registration line there.  The
work is :func:`rtteval.stages.unlearn.run_unlearn`; this module only turns options
into an :class:`~rtteval.stages.unlearn.UnlearnConfig` and prints the results: a
rich table on stderr, a JSON summary on stdout.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from rtteval.atomic import write_json_atomic
from rtteval.cli.options import (
    COUNT,
    COUNT0,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    SEED,
    check_device_option,
)
from rtteval.cli.settings import settings_argument
from rtteval.errors import ConfigError, UserError
from rtteval.outputs import OVERWRITE_HELP

console = Console(stderr=True)


def _load_grid(spec: str | None) -> dict[str, list[Any]] | None:
    """A grid from inline JSON (``'{"lr": [1e-4, 1e-3]}'``) or a JSON/YAML file."""
    if spec is None:
        return None
    text = spec
    path = Path(spec)
    if not spec.lstrip().startswith("{"):
        if not path.is_file():
            raise ConfigError(f"--grid {spec!r}: neither inline JSON nor an existing file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read --grid file: {e}", file=path) from None
    try:
        if path.suffix in (".yaml", ".yml"):
            from rtteval.config.study import load_yaml

            grid = load_yaml(text, str(path))
        else:
            grid = json.loads(text)
    except ConfigError:
        raise
    except Exception as e:  # json parse errors
        raise ConfigError(f"--grid {spec!r}: cannot parse: {e}") from e
    if not isinstance(grid, dict):
        raise ConfigError("--grid must be a mapping of parameter name to a list of values")
    return grid


def _check_grid(method_cls: Any, grid: dict[str, Any] | None) -> None:
    """Every ``--grid`` key is a setting of the method and every value fits its declared type."""
    allowed = _allowed(method_cls)
    for k, vs in (grid or {}).items():
        if k not in allowed:
            raise ConfigError(
                f"method {method_cls.name!r} has no setting {k!r}; it takes "
                f"{', '.join(sorted(allowed))}",
                file="--grid",
            )
        if not isinstance(vs, list) or not vs:
            raise ConfigError(f"must be a non-empty list, got {vs!r}", file="--grid", field=k)
        for v in vs:
            if err := method_cls.param_error(k, v):
                raise ConfigError(err, file="--grid", field=k)


def _method_settings(method_cls: Any, items: list[str] | None) -> dict[str, Any]:
    """``key=value`` settings of an unlearning run, checked as a study's ``methods[].fixed`` is.

    The keys are :class:`~rtteval.stages.unlearn.UnlearnConfig` fields and the
    method's own hyperparameters; each value is checked against the type the
    method declares for it (``Method.param_error``).
    """
    from rtteval.config.study import parse_overrides

    allowed = _allowed(method_cls)
    out: dict[str, Any] = {}
    for loc, value, text in parse_overrides(list(items or [])):
        key = ".".join(map(str, loc))
        if len(loc) != 1 or key not in allowed:
            raise ConfigError(
                f"method {method_cls.name!r} has no setting {key!r}; it takes "
                f"{', '.join(sorted(allowed))}",
                file=f"setting {text!r}",
                field=key,
            )
        if err := method_cls.param_error(key, value):
            raise ConfigError(err, file=f"setting {text!r}", field=key)
        out[key] = value
    return out


def _allowed(method_cls: Any) -> set[str]:
    """What a method's run takes: UnlearnConfig's fields (but the ones set elsewhere) and hparams."""
    from rtteval.stages.unlearn import UnlearnConfig

    allowed = {f.name for f in dataclasses.fields(UnlearnConfig)} - {"method", "hparams", "seed"}
    return allowed | set(method_cls.hparam_names)


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def _print_run(m: dict[str, Any]) -> None:
    table = Table(title=f"unlearn {m['method']}: {m['status']}, {m['steps']} steps")
    for col in ("", "forget acc", "retain acc"):
        table.add_column(col, justify="right")
    for label in ("before", "after"):
        row = m.get(label) or {}
        table.add_row(label, _fmt(row.get("forget_acc")), _fmt(row.get("retain_acc")))
    console.print(table)


def _print_sweep(s: dict[str, Any]) -> None:
    orig = s["original"]
    table = Table(
        title=f"sweep {s['method']} (original forget {orig['forget_acc']:.3f}, "
        f"retain {orig['retain_acc']:.3f}; keep retain >= original - {s['retain_threshold']:g})"
    )
    for col in ("#", "params", "status", "forget", "retain", "steps", "s", ""):
        table.add_column(col)
    for p in s["points"]:
        params = " ".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in p["params"].items()
        )
        table.add_row(
            str(p["index"]), params, p["status"], _fmt(p["forget_acc"]), _fmt(p["retain_acc"]),
            str(p["steps"]), f"{p['wall_time']:.1f}", "selected" if p["selected"] else "",
        )  # fmt: skip
    console.print(table)
    console.print(s["note"])


def unlearn_cmd(
    model: Annotated[str, typer.Option(help="hub id or local model directory")],
    data: Annotated[str, typer.Option(help="dataset directory (the forget splits)")],
    method: Annotated[str, typer.Option(help="gd, ria, fwf, rmu, npo or simnpo")],
    out: Annotated[Path, typer.Option(help="output directory (model + metrics.json)")],
    retain_data: Annotated[
        str | None,
        typer.Option(help="dataset with retain data (needed when --data is not a world)"),
    ] = None,
    lr: Annotated[
        float | None, typer.Option(help="learning rate (default: per method)", parser=POSITIVE)
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(help="passes over the forget text", parser=COUNT)
    ] = None,
    max_steps: Annotated[int | None, typer.Option(parser=COUNT)] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(help="default: per method and model scale (32 tiny, 4 paper)", parser=COUNT),
    ] = None,
    optimizer: Annotated[str | None, typer.Option(help="adamw or lion")] = None,
    adam_eps: Annotated[
        float | None,
        typer.Option(help="AdamW's ε (default: 1e-4 tiny models, else 1e-8)", parser=POSITIVE),
    ] = None,
    train_only: Annotated[
        str | None,
        typer.Option(
            help="train only parameters whose name contains one of these comma-separated "
            "substrings, or 'all' (default: embed_tokens on tiny models, else all)"
        ),
    ] = None,
    retain_coef: Annotated[
        float | None,
        typer.Option(help="λ, weight of the retain NLL (0: no retain loss)", parser=NON_NEGATIVE),
    ] = None,
    steering_coef: Annotated[
        float | None, typer.Option(help="RMU: c (absolute)", parser=POSITIVE)
    ] = None,
    alpha: Annotated[
        float | None,
        typer.Option(help="RMU: retain weight α (0: no retain loss)", parser=NON_NEGATIVE),
    ] = None,
    layer: Annotated[
        int | None, typer.Option(help="RMU: layer ℓ (0: the first)", parser=COUNT0)
    ] = None,
    beta: Annotated[float | None, typer.Option(help="NPO / SimNPO: β", parser=POSITIVE)] = None,
    delta: Annotated[
        float | None,
        typer.Option(help="SimNPO: margin δ (0: no margin, the default)", parser=NON_NEGATIVE),
    ] = None,
    target_forget_acc: Annotated[
        float | None,
        typer.Option(
            help="stop once forget accuracy is at most this (0: only at zero)", parser=FRACTION
        ),
    ] = None,
    eval_every_steps: Annotated[int, typer.Option(parser=COUNT)] = 10,
    sweep: Annotated[bool, typer.Option(help="run the method's grid and select")] = False,
    grid: Annotated[
        str | None, typer.Option(help="sweep grid: inline JSON or a JSON/YAML file")
    ] = None,
    retain_threshold: Annotated[
        float,
        typer.Option(
            help="sweep: keep points with retain >= original - this (0: no retain loss allowed)",
            parser=FRACTION,
        ),
    ] = 0.05,
    seed: Annotated[int, typer.Option(parser=SEED)] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps")] = "auto",
    precision: Annotated[
        str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16, bf16-pure or fp16")
    ] = "auto",
    threads: Annotated[int | None, typer.Option(help="torch CPU threads", parser=COUNT)] = None,
    overwrite: Annotated[bool, typer.Option(help=OVERWRITE_HELP)] = False,
    settings: settings_argument(
        "warmup_steps=5 (UnlearnConfig fields and the method's hyperparameters, as a study's "
        "methods[].fixed)"
    ) = None,
) -> None:
    """Unlearn the forget splits of a dataset; write the model and metrics.json."""
    from rtteval.methods import get_method

    check_device_option(device)
    get_method(method)
    if optimizer is not None and optimizer not in ("adamw", "lion"):
        raise ConfigError(f"--optimizer {optimizer!r}: use adamw or lion")
    if threads:
        import torch

        torch.set_num_threads(threads)
    hparams = dict(
        retain_coef=retain_coef, steering_coef=steering_coef, alpha=alpha,
        layer=layer, beta=beta, delta=delta,
    )  # fmt: skip
    plain = dict(
        lr=lr, optimizer=optimizer, adam_eps=adam_eps, train_only=train_only, epochs=epochs,
        max_steps=max_steps, batch_size=batch_size, eval_every_steps=eval_every_steps,
        target_forget_acc=target_forget_acc,
    )  # fmt: skip
    fixed, grid_values = _fixed_settings(method, hparams, plain, grid, settings)
    if sweep or grid is not None:
        _sweep(
            model, data, out, method, fixed,
            grid_values, retain_data=retain_data, retain_threshold=retain_threshold, seed=seed,
            device=device, precision=precision, threads=threads, overwrite=overwrite,
        )  # fmt: skip
        return
    _run_one(model, data, out, method, fixed, retain_data=retain_data, seed=seed,
             device=device, precision=precision, overwrite=overwrite)  # fmt: skip


def _fixed_settings(
    method: str,
    hparams: dict[str, Any],
    plain: dict[str, Any],
    grid: str | None,
    settings: list[str] | None,
) -> tuple[dict[str, Any], dict[str, list[Any]] | None]:
    """The run's settings (options, then ``key=value``) and the sweep grid, checked against the method.

    ``plain`` holds the options in their dict order (``train_only`` still
    the option's text); a hyperparameter option of another method is refused by its flag
    name, so a typo'd method is not trained with the option silently dropped.
    """
    from rtteval.methods import get_method

    hparams = {k: v for k, v in hparams.items() if v is not None}
    cls = type(get_method(method))
    unknown = sorted(set(hparams) - set(cls.hparam_names))
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        raise ConfigError(f"{flags} does not apply to method {cls.name!r}")
    grid_values = _load_grid(grid)
    _check_grid(cls, grid_values)
    only, train_only = None, plain["train_only"]
    if train_only is not None:
        only = [] if train_only.strip() == "all" else [s.strip() for s in train_only.split(",")]
        if any(not s for s in only):
            raise ConfigError(f"--train-only {train_only!r}: empty name in the list")
    fixed = {**plain, "train_only": only, **hparams}
    fixed = {k: v for k, v in fixed.items() if v is not None}
    fixed.update(_method_settings(cls, settings))
    return fixed, grid_values


def _run_one(
    model: str, data: str, out: Path, method: str, fixed: dict[str, Any], *,
    retain_data: str | None, seed: int, device: str, precision: str, overwrite: bool,
) -> None:  # fmt: skip
    """One unlearning run (no sweep): split the settings into UnlearnConfig's and the method's."""
    from rtteval.stages.unlearn import UnlearnConfig, run_unlearn

    names = {f.name for f in dataclasses.fields(UnlearnConfig)}
    cfg = UnlearnConfig(
        **{"method": method, "seed": seed, "precision": precision,
           **{k: v for k, v in fixed.items() if k in names}},
        hparams={k: v for k, v in fixed.items() if k not in names},
    )  # fmt: skip
    metrics = run_unlearn(
        model, data, out, cfg,
        retain_data_path=retain_data, device=device,
        progress=sys.stdout.isatty(),  # train()'s bar prints to stdout; keep piped JSON clean
        overwrite=overwrite,
    )  # fmt: skip
    _print_run(metrics)
    _finish(out, metrics)


def _finish(out: Path, metrics: dict[str, Any], selected: int | None = None) -> None:
    """The JSON summary on stdout; exit 1 when no model was written (diverged, nothing selected)."""
    summary = {
        "out": str(out),
        "method": metrics["method"],
        "status": metrics["status"],
        "model_written": metrics["model_written"],
        "steps": metrics.get("steps"),
        "wall_time": metrics.get("wall_time"),
        "before": {k: (metrics.get("before") or {}).get(k) for k in ("forget_acc", "retain_acc")},
        "after": {k: (metrics.get("after") or {}).get(k) for k in ("forget_acc", "retain_acc")},
    }
    if "sweep" in metrics:
        summary["selected"] = selected
    print(json.dumps(summary))
    if not metrics["model_written"]:
        console.print(f"[yellow]no model written: {metrics.get('message') or metrics['status']}")
        # SystemExit, not typer.Exit: with standalone_mode=False click returns
        # typer.Exit's code and cli.main() drops it.
        sys.exit(1)


#: What a sweep writes into OUT besides the selected model's files.
_SWEEP_FILES = ("runs.db", "jobs", "logs", "study.yaml", "metrics.json", "sweep.json")


def _sweep(
    model: str, data: str, out: Path, method: str, fixed: dict[str, Any],
    grid: dict[str, list[Any]] | None, *, retain_data: str | None, retain_threshold: float,
    seed: int, device: str, precision: str, threads: int | None, overwrite: bool,
) -> None:  # fmt: skip
    """``--sweep``: the method's grid as a one-stage study (unlearn + select) in OUT.

    One unlearning job per grid point and the selection job, run by the
    runner, so a killed sweep resumes and finished points are keyed by the
    content of the model, the data and the settings.  OUT then holds the
    study's store and jobs, ``sweep.json`` (every point), ``metrics.json``
    (the selected run) and the selected point's model files.
    """
    from pydantic import ValidationError

    from rtteval.config.study import LoadedConfig, StudyConfig
    from rtteval.methods import get_method
    from rtteval.models.loading import check_model_source
    from rtteval.outputs import ResumableOutput
    from rtteval.runner.driver import run_study
    from rtteval.runner.store import Store

    check_model_source(model)
    for d in (data, retain_data):
        if d is not None:
            from rtteval.data import load_dataset

            load_dataset(d)  # a bad dataset fails before OUT exists
    if grid is None:
        m = get_method(method)
        grid = dict(m.grid.get(_scale(model)) or m.grid["tiny"])
    target = ResumableOutput(out, overwrite=overwrite, kind="sweep", names=_SWEEP_FILES)
    ref = {"path": str(Path(model).resolve())} if Path(model).exists() else {"id": model}
    dpath = str(Path(data).resolve()) if Path(data).exists() else data
    rpath = None
    if retain_data is not None:
        rpath = str(Path(retain_data).resolve()) if Path(retain_data).exists() else retain_data
    study = {
        "name": "sweep", "output_dir": str(target.path), "seeds": [seed], "device": device,
        "precision": precision, "model": {"hf": ref},
        "datasets": [{"name": Path(dpath.rstrip("/")).name or dpath, "path": dpath,
                      "retain": rpath}],
        "methods": [{"name": method, "grid": grid, "fixed": fixed}],
        "selection": {"retain_threshold": retain_threshold},
        "executor": {"kind": "sequential", "threads_per_worker": threads}, "retries": 0,
    }  # fmt: skip
    try:
        cfg = StudyConfig.model_validate(study)
    except ValidationError as e:  # pragma: no cover - the options were checked before
        raise ConfigError(str(e.errors()[0]["msg"]), file="--grid") from None
    target.open()
    summary = run_study(
        LoadedConfig(cfg, None), say=lambda s: console.print(s), output_kind="sweep",
        stages=("unlearn", "select"),
    )  # fmt: skip
    if summary.failed:
        raise UserError(
            f"{len(summary.failed)} unlearning job(s) failed, e.g. {summary.failed[0]}; see "
            f"{target.path}/logs (run the command again to retry them)"
        )
    with Store.in_dir(target.path) as store:
        (sel,) = store.rows(stage="select")
        units = {r.key: r for r in store.rows(stage="unlearn")}
        runs = sorted((units[k] for k in sel.deps), key=lambda r: r.config["index"])
    sweep_json, metrics = _sweep_files(target.path, sel, runs, grid, retain_threshold)
    metrics.update(model=str(model), data=str(data), retain_data=retain_data)
    write_json_atomic(target.path / "sweep.json", sweep_json)
    names = _link_model(target.path, runs[sel.metrics["selected"]] if metrics["model_written"]
                        else None)  # fmt: skip
    write_json_atomic(target.path / "metrics.json", metrics)
    # the study recorded its own entries in the marker: add to those
    ResumableOutput(out, overwrite=False, kind="sweep").add("sweep.json", "metrics.json", *names)
    _print_sweep(sweep_json)
    if metrics.get("after") is not None:
        _print_run(metrics)
    _finish(out, metrics, sweep_json["selected"])


def _scale(model: str) -> str:
    """The method-default scale of a model (``tiny``/``paper``), counted without loading weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rtteval.methods.base import TINY_MAX_PARAMS

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))
    return "tiny" if sum(p.numel() for p in m.parameters()) < TINY_MAX_PARAMS else "paper"


def _sweep_files(
    out: Path, sel: Any, runs: list[Any], grid: dict[str, list[Any]], threshold: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``sweep.json`` (every point) and ``metrics.json`` (the selected run) from the job store."""
    from rtteval.runner.jobs import decode_artifacts

    results = []
    for r in runs:
        arts = decode_artifacts(r.artifacts, out)
        results.append(json.loads(Path(arts["result"]).read_text()))
    chosen = sel.metrics.get("selected")
    points = [
        {"index": i, "params": r.config["point"], "status": res["status"],
         "forget_acc": res["after"]["forget_acc"], "retain_acc": res["after"]["retain_acc"],
         "steps": res["steps"], "wall_time": res["wall_time"], "message": res["message"],
         "config": res["config"], "selected": i == chosen}
        for i, (r, res) in enumerate(zip(runs, results, strict=True))
    ]  # fmt: skip
    original = results[0]["before"]
    note = sel.metrics.get("note") or f"selected point {chosen}: {points[chosen]['params']}"
    sweep_json = {
        "method": results[0]["method"], "grid": grid, "retain_threshold": threshold,
        "original": original, "selected": chosen, "note": note,
        "wall_time": sum(float(p["wall_time"]) for p in points), "points": points,
    }  # fmt: skip
    ok = chosen is not None
    run = results[chosen] if ok else {"method": results[0]["method"], "status": "no_selection"}
    metrics = {"model_written": ok, **run,
               "sweep": {k: v for k, v in sweep_json.items() if k not in ("points", "grid")}}  # fmt: skip
    if not ok:
        metrics["before"] = original
    return sweep_json, metrics


def _link_model(out: Path, run: Any) -> list[str]:
    """Put the selected point's model files at OUT's top level (hard links, else copies).

    Files of an earlier selection that this one lacks are removed, so OUT
    never mixes two models; each file is replaced atomically.
    """
    import os
    import shutil

    from rtteval.outputs import read_marker
    from rtteval.runner.jobs import decode_artifacts

    marker = read_marker(out) or {}
    previous = set(marker.get("entries", [])) - set(_SWEEP_FILES) - {".rtteval.lock"}
    src = Path(decode_artifacts(run.artifacts, out)["model"]) if run is not None else None
    files = [p.name for p in src.iterdir() if p.is_file()] if src is not None else []
    names = sorted(n for n in files if not n.startswith("."))  # not the job's own marker
    for name in sorted(previous - set(names)):
        (out / name).unlink(missing_ok=True)
    for name in names:
        tmp = out / f".{name}.tmp-link"
        tmp.unlink(missing_ok=True)
        try:
            os.link(src / name, tmp)
        except OSError:
            shutil.copy2(src / name, tmp)
        os.replace(tmp, out / name)
    return names
