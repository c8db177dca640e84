"""The ``rtteval`` command line.

User mistakes raise :class:`rtteval.errors.UserError`; :func:`main` prints
them as one line on stderr and exits 2, never with a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from rtteval.cli.attack import attack_cmd, findings_cmd, report_cmd
from rtteval.cli.options import (
    ACCURACY,
    COUNT,
    COUNT0,
    NON_NEGATIVE,
    POSITIVE,
    SEED,
    check_device_option,
    show_ranges,
)
from rtteval.cli.run import run_cmd, status_cmd
from rtteval.cli.settings import apply_settings, setting_keys, settings_argument
from rtteval.cli.unlearn import unlearn_cmd
from rtteval.errors import UserError
from rtteval.outputs import OVERWRITE_HELP as _OVERWRITE_HELP

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="RTT evaluation of unlearning methods."
)
data_app = typer.Typer(no_args_is_help=True, help="Inspect and validate datasets.")
app.add_typer(data_app, name="data")
app.command("attack")(attack_cmd)
app.command("report")(report_cmd)
app.command("findings")(findings_cmd)
app.command("run")(run_cmd)
app.command("status")(status_cmd)
app.command("unlearn")(unlearn_cmd)
console = Console(stderr=True)


@data_app.command("check")
def data_check(
    path: Annotated[str, typer.Argument(help="dataset directory or hf://owner/name")],
    strict: Annotated[
        bool,
        typer.Option(
            help="reject any question text found in two files, and a question offering the "
            "same choice twice (the released data has both)"
        ),
    ] = False,
) -> None:
    """Validate a dataset directory and print its counts as JSON."""
    from rtteval.data import load_dataset

    ds = load_dataset(path, strict_duplicates=strict, distinct_choices=strict)
    print(json.dumps(ds.summary(), ensure_ascii=False))


@app.command()
def world(
    out: Annotated[Path, typer.Option(help="directory to write the world into")],
    seed: Annotated[int, typer.Option(help="random seed", parser=SEED)] = 0,
    preset: Annotated[str, typer.Option(help="world preset (small, tiny, bios)")] = "small",
    overwrite: Annotated[bool, typer.Option(help=_OVERWRITE_HELP)] = False,
    settings: settings_argument("n_splits=3") = None,
) -> None:
    """Write a synthetic world of facts in the paper's dataset layout."""
    from rtteval.data.world import PRESETS, WorldConfig, write_world

    if preset not in PRESETS:
        raise UserError(
            f"unknown preset {preset!r}; known: {', '.join(sorted(PRESETS))}", file="--preset"
        )
    cfg = apply_settings(WorldConfig, {"preset": preset, "seed": seed}, settings)
    given = {k: getattr(cfg, k) for k in setting_keys(settings) if k not in ("preset", "seed")}
    path = write_world(out, seed=cfg.seed, preset=cfg.preset, overwrite=overwrite, **given)
    manifest = json.loads((path / "manifest.json").read_text())
    print(json.dumps({"out": str(path), "counts": manifest.get("counts", {})}))


@app.command()
def pretrain(
    world: Annotated[str, typer.Option(help="world (dataset) directory")],
    out: Annotated[Path, typer.Option(help="model output directory")],
    exclude_forget: Annotated[bool, typer.Option(help="build the never-learned control")] = False,
    model_preset: Annotated[str, typer.Option(help="tiny model preset")] = "tiny-1m",
    lr: Annotated[float, typer.Option(parser=POSITIVE)] = 3e-3,
    batch_size: Annotated[int, typer.Option(parser=COUNT)] = 64,
    max_epochs: Annotated[int, typer.Option(parser=COUNT)] = 120,
    target: Annotated[
        float, typer.Option(help="stop when accuracy reaches this", parser=ACCURACY)
    ] = 0.97,
    anneal_epochs: Annotated[
        int,
        typer.Option(
            help="then this many epochs with the lr decaying linearly to 0 (0: no anneal)",
            parser=COUNT0,
        ),
    ] = 10,
    seed: Annotated[int, typer.Option(parser=SEED)] = 0,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads", parser=COUNT)] = None,
    overwrite: Annotated[bool, typer.Option(help=_OVERWRITE_HELP)] = False,
    settings: settings_argument("warmup_steps=10") = None,
) -> None:
    """Pretrain a tiny Llama from scratch on a world until the facts are known, then anneal."""
    import torch

    from rtteval.stages.pretrain import PretrainConfig
    from rtteval.stages.pretrain import pretrain as run_pretrain

    if threads:
        torch.set_num_threads(threads)
    cfg = apply_settings(
        PretrainConfig,
        {"model_preset": model_preset, "lr": lr, "batch_size": batch_size,
         "max_epochs": max_epochs, "target_accuracy": target, "anneal_epochs": anneal_epochs,
         "seed": seed, "exclude_forget": exclude_forget},
        settings, flags={"target_accuracy": "--target"},
    )  # fmt: skip
    m = run_pretrain(world, out, cfg, overwrite=overwrite)
    print(
        json.dumps(
            {k: m[k] for k in ("kind", "forget_acc", "retain_acc", "reached_target", "n_params")}
        )
    )


