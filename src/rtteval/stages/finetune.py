"""Fine-tune-first: teaching a model the forget facts after pretraining (the paper's Random Birthdays).

The model never saw the facts (the tiny never-learned control, or a hub
model); this stage trains it on them until known and saves it, with the
same training and saving as pretraining (:func:`rtteval.stages.pretrain.learn_and_save`).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from rtteval.data import Dataset, load_dataset
from rtteval.errors import ConfigError
from rtteval.outputs import check_output
from rtteval.stages.pretrain import fact_evaluator, learn_and_save, retain_eval_name, scoring_for
from rtteval.stages.settings import FinetuneConfig
from rtteval.training.batching import encode_texts, make_batches
from rtteval.training.config import TrainConfig
from rtteval.training.precision import cast_for_precision


def finetune_facts(
    model: torch.nn.Module,
    tokenizer: Any,
    dataset: Dataset,
    out_dir: str | Path,
    cfg: FinetuneConfig | None = None,
    *,
    progress: bool = True,
    metrics: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Fine-tune ``model`` on ``dataset``'s forget facts until known; save it to ``out_dir``.

    The one fine-tune-first implementation: ``rtteval finetune`` and the
    runner's ``finetune`` job both call it.  Returns the metrics written to
    ``out_dir/pretrain.json`` (``before``/after accuracies, ``status``).
    """
    from rtteval.attacks.folds import TrainItem
    from rtteval.attacks.relearn import encode_items
    from rtteval.scoring import format_mcq

    cfg = cfg or FinetuneConfig()
    if cfg.loss not in ("corpus", "mcq_answer"):
        raise ConfigError(f"must be 'corpus' or 'mcq_answer', got {cfg.loss!r}", field="loss")
    forget_texts = [p.text for n in dataset.splits for p in dataset.corpus.get(n, [])]
    if cfg.loss == "mcq_answer" or not forget_texts:
        forget_texts = [format_mcq(q, with_answer=True) for q in dataset.questions()]
    replay = [p.text for n in dataset.corpus if n not in dataset.splits for p in dataset.corpus[n]]
    rng = random.Random(cfg.seed)
    scoring = scoring_for(dataset)
    forget_q = dataset.questions()
    r_name = retain_eval_name(dataset)
    retain_q = dataset.retain[r_name] if r_name else []
    forget_masks: list[list[int]] | None = None
    if cfg.loss == "mcq_answer":
        items = [
            TrainItem(
                format_mcq(q, with_answer=True), "", "", prompt=format_mcq(q), source=q.source
            )
            for q in dataset.questions()
        ]
        forget_ids, forget_masks = encode_items(tokenizer, items)
    else:
        forget_ids = encode_texts(tokenizer, forget_texts)
    replay_ids = encode_texts(tokenizer, replay)
    n_replay = min(len(replay_ids), int(round(cfg.replay_ratio * len(forget_ids))))

    def batches(epoch: int):
        r = random.Random(cfg.seed * 7919 + epoch)
        extra = r.sample(replay_ids, n_replay)
        masks = None if forget_masks is None else forget_masks + [[1] * len(s) for s in extra]
        return make_batches(
            forget_ids + extra, cfg.batch_size, tokenizer.pad_token_id,
            seed=rng.randrange(2**31), loss_masks=masks,
        )  # fmt: skip

    evaluate = fact_evaluator(tokenizer, forget_q, retain_q, scoring)
    target = cfg.target_accuracy

    def stop(row: dict[str, Any]) -> bool:
        return target is not None and all(v >= target for k, v in row.items() if k.endswith("_acc"))

    cast_for_precision(model, cfg.precision)  # "before" is measured in the dtype that trains
    before = evaluate(model)
    tcfg = TrainConfig(
        lr=cfg.lr,
        epochs=cfg.max_epochs,
        optimizer=cfg.optimizer,  # type: ignore[arg-type]
        warmup_steps=cfg.warmup_steps,
        grad_clip=cfg.grad_clip,
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
        label="fine-tune forget facts",
        progress=progress,
        out_dir=out_dir,
        overwrite=overwrite,
        metrics={
            **(metrics or {}),
            "kind": "finetuned",
            "config": cfg.model_dump(),
            "before": before,
        },
    )


def finetune_forget_facts(
    base_dir: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    cfg: FinetuneConfig | None = None,
    *,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """:func:`finetune_facts` on a model and dataset read from disk (``rtteval finetune``)."""
    from rtteval.models import load_model

    check_output(out_dir, overwrite=overwrite, kind="model")

    model, tokenizer = load_model(
        base_dir, device="cpu" if not torch.cuda.is_available() else "auto"
    )
    return finetune_facts(
        model, tokenizer, load_dataset(data_dir), out_dir, cfg, progress=progress,
        metrics={"base": str(base_dir), "data": str(data_dir)}, overwrite=overwrite,
    )  # fmt: skip
