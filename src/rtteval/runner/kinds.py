"""The built-in job kinds: world, pretrain, finetune, unlearn, select, attack.

Each is a thin adapter from a job config (see :mod:`rtteval.runner.plan`)
to the library functions that do the work (:func:`rtteval.stages.pretrain.pretrain`,
:func:`rtteval.stages.unlearn.unlearn`, the registered attack), writing its outputs
into ``job_dir`` and returning ``(metrics, artifacts[, status])``.  Heavy
imports happen inside the functions: the driver imports this module to look
kinds up and must not pay for torch unless it runs a job itself.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

from rtteval.atomic import write_json_atomic
from rtteval.runner.jobs import Dep, JobOutput, job_kind

MODEL_STAGES = ("pretrain", "finetune", "select")


def _dep(deps: list[Dep], *stages: str) -> Dep | None:
    for d in deps:
        if d.stage in stages:
            return d
    return None


def _data_dirs(config: dict[str, Any], deps: list[Dep]) -> tuple[str, str | None]:
    data = config["data"]
    if data.get("from") == "world":
        w = _dep(deps, "world")
        if w is None:
            raise RuntimeError("job needs its world dependency")
        path = str(w.artifacts["data"])
    else:
        path = data["path"]
    return path, data.get("retain")


def _datasets(config: dict[str, Any], deps: list[Dep]) -> tuple[Any, Any]:
    """The forget dataset and the retain dataset (``None``: the forget data's own retain files).

    ``retain_splits`` (the paper's Random Birthdays) splits the retain data
    off the forget directory itself.
    """
    from rtteval.data import load_dataset

    data, retain = _data_dirs(config, deps)
    ds = load_dataset(data)
    names = config["data"].get("retain_splits")
    if names:
        return ds.split_off(names)
    return ds, load_dataset(retain) if retain else None


def _load(config: dict[str, Any], deps: list[Dep]) -> tuple[Any, Any]:
    """The job's model: a dependency's artifact, or a hub id / path from the config."""
    from rtteval.models import load_model

    rt = config.get("_runtime", {})
    src = config["model"]
    if src == "dep":
        d = _dep(deps, *MODEL_STAGES)
        if d is None or not d.artifacts.get("model"):
            raise RuntimeError("job needs a model from its dependency, which has none")
        return load_model(
            d.artifacts["model"],
            device=rt.get("device", "auto"),
            gradient_checkpointing=bool(rt.get("gradient_checkpointing")),
        )
    ref = src["id"] if src.get("id") is not None else src["path"]
    return load_model(
        ref,
        dtype=src.get("dtype", "auto"),
        device=rt.get("device", "auto"),
        trust_remote_code=bool(src.get("trust_remote_code")),
        device_map=rt.get("device_map"),
        gradient_checkpointing=bool(rt.get("gradient_checkpointing")),
    )


def _free(*objs: Any) -> None:
    del objs
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- world / models


@job_kind("world", uses_torch=False, gpu=False)
def world_job(config: dict[str, Any], deps: list[Dep], job_dir: Path) -> JobOutput:
    """Generate the synthetic world (deterministic in its seed) into ``job_dir/data``."""
    import json

    from rtteval.data.world import write_world

    path = write_world(
        job_dir / "data", seed=config["seed"], preset=config["preset"], overwrite=True,
        **config.get("overrides", {}),
    )  # fmt: skip
    manifest = json.loads((path / "manifest.json").read_text())
    return JobOutput({"counts": manifest.get("counts", {})}, {"data": Path("data")})


@job_kind("pretrain")
def pretrain_job(config: dict[str, Any], deps: list[Dep], job_dir: Path) -> JobOutput:
    """Pretrain a tiny model on the world: the original, or the never-learned control."""
    from rtteval.stages.pretrain import PretrainConfig, pretrain

    data, _ = _data_dirs({"data": {"from": "world"}}, deps)
    cfg = PretrainConfig(
        model_preset=config["model_preset"],
        seed=config["seed"],
        exclude_forget=config["exclude_forget"],
        precision=config.get("precision", "auto"),
        **config["pretrain"],
    )
    m = pretrain(data, job_dir / "model", cfg, progress=False)
    print(f"pretrain {config['role']}: forget {m['forget_acc']} retain {m['retain_acc']}")
    metrics = {k: m[k] for k in ("kind", "forget_acc", "retain_acc", "reached_target", "n_params")}
    metrics["wall_time"] = m["train"]["wall_time"] + m.get("anneal", {}).get("wall_time", 0.0)
    return JobOutput(metrics, {"model": Path("model")})


@job_kind("finetune")
def finetune_job(config: dict[str, Any], deps: list[Dep], job_dir: Path) -> JobOutput:
    """Teach the model the dataset's facts first (the paper's Random Birthdays setup).

    The model is a hub model, or the tiny never-learned control pretrained
    on the same world; :func:`rtteval.stages.finetune.finetune_facts` trains it on
    the forget facts (replaying retain text) until ``target_accuracy``.
    """
    from rtteval.data import load_dataset
    from rtteval.stages.finetune import FinetuneConfig, finetune_facts

    data, _ = _data_dirs(config, deps)
    cfg = FinetuneConfig(
        **{**config["finetune"], "seed": config["seed"]},
        precision=config.get("precision", "auto"),
    )
    model, tok = _load(config, deps)
    m = finetune_facts(model, tok, load_dataset(data), job_dir / "model", cfg, progress=False)
    _free(model)
    metrics = {"forget_acc_before": m["before"].get("forget_acc"),
               "retain_acc_before": m["before"].get("retain_acc"),
               "forget_acc": m["forget_acc"], "retain_acc": m["retain_acc"],
               "status": m["status"], "reached_target": m["reached_target"],
               "steps": m["train"]["steps"], "wall_time": m["train"]["wall_time"]}  # fmt: skip
    print(f"finetune: forget {metrics['forget_acc_before']} -> {metrics['forget_acc']}")
    write_json_atomic(job_dir / "metrics.json", metrics)
    if m["status"] == "diverged":
        return JobOutput(metrics, {"model": None}, "diverged")
    return JobOutput(metrics, {"model": Path("model")})


# --------------------------------------------------------------------------- unlearning


@job_kind("unlearn")
def unlearn_job(config: dict[str, Any], deps: list[Dep], job_dir: Path) -> JobOutput:
    """One grid point of one method: unlearn from the original, save the model and metrics."""
    from rtteval.models import save_model
    from rtteval.stages.unlearn import UnlearnConfig, apply_point, unlearn

    ds, retain_ds = _datasets(config, deps)
    cfg = apply_point(
        UnlearnConfig(
            method=config["method"], seed=config["seed"], precision=config.get("precision", "auto")
        ),
        {**config.get("fixed", {}), **config.get("point", {})},
    )
    model, tok = _load(config, deps)
    res = unlearn(model, tok, ds, cfg, retain_dataset=retain_ds, progress=False)
    write_json_atomic(job_dir / "unlearn.json", res.to_dict())
    metrics = {
        "status": res.status,
        "forget_acc": res.after.get("forget_acc"),
        "retain_acc": res.after.get("retain_acc"),
        "forget_acc_before": res.before.get("forget_acc"),
        "retain_acc_before": res.before.get("retain_acc"),
        "steps": res.steps,
        "wall_time": res.wall_time,
        "point": config.get("point", {}),
        "message": res.message,
    }
    print(f"unlearn {config['label']} {config.get('point')}: {metrics}")
    if res.status == "diverged":
        _free(model)
        return JobOutput(metrics, {"model": None, "result": Path("unlearn.json")}, "diverged")
    save_model(model, tok, job_dir / "model")
    _free(model)
    return JobOutput(metrics, {"model": Path("model"), "result": Path("unlearn.json")})


@job_kind("select", inline=True, uses_torch=False, gpu=False)
def select_job(config: dict[str, Any], deps: list[Dep], job_dir: Path) -> JobOutput:
    """Pick the grid point by the selection rule (:func:`rtteval.stages.unlearn.select_point`).

    Lowest forget accuracy among points that did not diverge and kept retain
    accuracy >= the original's minus ``retain_threshold``.  Nothing
    qualifying is a result, not an error: the job is ``skipped`` and so are
    the attacks on this method, and the report says so.
    """
    from rtteval.stages.unlearn import select_point

    units = [d for d in deps if d.stage == "unlearn"]
    units.sort(key=lambda d: d.config.get("index", 0))
    rows = [
        {"index": d.config.get("index"), "params": d.config.get("point"), "status": d.status,
         "forget_acc": d.metrics.get("forget_acc"), "retain_acc": d.metrics.get("retain_acc")}
        for d in units
    ]  # fmt: skip
    befores = [d.metrics.get("retain_acc_before") for d in units]
    befores = [b for b in befores if b is not None]
    if not befores:
        return JobOutput(
            {"selected": None, "points": rows, "note": "no grid point ran"}, {}, "skipped"
        )
    original_retain = befores[0]
    thr = float(config["retain_threshold"])
    i = select_point(rows, original_retain, thr)
    metrics: dict[str, Any] = {
        "original_retain_acc": original_retain,
        "retain_threshold": thr,
        "points": rows,
        "selected": i,
    }
    write_json_atomic(job_dir / "select.json", metrics)
    if i is None:
        metrics["note"] = (
            f"no grid point kept retain accuracy >= {original_retain:.3f} - {thr:g} "
            "without diverging; nothing selected"
        )
        return JobOutput(metrics, {"model": None}, "skipped")
    chosen = units[i]
    metrics.update(point=rows[i]["params"], forget_acc=rows[i]["forget_acc"],
                   retain_acc=rows[i]["retain_acc"], unlearn_key=chosen.key)  # fmt: skip
    return JobOutput(metrics, {"model": Path(chosen.artifacts["model"]), "unlearn_key": chosen.key})


# --------------------------------------------------------------------------- attack


@job_kind("attack")
def attack_job(config: dict[str, Any], deps: list[Dep], job_dir: Path) -> JobOutput:
    """One (model, fold) of the registered attack ``config["attack"]``, settings under its name."""
    from rtteval.attacks import AttackContext, get_attack
    from rtteval.stages.pretrain import retain_eval_name, scoring_for

    ds, retain_ds = _datasets(config, deps)
    fold = config["fold"]
    if fold not in ds.splits:
        raise ValueError(f"fold {fold!r} is not a forget split of {ds.root} ({ds.split_names})")
    if retain_ds is not None:
        from rtteval.stages.unlearn import retain_data

        retain_q = list(retain_data(ds, retain_ds, seed=config["seed"]).eval_questions)
    else:
        r_name = retain_eval_name(ds)
        retain_q = list(ds.retain[r_name]) if r_name else []
    rt = config.get("_runtime", {})
    attack = get_attack(config["attack"])
    scoring = scoring_for(ds, batch_size=int(rt.get("eval_batch_size", 128)))
    model, tok = _load(config, deps)
    ctx = AttackContext(
        model, tok, ds, scoring, folds=[fold], retain_questions=retain_q,
        retain_dataset=retain_ds, label=config["label"], progress=False, log=print,
    )  # fmt: skip
    settings = {**config[config["attack"]], "precision": config.get("precision", "auto"),
                **({"save_adapters": str(job_dir / "adapters")}
                   if getattr(attack, "saves_adapters", False) else {})}  # fmt: skip
    result = attack.run(settings, ctx)
    _free(model)
    result.meta.update(role=config["role"], method=config.get("method"), seed=config["seed"])
    if isinstance(config["model"], dict):  # a hub id or a directory, not a job's model
        result.meta["model"] = config["model"].get("id") or config["model"].get("path")
    d = result.to_dict()
    write_json_atomic(job_dir / "attack.json", d)
    f = result.folds[0]
    best = max((e.v_acc for r in f.runs for e in r.epochs), default=None)
    metrics = {
        "fold": fold,
        "v_acc_before": f.before.v_acc,
        "v_acc_best": best,
        "runs": {str(r.lr): [e.v_acc for e in r.epochs] for r in f.runs},
        "wall_time": result.wall_time,
    }
    return JobOutput(metrics, {"attack": Path("attack.json")})
