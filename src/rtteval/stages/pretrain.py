"""Pretraining a tiny model from scratch on a world (the embedded default).

The control model (``exclude_forget=True``) is trained the same way on the
same world minus the forget facts, with the same tokenizer vocabulary, so
that "never learned + RTT" is a fair floor for the attack.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from rtteval.atomic import write_json_atomic
from rtteval.data import Dataset, Passage, load_dataset
from rtteval.models import build_tiny_model, n_params, train_word_tokenizer
from rtteval.models.loading import write_model_files
from rtteval.outputs import check_output, staged_output
from rtteval.scoring import ScoringConfig, evaluate_mcq
from rtteval.stages.settings import PretrainConfig
from rtteval.training.batching import encode_texts, make_batches
from rtteval.training.config import TrainConfig
from rtteval.training.loop import train
from rtteval.training.losses import lm_loss_fn


def scoring_for(dataset: Dataset, batch_size: int = 64) -> ScoringConfig:
    """Likelihood scoring with the world's prompt for a world; the paper's letter format otherwise."""
    m = dataset.manifest or {}
    if m.get("format") == "rtteval-world":
        return ScoringConfig(
            mode="likelihood", likelihood_prompt=m["likelihood_prompt"], batch_size=batch_size
        )
    return ScoringConfig(mode="letter", batch_size=batch_size, dev=list(dataset.dev))


def world_texts(dataset: Dataset) -> list[str]:
    """Every string of the world, so the tokenizer knows every word any stage will show it."""
    out: list[str] = []
    for table in (dataset.corpus, dataset.wrong_corpus, dataset.fixed_wrong_corpus):
        for ps in table.values():
            out.extend(p.text for p in ps)
    for qs in [*dataset.splits.values(), *dataset.retain.values(), dataset.dev]:
        for q in qs:
            out.append(q.question)
            out.extend(q.choices)
    return out


def retain_eval_name(dataset: Dataset) -> str | None:
    m = dataset.manifest or {}
    if m.get("retain_eval") in dataset.retain:
        return m["retain_eval"]
    return next(iter(dataset.retain), None)


def pretraining_passages(dataset: Dataset, exclude_forget: bool) -> list[Passage]:
    names = [n for n in dataset.corpus if not (exclude_forget and n in dataset.splits)]
    return [p for n in names for p in dataset.corpus[n]]


def fact_evaluator(tokenizer, forget_q, retain_q, scoring: ScoringConfig):
    """Forget and (held-out) retain accuracy: what pretraining and fine-tuning stop on."""

    def evaluate(m: torch.nn.Module) -> dict[str, Any]:
        row = {"forget_acc": evaluate_mcq(m, tokenizer, forget_q, scoring).accuracy}
        if retain_q:
            row["retain_acc"] = evaluate_mcq(m, tokenizer, retain_q, scoring).accuracy
        return row

    return evaluate


def _epoch_texts(passages: list[Passage], epoch: int) -> list[str]:
    """Passages for one epoch: a biography with a ``variant`` is shown only in its epoch slot."""
    n_var = 1 + max((int(p.extra.get("variant", 0)) for p in passages), default=0)
    return [
        p.text
        for p in passages
        if "variant" not in p.extra or int(p.extra["variant"]) == epoch % n_var
    ]


def pretrain(
    data_dir: str | Path,
    out_dir: str | Path,
    cfg: PretrainConfig | None = None,
    *,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train a tiny Llama from scratch on ``data_dir`` and save it to ``out_dir``.

    Warmup-stable-decay, as modern LM pretraining does: the constant-lr phase
    stops as soon as every evaluated set reaches ``target_accuracy`` (for the
    control: the retain set; its forget accuracy should stay at chance), then
    ``anneal_epochs`` more epochs decay the lr linearly to zero.  The decay
    matters for unlearning: a model stopped at the constant lr holds its
    facts so loosely that any update (even fine-tuning on other facts of the
    same world) erases unrehearsed ones, so no method could unlearn the
    forget facts without wrecking held-out retain facts (docs/methods.md).
    """
    cfg = cfg or PretrainConfig()
    dataset = load_dataset(data_dir)
    check_output(out_dir, overwrite=overwrite, kind="model")  # before hours of training
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    tokenizer = train_word_tokenizer(world_texts(dataset))
    model = build_tiny_model(cfg.model_preset, tokenizer, seed=cfg.seed)
    passages = pretraining_passages(dataset, cfg.exclude_forget)
    scoring = scoring_for(dataset)
    forget_q = dataset.questions()
    r_name = retain_eval_name(dataset)
    retain_q = dataset.retain[r_name] if r_name else []

    cache: dict[int, list[list[int]]] = {}

    def batches(epoch: int):
        texts = _epoch_texts(passages, epoch)
        key = hash(tuple(texts))
        if key not in cache:
            cache.clear()
            cache[key] = encode_texts(tokenizer, texts)
        return make_batches(
            cache[key], cfg.batch_size, tokenizer.pad_token_id, seed=cfg.seed * 100003 + epoch
        )

    evaluate = fact_evaluator(tokenizer, forget_q, retain_q, scoring)

    def stop(row: dict[str, Any]) -> bool:
        keys = ["retain_acc"] if cfg.exclude_forget else ["forget_acc", "retain_acc"]
        keys = [k for k in keys if k in row]
        return bool(keys) and all(row[k] >= cfg.target_accuracy for k in keys)

    tcfg = TrainConfig(
        lr=cfg.lr,
        epochs=cfg.max_epochs,
        optimizer="adamw",
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
        schedule=cfg.schedule,
        grad_clip=1.0,
        seed=cfg.seed,
        eval_every_epochs=cfg.eval_every_epochs,
        precision=cfg.precision,
    )
    return learn_and_save(
        model,
        tokenizer,
        batches,
        tcfg,
        evaluate,
        stop,
        label="pretrain control" if cfg.exclude_forget else "pretrain",
        progress=progress,
        out_dir=out_dir,
        overwrite=overwrite,
        anneal_epochs=cfg.anneal_epochs,
        metrics={
            "kind": "control" if cfg.exclude_forget else "original",
            "data": str(Path(data_dir)),
            "config": cfg.model_dump(),
            "n_params": n_params(model),
            "n_passages": len(passages),
        },
    )