@app.command()
def finetune(
    model: Annotated[str, typer.Option(help="base model dir (normally the never-learned control)")],
    world: Annotated[str, typer.Option(help="world (dataset) directory")],
    out: Annotated[Path, typer.Option(help="output model directory")],
    lr: Annotated[float, typer.Option(parser=POSITIVE)] = 1e-3,
    max_epochs: Annotated[int, typer.Option(parser=COUNT)] = 80,
    replay_ratio: Annotated[
        float,
        typer.Option(
            help="retain passages replayed per forget passage (0: none)", parser=NON_NEGATIVE
        ),
    ] = 0.5,
    target: Annotated[
        float, typer.Option(help="stop when accuracy reaches this", parser=ACCURACY)
    ] = 0.97,
    seed: Annotated[int, typer.Option(parser=SEED)] = 0,
    overwrite: Annotated[bool, typer.Option(help=_OVERWRITE_HELP)] = False,
    settings: settings_argument("grad_clip=null") = None,
) -> None:
    """Learn the forget facts in a later fine-tuning phase (the paper's Random Birthdays regime)."""
    from rtteval.stages.finetune import FinetuneConfig, finetune_forget_facts

    cfg = apply_settings(
        FinetuneConfig,
        {"lr": lr, "max_epochs": max_epochs, "replay_ratio": replay_ratio,
         "target_accuracy": target, "seed": seed},
        settings, flags={"target_accuracy": "--target"},
    )  # fmt: skip
    m = finetune_forget_facts(model, world, out, cfg, overwrite=overwrite)
    print(
        json.dumps(
            {k: m[k] for k in ("kind", "before", "forget_acc", "retain_acc", "reached_target")}
        )
    )


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Option(help="hub id or local model directory")],
    data: Annotated[str, typer.Option(help="dataset directory")],
    mode: Annotated[
        str | None, typer.Option(help="letter, calibrated or likelihood (default: per dataset)")
    ] = None,
    letter_format: Annotated[
        str, typer.Option(help="paper ('A. '), bare ('A') or space (' A')")
    ] = "paper",
    batch_size: Annotated[int, typer.Option(parser=COUNT)] = 32,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps")] = "auto",
    settings: settings_argument("n_shots=5") = None,
) -> None:
    """Accuracy of a model on every split of a dataset, as JSON."""
    from rtteval.data import load_dataset
    from rtteval.models import load_model
    from rtteval.scoring import LETTER_FORMATS, ScoringConfig, evaluate_mcq
    from rtteval.stages.pretrain import scoring_for

    check_device_option(device)
    if mode is not None and mode not in ("letter", "calibrated", "likelihood"):
        raise UserError(f"{mode!r}: use letter, calibrated or likelihood", file="--mode")
    if letter_format not in LETTER_FORMATS and "{letter}" not in letter_format:
        raise UserError(
            f"{letter_format!r}: use {', '.join(LETTER_FORMATS)} or a template with {{letter}}",
            file="--letter-format",
        )
    ds = load_dataset(data)
    sc = scoring_for(ds, batch_size=batch_size)
    if mode is not None:
        sc.mode = mode  # type: ignore[assignment]
    sc.letter_format = letter_format
    given = {f.name: getattr(sc, f.name) for f in dataclasses.fields(sc) if f.name != "dev"}
    sc = dataclasses.replace(
        apply_settings(ScoringConfig, given, settings, exclude=("dev",)), dev=sc.dev
    )
    m, tok = load_model(model, device=device)
    out = {
        name: evaluate_mcq(m, tok, qs, sc).accuracy
        for name, qs in {**ds.splits, **ds.retain}.items()
    }
    print(json.dumps({"mode": sc.mode, "accuracy": out}))


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="output directory")] = Path("runs/demo"),
    overrides: Annotated[
        list[str] | None, typer.Argument(help="dotted key=value overrides of the demo config")
    ] = None,
) -> None:
    """The embedded default end to end: world, pretraining, GD/RIA/RMU, RTT on all folds, report."""
    from rtteval.analysis.report import summary_table
    from rtteval.demo import run_demo

    results = run_demo(out, overrides=list(overrides or []), say=console.print)
    screen = Console(width=max(140, Console().width))
    screen.print(_models_table(results))
    screen.print(summary_table(results))
    wall = results.get("meta", {}).get("demo_wall_time", 0.0)
    Console().print(
        f"report: {Path(out) / 'report.md'}  plots: {Path(out) / 'fig_recovery.png'}  ({wall:.0f} s)"
    )


