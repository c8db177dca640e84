"""``rtteval attack``, ``rtteval report`` and ``rtteval findings``.

``attack`` runs a registered attack (``--attack``, default ``rtt``) on the
original model (ceiling), the never-learned control (floor) and the
unlearned model, one model in memory at a time, and writes the report.
Each model's attack is saved to ``OUT/attacks/<role>.json`` as soon as it
finishes, keyed by the model files, dataset, attack and its settings, so an
interrupted run resumes where it stopped (``--no-resume`` recomputes
everything).  The grid options set the attack's config fields of the same
name; one the attack does not have is an error.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from rtteval.cli.options import COUNT, COUNT0, POSITIVE, SEED, Number, check_device_option
from rtteval.errors import ConfigError, UserError
from rtteval.outputs import OVERWRITE_HELP, ResumableOutput

_REPORT_FILES = ("results.json", "results.csv", "results_folds.csv", "report.md")
_ATTACK_ENTRIES = ("attacks", "adapters", *_REPORT_FILES, "fig_recovery.png", "fig_rtt_curves.png")
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


def _names(text: str | None, name: str) -> list[str] | None:
    if text is None:
        return None
    vals = [x.strip() for x in text.split(",") if x.strip()]
    if not vals:
        raise ConfigError("empty list", file=f"--{name}")
    return vals


def _model_fingerprint(path: str) -> str:
    """Path plus size and mtime of its files: a retrained model at the same path is not reused."""
    p = Path(path)
    parts = [str(p.resolve()) if p.exists() else path]
    if p.is_dir():
        for f in sorted(p.iterdir()):
            if f.is_file():
                st = f.stat()
                parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]


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
    loss: Annotated[
        str | None, typer.Option(help="auto, mcq (paper), mcq_answer, qa or corpus")
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
        str | None, typer.Option(help="label of the unlearned model in the report")
    ] = None,
    eval_batch_size: Annotated[
        int, typer.Option(help="questions per scoring batch", parser=COUNT)
    ] = 128,
    n_boot: Annotated[
        int, typer.Option(help="bootstrap resamples (0: no confidence intervals)", parser=COUNT0)
    ] = 1000,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads", parser=COUNT)] = None,
    resume: Annotated[bool, typer.Option(help="reuse finished attacks found in OUT")] = True,
    overwrite: Annotated[
        bool, typer.Option(help=OVERWRITE_HELP + " (recomputes every attack)")
    ] = False,
) -> None:
    """Attack (RTT by default: fine-tune on T, measure V) the unlearned, original and control models."""
    import gc

    import torch
    from pydantic import ValidationError
    from rich.console import Console as _Console

    from rtteval.analysis.report import build_results, summary_table, write_report
    from rtteval.atomic import write_json_atomic
    from rtteval.attacks import ATTACKS, AttackContext, get_attack
    from rtteval.attacks.records import ModelAttack
    from rtteval.data import load_dataset
    from rtteval.models import load_model
    from rtteval.models.loading import check_model_files
    from rtteval.stages.pretrain import retain_eval_name, scoring_for
    from rtteval.training.precision import check_precision

    check_device_option(device)
    if threads:
        torch.set_num_threads(threads)
    if attack not in ATTACKS:
        raise ConfigError(
            f"unknown attack {attack!r}; known: {', '.join(sorted(ATTACKS))}", file="--attack"
        )
    runner = get_attack(attack)
    saves = getattr(runner, "saves_adapters", False)
    given: dict[str, Any] = {
        "paper": paper or None,
        "lrs": _floats(lrs, "lrs"),
        "epochs": epochs,
        "batch_size": batch_size,
        "optimizer": optimizer,
        "loss": loss,
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
    given = {k: v for k, v in given.items() if v is not None}
    if rank is not None and ranks is not None:
        raise ConfigError("give --rank or --ranks, not both", file="--ranks")
    if precision is not None:
        check_precision(precision)  # names the known precisions
    own = runner.config_type.model_fields
    for k in given:
        if k not in own:
            raise ConfigError(
                f"attack {attack!r} has no setting {k!r}", file="--" + k.replace("_", "-")
            )
    try:  # name the option, not the config's field
        spec = runner.config_type.model_validate({"name": attack, **given})
        settings = spec.resolved(seed if seed is not None else 0)
    except ValidationError as e:
        err = e.errors()[0]
        where = "--" + str(err["loc"][0]).replace("_", "-") if err["loc"] else "--attack"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] != "value_error" and "input" in err:
            msg += f" (got {err['input']!r})"
        raise ConfigError(msg, file=where) from None
    except ConfigError as e:
        if e.field and e.file is None:
            raise ConfigError(e.message, file="--" + e.field.replace("_", "-")) from None
        raise
    settings["precision"] = precision or "auto"
    fold_list = [f.strip() for f in folds.split(",") if f.strip()] if folds else None
    ds = load_dataset(data)
    unknown = [f for f in fold_list or [] if f not in ds.splits]
    if unknown:
        raise ConfigError(
            f"{', '.join(unknown)}: not a forget split of {ds.root} ({', '.join(ds.split_names)})",
            file="--folds",
        )
    scoring = scoring_for(ds, batch_size=eval_batch_size)
    r_name = retain_eval_name(ds)
    retain = ds.retain[r_name] if r_name else []
    label = method_name or Path(model).name
    jobs = [("original", original, "original"), ("unlearned", model, label)]
    if control:
        jobs.insert(1, ("control", control, "control"))
    for _role, path, _lab in jobs:  # a bad weights file fails before any output exists
        check_model_files(path)
    names = (*_ATTACK_ENTRIES, f"fig_budget_{attack}.png")
    target = ResumableOutput(out, overwrite=overwrite, kind="attack", names=names)
    resume = resume and not overwrite
    attacks: dict[str, ModelAttack] = {}
    for role, path, lab in jobs:
        key = {
            "model": _model_fingerprint(path),
            "data": str(ds.root.resolve()),
            "attack": attack,
            "config": settings,
            "folds": fold_list,
            "scoring": scoring.mode,
            "label": lab,
        }
        cache = out / "attacks" / f"{role}.json"
        if resume and cache.is_file():
            try:
                saved = json.loads(cache.read_text())
                if saved.get("key") == json.loads(json.dumps(key)):
                    attacks[role] = ModelAttack.from_dict(saved["attack"])
                    console.print(f"{role}: reusing {cache}")
                    continue
            except (json.JSONDecodeError, KeyError, TypeError):
                pass
        console.print(f"{role}: loading {path}")
        m, tok = load_model(path, device=device)
        # LoRA-RTT's adapters go to OUT/adapters/<role> once the attack is done (peft's format)
        staged = Path(tempfile.mkdtemp(prefix="rtteval-adapters-")) if saves else None
        try:
            ctx = AttackContext(
                m,
                tok,
                ds,
                scoring,
                folds=fold_list,
                retain_questions=retain,
                label=lab,
                progress=True,
                log=lambda s: console.print(f"  {s}"),
            )
            a = runner.run({**settings, "save_adapters": str(staged)} if staged else settings, ctx)
        except BaseException:
            if staged is not None:
                shutil.rmtree(staged, ignore_errors=True)
            raise
        finally:
            del m
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        a.meta["model"] = path
        a.meta["role"] = role
        target.open()
        target.add("attacks")
        if staged is not None:
            target.add("adapters")
            dest = out / "adapters" / role
            shutil.rmtree(dest, ignore_errors=True)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(staged, dest)
        write_json_atomic(cache, {"key": key, "attack": a.to_dict()})
        console.print(f"{role}: done in {a.wall_time:.1f} s")
        attacks[role] = a

    results = build_results(
        {label: attacks["unlearned"]},
        attacks["original"],
        attacks.get("control"),
        dataset=ds.name if attack == "rtt" else f"{ds.name} [{attack}]",
        config={
            "models": {"unlearned": model, "original": original, "control": control},
            "data": str(data),
            "device": device,
        },
        n_boot=n_boot,
        seed=int(settings["seed"]),
        info={"attack": attack, "base_dataset": ds.name},
    )
    target.open()
    target.add(*_REPORT_FILES)
    paths = write_report(out, results)
    target.add(*(p.name for p in paths.values()))
    _Console().print(summary_table(results))
    print(json.dumps({"out": str(out), "files": sorted(p.name for p in paths.values())}))


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