def learn_and_save(
    model: torch.nn.Module,
    tokenizer: Any,
    batches: Any,
    tcfg: TrainConfig,
    evaluate: Any,
    stop: Any,
    *,
    label: str,
    progress: bool,
    out_dir: str | Path,
    metrics: dict[str, Any],
    anneal_epochs: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train until the facts are known, anneal, save the model and its ``pretrain.json``.

    The anneal phase is the same loop again on the same data, its lr decaying
    linearly from ``tcfg.lr`` to zero over ``anneal_epochs`` epochs; its
    batches continue the epoch numbering, so it sees fresh shuffles.
    """
    result = train(
        model,
        batches,
        lm_loss_fn,
        tcfg,
        evaluate=evaluate,
        stop=stop,
        progress=label if progress else None,
    )
    anneal = None
    if anneal_epochs > 0 and result.status != "diverged":
        offset = result.epochs_run
        acfg = replace(
            tcfg, epochs=anneal_epochs, warmup_steps=0, schedule="linear", min_lr_ratio=0.0,
            eval_every_epochs=None, eval_every_steps=None, eval_at_start=False,
        )  # fmt: skip
        anneal = train(
            model,
            lambda e: batches(offset + e),
            lm_loss_fn,
            acfg,
            progress=f"{label}: anneal" if progress else None,
        )
    final = result.history[-1] if result.history and anneal is None else evaluate(model)
    metrics = {
        **metrics,
        "status": result.status,
        "forget_acc": final.get("forget_acc"),
        "retain_acc": final.get("retain_acc"),
        "reached_target": result.status == "stopped_early",
        "train": result.to_dict(),
    }
    if anneal is not None:
        metrics["anneal"] = {**anneal.to_dict(), "after": final}
    with staged_output(out_dir, overwrite=overwrite, kind="model") as stage:
        write_model_files(model, tokenizer, stage)
        write_json_atomic(stage / "pretrain.json", metrics)
    return metrics
