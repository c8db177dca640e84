"""``rtteval attack``, ``rtteval report`` and ``rtteval findings``.

``attack`` runs a registered attack (``--attack``, default ``rtt``) on the
original model (ceiling), the never-learned control (floor) and the
unlearned model, one model in memory at a time, and writes the report.
It is a one-stage study run by the runner into OUT (the ``unlearned``
models of a study config, docs/runner.md): every (model, fold) is a job
keyed by the content of the models, the data and the attack's settings, so
an interrupted run resumes where it stopped and an edited model is attacked
again (``--no-resume`` recomputes everything).  The grid options set the
attack's config fields of the same name; one the attack does not have is an
error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from rtteval.cli.options import COUNT, COUNT0, POSITIVE, SEED, Number, check_device_option
from rtteval.cli.settings import apply_settings, settings_argument
from rtteval.errors import ConfigError, UserError
from rtteval.outputs import OVERWRITE_HELP, ResumableOutput

_ATTACK_ENTRIES = (
    "runs.db", "jobs", "logs", "study.yaml", "results.json", "results.csv", "results_folds.csv",
    "report.md", "fig_recovery.png", "fig_rtt_curves.png",
)  # fmt: skip
"""What ``attack`` writes into OUT: a user's file of one of these names is never replaced."""

console = Console(stderr=True, markup=False, highlight=False)