def _models_table(results: dict) -> Table:
    """Likelihood accuracy of every model before RTT: forget (all splits) and held-out retain."""
    t = Table(
        title="Models before RTT (forget = all forget splits, retain = held-out retain facts)"
    )
    for c in ("dataset", "model", "forget acc", "retain acc"):
        t.add_column(c, justify="left" if c in ("dataset", "model") else "right")

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    seen: set[str] = set()
    for e in results["summary"]:
        if e["dataset"] not in seen:
            seen.add(e["dataset"])
            t.add_row(e["dataset"], "original", fmt(e["original"]), fmt(e.get("retain_original")))
            t.add_row(
                e["dataset"],
                "control (never learned)",
                fmt(e.get("control")),
                fmt(e.get("retain_control")),
            )
        t.add_row(
            e["dataset"],
            f"unlearned: {e['method']}",
            fmt(e["unlearned"]),
            fmt(e.get("retain_unlearned")),
        )
    return t


show_ranges(app)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
    """Warnings meant for the user (DataWarning, lost-update) as one line, like errors."""
    return f"rtteval: warning: {' '.join(str(message).split())}\n"


def main() -> None:
    """Entry point: user errors become one stderr line and exit status 2."""
    warnings.formatwarning = _one_line_warning
    try:
        rc = app(standalone_mode=False)
        # with standalone_mode=False, a command's typer.Exit(code) comes back as a return value
        if isinstance(rc, int) and rc != 0:
            if rc == 130:  # Ctrl-C, which typer turns into a silent exit status
                print("rtteval: interrupted", file=sys.stderr)
            sys.exit(rc)
    except UserError as e:
        print(f"rtteval: error: {e.render()}", file=sys.stderr)
        sys.exit(2)
    except (typer.Exit, SystemExit) as e:
        code = getattr(e, "exit_code", getattr(e, "code", 0))
        sys.exit(code)
    except typer.Abort:
        print("rtteval: aborted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        # usage errors (unknown option, bad value) from typer's click layer
        if hasattr(e, "exit_code") and hasattr(e, "format_message"):
            if type(e).__name__ == "NoArgsIsHelpError":  # bare `rtteval` / `rtteval data`
                e.show()
            else:
                print(f"rtteval: error: {_usage_line(e)}", file=sys.stderr)
            sys.exit(e.exit_code)
        raise


def _usage_line(e: Exception) -> str:
    """A click usage error as one line, with where to find the command's help."""
    msg = " ".join(e.format_message().split()).replace("Value error, ", "")  # type: ignore[attr-defined]
    ctx = getattr(e, "ctx", None)
    if ctx is not None and getattr(ctx, "command_path", None):
        msg += f" (see '{ctx.command_path} --help')"
    return msg
