"""Running an unlearning method: one run, the selection rule of a sweep, and the CLI's work.

Every method trains through :func:`rtteval.training.loop.train`; each step sees one
forget batch and one retain batch (``{"forget": ..., "retain": ...}``).  An
epoch is one pass over the forget text; the retain text is an endless stream
of shuffled passes, so when it is the shorter one it is cycled, and when it
is the longer one it simply carries on across epochs.

Forget accuracy is measured on all forget splits and retain accuracy on
held-out retain questions that the retain loss never trained on (the
world's ``retain_eval``; for the paper's datasets, half of the
``--retain-data`` question files, see :func:`retain_data`), before, every
``eval_every_steps`` steps during, and after training.  A run stops early
once forget accuracy reaches ``target_forget_acc``; a non-finite or
exploding loss ends it with status ``diverged`` rather than an exception.

A sweep (``rtteval unlearn --sweep``, a study's ``methods[].grid``) runs one
job per grid point through the runner and selects with :func:`select_point`:
the point with the lowest forget accuracy among those whose retain accuracy
is at least the original's minus ``retain_threshold`` (ties: higher retain
accuracy, then the earlier point).  Diverged points are never selected.  If
no point qualifies, nothing is selected and no model is written, because a
model that lost the retain facts is not a valid unlearned model to attack.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from rtteval.atomic import write_json_atomic
from rtteval.config.study import Precision
from rtteval.data import MCQ, Dataset, load_dataset
from rtteval.errors import ConfigError
from rtteval.methods import get_method
from rtteval.methods.base import (
    Method,
    UnlearnContext,
    combine_filters,
    frozen_filter,
    model_scale,
    only_filter,
)
from rtteval.models.loading import write_model_files
from rtteval.scoring import ScoringConfig, evaluate_mcq, format_mcq
from rtteval.stages.pretrain import scoring_for
from rtteval.training.batching import Batch, encode_texts, make_batches
from rtteval.training.config import TrainConfig
from rtteval.training.loop import DivergenceHook, train
from rtteval.training.precision import cast_for_precision, check_precision

#: UnlearnConfig fields that a method's per-scale defaults fill when left as None.
TRAIN_DEFAULT_KEYS = (
    "lr",
    "optimizer",
    "adam_eps",
    "adam_betas",
    "epochs",
    "max_steps",
    "batch_size",
    "warmup_steps",
    "target_forget_acc",
    "train_only",
)


@dataclass
class UnlearnConfig:
    """One unlearning run.  ``None`` means "the method's default for this model scale".

    ``hparams`` overrides the method's own hyperparameters (``retain_coef``,
    ``steering_coef``, ``alpha``, ``layer``, ``beta``, ``delta`` ...).
    ``max_loss_ratio``: a step whose |loss| exceeds this multiple of the
    first step's |loss| (taken as at least 100, so the NLL-based methods
    keep a cap of 1e4) counts as divergence; relative, because a method's
    loss scale depends on the model (RMU's MSE grows with the activation
    norm: one tiny model started at 3e4, another at 2e3).
    ``max_loss``, if set, is an absolute cap as well.
    ``frozen``: decoder-layer indices and/or parameter-name substrings kept
    fixed.  ``train_only``: train only parameters whose name contains one of
    these substrings (``[]``: all; tiny models default to
    ``["embed_tokens"]``, docs/methods.md says why).  ``adam_eps``: AdamW's ε
    (tiny default 1e-4, else torch's 1e-8).  Since ``None`` means
    "default", a negative ``target_forget_acc`` turns early stopping off and
    a large ``max_steps`` lifts the step cap.  ``grad_clip``: ``"auto"`` is
    the scale's default, ``None`` no clipping (the paper clips nothing).
    ``scale`` (``tiny``/``paper``) picks the defaults; ``None``: by parameter count.
    """

    method: str = "gd"
    hparams: dict[str, Any] = field(default_factory=dict)
    lr: float | None = None
    optimizer: Literal["adamw", "lion"] | None = None
    adam_eps: float | None = None
    adam_betas: tuple[float, float] | None = None
    epochs: int | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    warmup_steps: int | None = None
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    grad_clip: float | Literal["auto"] | None = "auto"
    weight_decay: float = 0.0
    frozen: list[int | str] | None = None
    train_only: list[str] | None = None
    eval_every_steps: int = 10
    target_forget_acc: float | None = None
    max_loss_ratio: float = 100.0
    max_loss: float | None = None
    seed: int = 0
    scale: str | None = None
    precision: Precision = "auto"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_config(cfg: UnlearnConfig, method: Method, scale: str) -> UnlearnConfig:
    """Fill the unset fields and hyperparameters from the method's defaults for ``scale``."""
    defaults = method.defaults.get(scale) or method.defaults["tiny"]
    method.check_hparams(cfg.hparams)
    check_precision(cfg.precision)
    out = replace(cfg, method=method.name, scale=scale)
    for k in TRAIN_DEFAULT_KEYS:
        if getattr(out, k) is None and k in defaults:
            setattr(out, k, copy.deepcopy(defaults[k]))
    if out.grad_clip == "auto":
        out.grad_clip = defaults.get("grad_clip", 1.0)
    if out.adam_betas is not None:
        out.adam_betas = (float(out.adam_betas[0]), float(out.adam_betas[1]))
    out.hparams = {**method.default_hparams(scale), **cfg.hparams}
    if out.lr is None or out.lr <= 0:
        raise ConfigError(f"learning rate must be positive, got {out.lr}")
    return out


def apply_point(cfg: UnlearnConfig, point: dict[str, Any]) -> UnlearnConfig:
    """``cfg`` with a grid point applied: config fields by name, anything else as a hparam."""
    names = {f.name for f in fields(UnlearnConfig)}
    out = replace(cfg, hparams=dict(cfg.hparams))
    for k, v in point.items():
        if k in names and k != "hparams":
            setattr(out, k, v)
        else:
            out.hparams[k] = v
    return out


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Cartesian product of a grid, in the order its keys and values are written."""
    if not grid:
        return [{}]
    keys = list(grid)
    for k in keys:
        if not isinstance(grid[k], list | tuple) or not grid[k]:
            raise ConfigError(f"grid entry {k!r} must be a non-empty list, got {grid[k]!r}")
    return [dict(zip(keys, vals, strict=True)) for vals in itertools.product(*grid.values())]


# --------------------------------------------------------------------------- data


def forget_texts(dataset: Dataset, method: Method) -> tuple[list[str], str]:
    """The forget-side training text of ``method`` and a description of where it came from.

    Methods on the true corpus fall back to the forget questions written out
    with their answers when a dataset has no ``corpus_`` files (MMLU);
    RIA/FWF need their wrong-answer corpora and refuse without them.
    """
    texts, _, source = _forget_items(dataset, method)
    return texts, source


def _forget_items(dataset: Dataset, method: Method) -> tuple[list[str], list[str | None], str]:
    """:func:`forget_texts` with each text's ``path:line``, for a length error that names it."""
    passages = dataset.passages(method.corpus)
    if passages:
        return (
            [p.text for p in passages], [p.source for p in passages],
            f"{method.corpus} of {dataset.split_names}",
        )  # fmt: skip
    if method.corpus == "corpus":
        qs = dataset.questions()
        texts = [format_mcq(q, with_answer=True) for q in qs]
        return (
            texts, [q.source for q in qs],
            f"forget questions with answers (no corpus_ files) of {dataset.split_names}",
        )  # fmt: skip
    prefix = {"wrong_corpus": "whp_corpus_", "fixed_wrong_corpus": "fwf_corpus_"}[method.corpus]
    raise ConfigError(
        f"method {method.name!r} trains on {prefix}<split>.jsonl files, and {dataset.root} "
        f"has none for its forget splits {dataset.split_names}"
    )


@dataclass
class RetainData:
    """Retain training text, the held-out retain questions, and how to score them."""

    texts: list[str]
    eval_questions: list[MCQ]
    scoring: ScoringConfig
    source: str
    text_sources: list[str | None] | None = None  # each text's path:line


def _texts_for(ds: Dataset, names: list[str]) -> tuple[list[str], list[str | None]]:
    passages = ds.passages("corpus", names)
    if passages:
        return [p.text for p in passages], [p.source for p in passages]
    qs = ds.questions(names)
    return [format_mcq(q, with_answer=True) for q in qs], [q.source for q in qs]


def retain_data(
    dataset: Dataset, retain_dataset: Dataset | None = None, *, seed: int = 0
) -> RetainData:
    """Where the retain loss trains and where retain accuracy is measured — never the same facts.

    * A world (its manifest names ``retain_train`` and ``retain_eval``): train
      on ``corpus_retain_train``, evaluate on ``retain_eval``.  The same holds
      for a ``retain_dataset`` that is a world.
    * Another ``retain_dataset`` (e.g. the paper's MMLU categories): its
      question files are divided alternately into train and eval halves (one
      file: a seeded half of its questions each); the train half's corpus, or
      its questions written out with answers, is the retain text.
    * Neither: :class:`ConfigError`, since evaluating retain accuracy on the
      retain training data would overstate what survives.
    """
    src = retain_dataset if retain_dataset is not None else dataset
    m = src.manifest or {}
    tr, ev = m.get("retain_train"), m.get("retain_eval")
    if tr in src.retain and ev in src.retain:
        texts, where = _texts_for(src, [tr])
        return RetainData(
            texts, src.retain[ev], scoring_for(src), f"{src.name}: {tr} / {ev}", where
        )
    if retain_dataset is None:
        raise ConfigError(
            f"{dataset.root} has no held-out retain data (a world's manifest names retain_train "
            "and retain_eval); pass --retain-data DIR, e.g. the MMLU retain categories"
        )
    names = list(src.splits) + list(src.retain)
    if len(names) >= 2:
        train_names, eval_names = names[1::2], names[0::2]
        (texts, where), eval_q = _texts_for(src, train_names), src.questions(eval_names)
        source = f"{src.name}: train {train_names} / eval {eval_names}"
    else:
        qs = list(src.questions(names))
        random.Random(seed).shuffle(qs)
        half = len(qs) // 2
        if half == 0:
            raise ConfigError(f"retain data {src.root} has too few questions to hold half out")
        texts = [format_mcq(q, with_answer=True) for q in qs[:half]]
        where = [q.source for q in qs[:half]]
        eval_q = qs[half:]
        source = f"{src.name}: {names[0]} split in halves (train {half} / eval {len(eval_q)})"
    return RetainData(texts, eval_q, scoring_for(src), source, where)


def paired_batches(
    forget: list[list[int]], retain: list[list[int]], batch_size: int, pad_id: int, seed: int
):
    """``batches(epoch)`` for train(): each forget batch paired with the next retain batch."""
    if not forget or not retain:
        raise ConfigError("unlearning needs non-empty forget and retain text")
    n_retain = math.ceil(len(retain) / batch_size)
    cache: dict[int, list[Batch]] = {}

    def retain_pass(r: int) -> list[Batch]:
        if r not in cache:
            cache.clear()
            cache[r] = make_batches(retain, batch_size, pad_id, seed=seed * 7919 + 100_003 + r)
        return cache[r]

    def batches(epoch: int) -> list[Batch]:
        fb = make_batches(forget, batch_size, pad_id, seed=seed * 7919 + epoch)
        out = []
        for i, f in enumerate(fb):
            r, j = divmod(epoch * len(fb) + i, n_retain)
            out.append({"forget": f, "retain": retain_pass(r)[j]})
        return out

    return batches


@dataclass
class Prepared:
    """A method's encoded data and evaluation sets, built once per run or sweep."""

    method: Method
    forget_seqs: list[list[int]]
    retain_seqs: list[list[int]]
    forget_questions: list[MCQ]
    forget_split_sizes: dict[str, int]
    forget_scoring: ScoringConfig
    retain: RetainData
    forget_source: str


def prepare(
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    method: Method,
    retain_dataset: Dataset | None = None,
    seed: int = 0,
) -> Prepared:
    texts, where, source = _forget_items(dataset, method)
    retain = retain_data(dataset, retain_dataset, seed=seed)
    return Prepared(
        method=method,
        forget_seqs=encode_texts(tokenizer, texts, sources=where),
        retain_seqs=encode_texts(tokenizer, retain.texts, sources=retain.text_sources),
        forget_questions=dataset.questions(),
        forget_split_sizes={n: len(q) for n, q in dataset.splits.items()},
        forget_scoring=scoring_for(dataset),
        retain=retain,
        forget_source=source,
    )


def evaluate_unlearning(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prep: Prepared
) -> dict[str, Any]:
    """Mean forget accuracy over all forget splits, per split, and held-out retain accuracy."""
    res = evaluate_mcq(model, tokenizer, prep.forget_questions, prep.forget_scoring)
    by_split, start = {}, 0
    for name, n in prep.forget_split_sizes.items():
        by_split[name] = sum(res.correct[start : start + n]) / max(n, 1)
        start += n
    retain = evaluate_mcq(model, tokenizer, prep.retain.eval_questions, prep.retain.scoring)
    return {
        "forget_acc": res.accuracy,
        "retain_acc": retain.accuracy,
        "forget_acc_by_split": by_split,
    }


# --------------------------------------------------------------------------- one run


@dataclass
class UnlearnResult:
    """One run: ``status`` is ``completed``, ``stopped_early`` (target reached) or ``diverged``."""

    method: str
    status: str
    config: dict[str, Any]
    before: dict[str, Any]
    after: dict[str, Any]
    history: list[dict[str, Any]]
    steps: int
    epochs_run: int
    wall_time: float
    message: str = ""
    final_logs: dict[str, float] = field(default_factory=dict)
    forget_source: str = ""
    retain_source: str = ""
    precision: str = ""
    precision_warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_reference(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of ``model`` (NPO's reference policy, RMU's retain activations)."""
    ref = copy.deepcopy(model)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def _train_config(rcfg: UnlearnConfig, *, eval_at_start: bool) -> TrainConfig:
    """The loop's settings for a resolved unlearning config (method defaults filled in)."""
    return TrainConfig(
        lr=float(rcfg.lr),
        epochs=int(rcfg.epochs or 1),
        max_steps=rcfg.max_steps,
        optimizer=rcfg.optimizer or "adamw",
        adam_eps=rcfg.adam_eps if rcfg.adam_eps is not None else TrainConfig.adam_eps,
        betas=rcfg.adam_betas or TrainConfig.betas,
        weight_decay=rcfg.weight_decay,
        warmup_steps=rcfg.warmup_steps or 0,
        schedule=rcfg.schedule,
        grad_clip=None if rcfg.grad_clip == "auto" else rcfg.grad_clip,
        seed=rcfg.seed,
        eval_every_steps=rcfg.eval_every_steps,
        eval_every_epochs=None,
        eval_at_start=eval_at_start,
        precision=rcfg.precision,
    )


def _exploding_loss(rcfg: UnlearnConfig) -> DivergenceHook:
    """The loop's divergence hook for one run: |loss| above ``max_loss_ratio`` x the first
    |loss| (at least 100), or above ``max_loss``, ends it as diverged with this reason."""
    first: list[float] = []

    def diverged(value: float) -> str | None:
        if not first:
            first.append(max(abs(value), 100.0))
        limit = rcfg.max_loss_ratio * first[0]
        if rcfg.max_loss is not None:
            limit = min(limit, rcfg.max_loss)
        if abs(value) <= limit:
            return None
        return (
            f"|loss| {value:.4g} exceeded {limit:.4g} "
            f"(max_loss_ratio {rcfg.max_loss_ratio:g} x first |loss| {first[0]:.4g}"
            + (f", max_loss {rcfg.max_loss:g})" if rcfg.max_loss is not None else ")")
        )

    return diverged


def unlearn(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    cfg: UnlearnConfig,
    *,
    retain_dataset: Dataset | None = None,
    reference: torch.nn.Module | None = None,
    before: dict[str, Any] | None = None,
    prepared: Prepared | None = None,
    progress: bool = True,
) -> UnlearnResult:
    """Unlearn the forget splits of ``dataset`` from ``model``, in place.

    ``reference``, ``before`` and ``prepared`` let a sweep share the frozen
    copy, the baseline evaluation and the encoded data between grid points.
    """
    method = get_method(cfg.method)
    rcfg = resolve_config(cfg, method, cfg.scale or model_scale(model))
    precision = cast_for_precision(model, rcfg.precision)  # before the reference copy
    prep = prepared or prepare(tokenizer, dataset, method, retain_dataset, rcfg.seed)
    if method.needs_reference and reference is None:
        reference = make_reference(model)
    ctx = UnlearnContext(
        model=model,
        tokenizer=tokenizer,
        dataset=dataset,
        forget_seqs=prep.forget_seqs,
        retain_seqs=prep.retain_seqs,
        hparams=rcfg.hparams,
        reference=reference,
        seed=rcfg.seed,
    )
    loss_fn, trainable = method.build(ctx)
    trainable = combine_filters(trainable, frozen_filter(rcfg.frozen), only_filter(rcfg.train_only))

    state: dict[str, Any] = {"logs": {}}

    def logged(m: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        loss, logs = loss_fn(m, batch)
        state["logs"] = logs
        return loss, logs

    def stop(row: dict[str, Any]) -> bool:
        target = rcfg.target_forget_acc
        return target is not None and row["forget_acc"] <= target

    if before is not None and stop(before):
        return UnlearnResult(
            method=method.name,
            status="stopped_early",
            config=rcfg.to_dict(),
            before=before,
            after=before,
            history=[{"step": 0, "epoch": 0, **before}],
            steps=0,
            epochs_run=0,
            wall_time=0.0,
            message="forget accuracy already at target",
            forget_source=prep.forget_source,
            retain_source=prep.retain.source,
        )
    batches = paired_batches(
        prep.forget_seqs, prep.retain_seqs, rcfg.batch_size or 32, tokenizer.pad_token_id, rcfg.seed
    )
    t0 = time.perf_counter()
    result = train(
        model,
        batches,
        logged,
        _train_config(rcfg, eval_at_start=before is None),
        evaluate=lambda m: evaluate_unlearning(m, tokenizer, prep),
        stop=stop,
        trainable=trainable,
        progress=f"unlearn {method.name}" if progress else None,
        diverged=_exploding_loss(rcfg),
    )
    history = list(result.history)
    if before is None:
        before = {k: v for k, v in history[0].items() if k not in ("step", "epoch")}
    else:
        history.insert(0, {"step": 0, "epoch": 0, **before})
    if history[-1]["step"] == result.steps:  # the last evaluation saw the final weights
        after = {k: v for k, v in history[-1].items() if k not in ("step", "epoch")}
    else:
        after = evaluate_unlearning(model, tokenizer, prep)
        history.append({"step": result.steps, "epoch": result.epochs_run, **after})
    return UnlearnResult(
        method=method.name,
        status=result.status,
        config=rcfg.to_dict(),
        before=before,
        after=after,
        history=history,
        steps=result.steps,
        epochs_run=result.epochs_run,
        wall_time=time.perf_counter() - t0,
        message=result.message,
        final_logs=state["logs"],
        forget_source=prep.forget_source,
        retain_source=prep.retain.source,
        precision=precision,
        precision_warnings=result.warnings,
    )


# --------------------------------------------------------------------------- sweeps


def select_point(
    rows: list[dict[str, Any]], original_retain: float, threshold: float = 0.05
) -> int | None:
    """Index of the row to keep, or None if no row qualifies.

    Qualifying rows did not diverge and kept ``retain_acc >= original_retain
    - threshold``; among them the lowest ``forget_acc`` wins, ties going to
    the higher ``retain_acc`` and then to the earlier row.
    """
    best: int | None = None
    floor = original_retain - threshold - 1e-9
    for i, r in enumerate(rows):
        if r.get("status") == "diverged" or r.get("retain_acc") is None:
            continue
        if not r["retain_acc"] >= floor:
            continue
        if best is None or (r["forget_acc"], -r["retain_acc"]) < (
            rows[best]["forget_acc"],
            -rows[best]["retain_acc"],
        ):
            best = i
    return best


# --------------------------------------------------------------------------- the CLI's work


def run_unlearn(
    model_path: str | Path,
    data: str | Path,
    out: str | Path,
    cfg: UnlearnConfig,
    *,
    retain_data_path: str | Path | None = None,
    device: str = "auto",
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Load, unlearn, and write ``out`` atomically; returns ``metrics.json``'s content.

    ``out`` gets the unlearned model as safetensors plus ``metrics.json``; a
    diverged run writes ``metrics.json`` but no model.  Everything is
    assembled in a temporary sibling directory and renamed into place, so
    ``out`` is never half-written; a non-empty ``out`` needs ``overwrite``
    and loses only rtteval's own files (:mod:`rtteval.outputs`).  A sweep
    (``rtteval unlearn --sweep``) is a one-stage study, run by the runner.
    """
    from rtteval.models import load_model
    from rtteval.outputs import check_output, staged_output

    get_method(cfg.method)  # fail on a bad name before loading anything
    check_output(out, overwrite=overwrite, kind="unlearn")
    dataset = load_dataset(data)
    retain_ds = load_dataset(retain_data_path) if retain_data_path else None
    model, tokenizer = load_model(model_path, device=device)
    run = unlearn(model, tokenizer, dataset, cfg, retain_dataset=retain_ds, progress=progress)
    ok = run.status != "diverged"
    metrics: dict[str, Any] = {
        "model": str(model_path),
        "data": str(data),
        "retain_data": str(retain_data_path) if retain_data_path else None,
        "model_written": ok,
        **run.to_dict(),
    }
    with staged_output(out, overwrite=overwrite, kind="unlearn") as stage:
        if ok:
            write_model_files(model, tokenizer, stage)
        write_json_atomic(stage / "metrics.json", metrics)
    return metrics