def _floats(text: str | None, name: str) -> list[float] | None:
    if text is None:
        return None
    try:
        vals = [POSITIVE(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ConfigError(
            f"expected a comma-separated list of finite numbers > 0, got {text!r} ({e})",
            file=f"--{name}",
        ) from None
    if not vals:
        raise ConfigError("empty list", file=f"--{name}")
    return vals


def _names(text: str | None, name: str) -> list[str] | None:
    if text is None:
        return None
    vals = [x.strip() for x in text.split(",") if x.strip()]
    if not vals:
        raise ConfigError("empty list", file=f"--{name}")
    return vals


def _attack_figures(attack: str) -> tuple[str, ...]:
    """The figures a one-attack study's report may add (analysis/budget.py, analysis/overview.py)."""
    return (f"fig_budget_{attack}.png", "fig_attacks.png")


def _ints(text: str | None, name: str) -> list[int] | None:
    if text is None:
        return None
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(
            f"expected a comma-separated list of whole numbers, got {text!r}", file=f"--{name}"
        ) from None
    if not vals:
        raise ConfigError("empty list", file=f"--{name}")
    return vals


def attack_cmd(
    model: Annotated[str, typer.Option(help="the unlearned model (hub id or directory)")],
    original: Annotated[str, typer.Option(help="the model before unlearning (ceiling)")],
    data: Annotated[str, typer.Option(help="dataset directory (forget splits, retain, corpora)")],
    out: Annotated[Path, typer.Option(help="output directory for results and report")],
    attack: Annotated[
        str,
        typer.Option(
            help="registered attack: rtt, lora_rtt, retain_relearn, unrelated_relearn, icl, "
            "quantize, probe (docs/attacks.md)"
        ),
    ] = "rtt",
    control: Annotated[
        str | None, typer.Option(help="a model that never learned the forget facts (floor)")
    ] = None,
    paper: Annotated[
        bool, typer.Option(help="start from the paper's 8B preset (docs/paper-fidelity.md)")
    ] = False,
    lrs: Annotated[str | None, typer.Option(help="comma-separated learning rates")] = None,
    epochs: Annotated[int | None, typer.Option(parser=COUNT)] = None,
    batch_size: Annotated[int | None, typer.Option(parser=COUNT)] = None,
    optimizer: Annotated[str | None, typer.Option(help="adamw or lion")] = None,
    text_format: Annotated[
        str | None,
        typer.Option(
            help="format of the training texts: auto, mcq (paper), mcq_answer, qa or corpus"
        ),
    ] = None,
    folds: Annotated[
        str | None, typer.Option(help="comma-separated V splits (default: all forget splits)")
    ] = None,
    holdout_fraction: Annotated[
        float | None,
        typer.Option(
            help="share of T held out for the honest attacker (0: the paper's protocol)",
            parser=Number(float, ge=0, lt=1),
        ),
    ] = None,
    overlap: Annotated[
        str | None, typer.Option(help="T questions whose text is a V question: drop or error")
    ] = None,
    shots: Annotated[
        str | None, typer.Option(help="icl: comma-separated shot counts k (default 1,3,5,10)")
    ] = None,
    schemes: Annotated[
        str | None,
        typer.Option(
            help="quantize: comma-separated int8-channel, int8-group, int4-channel, int4-group"
        ),
    ] = None,
    group_size: Annotated[
        int | None,
        typer.Option(help="quantize: inputs per scale of the *-group schemes", parser=COUNT),
    ] = None,
    eval_every_steps: Annotated[
        int | None,
        typer.Option(
            help="rtt, lora_rtt, retain_relearn: also evaluate V every k optimizer steps "
            "(budget curves)",
            parser=COUNT,
        ),
    ] = None,
    rank: Annotated[
        int | None, typer.Option(help="lora_rtt: the adapters' rank (default 8)", parser=COUNT)
    ] = None,
    ranks: Annotated[
        str | None,
        typer.Option(help="lora_rtt: comma-separated rank grid, crossed with --lrs"),
    ] = None,
    alpha: Annotated[
        float | None,
        typer.Option(help="lora_rtt: LoRA's alpha (default 2 x rank)", parser=POSITIVE),
    ] = None,
    dropout: Annotated[
        float | None,
        typer.Option(
            help="lora_rtt: dropout on the adapters' input (0: none, the default)",
            parser=Number(float, ge=0, lt=1),
        ),
    ] = None,
    target_modules: Annotated[
        str | None,
        typer.Option(
            help="lora_rtt: comma-separated module names (default: attention and MLP projections)"
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(parser=SEED)] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps")] = "auto",
    precision: Annotated[
        str | None,
        typer.Option(help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16, bf16-pure or fp16"),
    ] = None,
    method_name: Annotated[
        str | None,
        typer.Option(help="label of the unlearned model in the report (default: its directory)"),
    ] = None,
    eval_batch_size: Annotated[
        int, typer.Option(help="questions per scoring batch", parser=COUNT)
    ] = 128,
    n_boot: Annotated[
        int, typer.Option(help="bootstrap resamples (0: no confidence intervals)", parser=COUNT0)
    ] = 1000,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads", parser=COUNT)] = None,
    resume: Annotated[
        bool, typer.Option(help="reuse finished attacks found in OUT (keyed on content)")
    ] = True,
    overwrite: Annotated[
        bool, typer.Option(help=OVERWRITE_HELP + " (recomputes every attack)")
    ] = False,
    settings: settings_argument("warmup_steps=10 (the attack's own fields, docs/runner.md)") = None,
) -> None:
    """Attack (RTT by default: fine-tune on T, measure V) the unlearned, original and control models."""
    check_device_option(device)
    runner = _registered_attack(attack)
    given: dict[str, Any] = {
        "paper": paper or None,
        "lrs": _floats(lrs, "lrs"),
        "epochs": epochs,
        "batch_size": batch_size,
        "optimizer": optimizer,
        "text_format": text_format,
        "holdout_fraction": holdout_fraction,
        "overlap": overlap,
        "shots": _ints(shots, "shots"),
        "schemes": [x.strip() for x in schemes.split(",") if x.strip()] if schemes else None,
        "group_size": group_size,
        "precision": precision,
        "eval_every_steps": eval_every_steps,
        "rank": rank,
        "ranks": _ints(ranks, "ranks"),
        "alpha": alpha,
        "dropout": dropout,
        "target_modules": _names(target_modules, "target-modules"),
    }
    if rank is not None and ranks is not None:
        raise ConfigError("give --rank or --ranks, not both", file="--ranks")
    spec = _attack_spec(runner, attack, given, settings, seed)
    ds, fold_list, label = _checked_inputs(data, folds, model, original, control, method_name)
    names = (*_ATTACK_ENTRIES, *_attack_figures(attack))
    target = ResumableOutput(out, overwrite=overwrite, kind="attack", names=names)
    if not resume and target.resumed:  # recompute everything: replace the earlier output
        target = ResumableOutput(out, overwrite=True, kind="attack", names=names)
    cfg = _attack_study(
        spec, attack, target.path, seed=seed, device=device, original=original, control=control,
        model=model, data=data, ds=ds, label=label, fold_list=fold_list,
        eval_batch_size=eval_batch_size, threads=threads, n_boot=n_boot,
    )  # fmt: skip
    target.open()  # with --overwrite, the earlier output goes now, after every check
    _run_and_show(cfg, target.path, out)


def _registered_attack(attack: str) -> Any:
    """The registered attack named by ``--attack``; an unknown name lists the known ones."""
    from rtteval.attacks import ATTACKS, get_attack

    if attack not in ATTACKS:
        raise ConfigError(
            f"unknown attack {attack!r}; known: {', '.join(sorted(ATTACKS))}", file="--attack"
        )
    return get_attack(attack)


def _attack_spec(
    runner: Any, attack: str, given: dict[str, Any], settings: list[str] | None, seed: int | None
) -> Any:
    """The attack's validated config from its options (None: not given) and ``key=value`` settings.

    Every error names the option that caused it (``--rank``, not the
    config's ``rank``), since the user typed options, not a config file.
    """
    from rtteval.training.precision import check_precision

    given = {k: v for k, v in given.items() if v is not None}
    if "precision" in given:
        check_precision(given["precision"])  # names the known precisions
    own = runner.config_type.model_fields
    for k in given:
        if k not in own:
            raise ConfigError(
                f"attack {attack!r} has no setting {k!r}", file="--" + k.replace("_", "-")
            )
    spec = apply_settings(
        runner.config_type, {"name": attack, **given}, settings,
        exclude=("name", "folds", "controls", "eval_batch_size"),
    )  # fmt: skip
    try:  # name the option, not the config's field
        spec.resolved(seed if seed is not None else 0)
    except ConfigError as e:
        if e.field and e.file is None:
            raise ConfigError(e.message, file="--" + e.field.replace("_", "-")) from None
        raise
    return spec


def _checked_inputs(
    data: str,
    folds: str | None,
    model: str,
    original: str,
    control: str | None,
    method_name: str | None,
) -> tuple[Any, list[str] | None, str]:
    """The dataset, the V folds and the unlearned model's label, checked before any output exists."""
    from rtteval.data import load_dataset
    from rtteval.models.loading import check_model_source

    fold_list = [f.strip() for f in folds.split(",") if f.strip()] if folds else None
    ds = load_dataset(data)
    unknown = [f for f in fold_list or [] if f not in ds.splits]
    if unknown:
        raise ConfigError(
            f"{', '.join(unknown)}: not a forget split of {ds.root} ({', '.join(ds.split_names)})",
            file="--folds",
        )
    label = method_name or Path(model).name
    if label in ("original", "control"):  # the other arms' names in the report
        if method_name is not None:
            raise ConfigError(f"{label!r} names another arm; choose another", file="--method-name")
        label = "unlearned"
    for path in (original, control, model):  # a bad model fails before any output exists
        if path is not None:
            check_model_source(path)
    return ds, fold_list, label


def _attack_study(
    spec: Any,
    attack: str,
    out_dir: Path,
    *,
    seed: int | None,
    device: str,
    original: str,
    control: str | None,
    model: str,
    data: str,
    ds: Any,
    label: str,
    fold_list: list[str] | None,
    eval_batch_size: int,
    threads: int | None,
    n_boot: int,
) -> Any:
    """The one-stage study the runner executes: the command's models as ``unlearned`` and ``hf``."""
    from pydantic import ValidationError

    from rtteval.config.study import StudyConfig

    study = {
        "name": "attack",
        "output_dir": str(out_dir),
        "seeds": [seed if seed is not None else 0],
        "device": device,
        "model": {"hf": {**_ref(original), "control": _ref(control) if control else None}},
        "datasets": [{"name": ds.name, "path": str(ds.root) if _local(data) else data}],
        "unlearned": [{"label": label, **_ref(model)}],
        "attacks": [{**spec.model_dump(exclude_unset=True), "name": attack,
                     "folds": fold_list, "eval_batch_size": eval_batch_size}],
        "executor": {"kind": "sequential", "threads_per_worker": threads},
        "retries": 0,  # a failure here is deterministic; the next run tries again
        "report": {"n_boot": n_boot},
    }  # fmt: skip
    try:
        return StudyConfig.model_validate(study)
    except ValidationError as e:  # pragma: no cover - the options were checked above
        raise ConfigError(str(e.errors()[0]["msg"]), file="--attack") from None


def _run_and_show(cfg: Any, out_dir: Path, out: Path) -> None:
    """Run the study, fail in one line if a job failed, print the summary and the files."""
    from rich.console import Console as _Console

    from rtteval.analysis.report import load_results, summary_table
    from rtteval.config.study import LoadedConfig
    from rtteval.runner.driver import run_study

    summary = run_study(
        LoadedConfig(cfg, None), say=lambda s: console.print(s), output_kind="attack"
    )
    if summary.failed:
        raise UserError(
            f"{len(summary.failed)} attack job(s) failed, e.g. {summary.failed[0]}; see "
            f"{out_dir}/logs (run the command again to retry them)"
        )
    results = load_results(out_dir)
    _Console().print(summary_table(results))
    files = sorted((summary.report or {}).get("files", []))
    print(json.dumps({"out": str(out), "files": files}))


def _local(ref: str) -> bool:
    return Path(ref).exists()


def _ref(ref: str) -> dict[str, str]:
    """A model option as the study's model reference: a local directory, else a hub id."""
    return {"path": str(Path(ref).resolve())} if _local(ref) else {"id": ref}


def report_cmd(
    run_dir: Annotated[Path, typer.Argument(help="directory holding results.json")],
) -> None:
    """Regenerate results.csv, report.md and the plots from RUN_DIR/results.json."""
    from rich.console import Console as _Console

    from rtteval.analysis.report import load_results, regenerate, summary_table

    if not run_dir.is_dir():
        raise UserError("not a directory", file=run_dir)
    paths = regenerate(run_dir)
    _Console().print(summary_table(load_results(run_dir)))
    print(json.dumps({"out": str(run_dir), "files": sorted(p.name for p in paths.values())}))


def findings_cmd(
    run_dir: Annotated[Path, typer.Argument(help="directory holding results.json")],
) -> None:
    """Write findings.json, findings.md and figures (the paper's findings) from RUN_DIR/results.json."""
    from rtteval.analysis.findings import write_findings

    if not run_dir.is_dir():
        raise UserError("not a directory", file=run_dir)
    paths = write_findings(run_dir)
    console.print(f"findings: {run_dir / 'findings.md'}")
    print(json.dumps({"out": str(run_dir), "files": sorted(p.name for p in paths.values())}))
