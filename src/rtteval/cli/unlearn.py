"""``rtteval unlearn``: run one unlearning method (or sweep its grid) on a model.

Kept out of ``cli.py`` so the command is one registration line there.  The
work is :func:`rtteval.stages.unlearn.run_unlearn`; this module only turns options
into an :class:`~rtteval.stages.unlearn.UnlearnConfig` and prints the results: a
rich table on stderr, a JSON summary on stdout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from rtteval.cli.options import (
    COUNT,
    COUNT0,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    SEED,
    check_device_option,
)
from rtteval.errors import ConfigError
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
    from dataclasses import fields

    from rtteval.stages.unlearn import UnlearnConfig

    allowed = {f.name for f in fields(UnlearnConfig)} - {"method", "hparams", "seed"}
    allowed |= set(method_cls.hparam_names)
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
) -> None:
    """Unlearn the forget splits of a dataset; write the model and metrics.json."""
    from rtteval.methods import get_method
    from rtteval.stages.unlearn import UnlearnConfig, run_unlearn

    check_device_option(device)
    get_method(method)
    if optimizer is not None and optimizer not in ("adamw", "lion"):
        raise ConfigError(f"--optimizer {optimizer!r}: use adamw or lion")
    if threads:
        import torch

        torch.set_num_threads(threads)
    given = dict(
        retain_coef=retain_coef, steering_coef=steering_coef, alpha=alpha,
        layer=layer, beta=beta, delta=delta,
    )  # fmt: skip
    hparams = {k: v for k, v in given.items() if v is not None}
    cls = type(get_method(method))
    unknown = sorted(set(hparams) - set(cls.hparam_names))
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        raise ConfigError(f"{flags} does not apply to method {cls.name!r}")
    grid_values = _load_grid(grid)
    _check_grid(cls, grid_values)
    only = None
    if train_only is not None:
        only = [] if train_only.strip() == "all" else [s.strip() for s in train_only.split(",")]
        if any(not s for s in only):
            raise ConfigError(f"--train-only {train_only!r}: empty name in the list")
    cfg = UnlearnConfig(
        method=method, hparams=hparams, lr=lr, optimizer=optimizer,  # type: ignore[arg-type]
        adam_eps=adam_eps, train_only=only,
        epochs=epochs, max_steps=max_steps, batch_size=batch_size,
        eval_every_steps=eval_every_steps, target_forget_acc=target_forget_acc, seed=seed,
        precision=precision,  # type: ignore[arg-type]
    )  # fmt: skip
    metrics, sweep_res = run_unlearn(
        model, data, out, cfg,
        retain_data_path=retain_data, do_sweep=sweep or grid is not None,
        grid=grid_values, retain_threshold=retain_threshold, device=device,
        progress=sys.stdout.isatty(),  # train()'s bar prints to stdout; keep piped JSON clean
        overwrite=overwrite,
    )  # fmt: skip
    if sweep_res is not None:
        _print_sweep(sweep_res.to_dict())
    if metrics.get("after") is not None:
        _print_run(metrics)
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
    if sweep_res is not None:
        summary["selected"] = sweep_res.selected
    print(json.dumps(summary))
    if not metrics["model_written"]:
        console.print(f"[yellow]no model written: {metrics.get('message') or metrics['status']}")
        # SystemExit, not typer.Exit: with standalone_mode=False click returns
        # typer.Exit's code and cli.main() drops it.
        sys.exit(1)
