"""Retain-only relearning: fine-tune on retain data only, measure V.

The control experiment for RTT.  Fine-tuning on *any* text may undo a
shallow unlearning (the hiding is fragile, not the facts recovered from
T).  So this attack trains every arm (unlearned, original, control) on
retain text alone — no forget fact of any split, T or V — over the same
lr x epoch grid, and measures V after every epoch exactly as RTT does.  If
V comes back here too, RTT's recovery is not evidence that T taught V.

Its provenance: every forget split's facts are searched for in the retain
training texts (:func:`rtteval.attacks.folds.check_provenance` with each
forget split as V), so a retain corpus that states a forget fact fails
before any training.  The retain texts are
:func:`rtteval.stages.unlearn.retain_data`'s, the ones unlearning trains its retain
loss on, and never the retain questions that are evaluated.

This module is the whole attack: config type, provenance, ``run``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, create_model

from rtteval.attacks.base import AttackConfig, AttackContext, register_attack
from rtteval.attacks.rtt import rtt_fields

if TYPE_CHECKING:
    from rtteval.attacks.folds import Fold
    from rtteval.attacks.records import ModelAttack
    from rtteval.data.types import Dataset

#: The recorded split of every training text: not a forget split.
RETAIN = "retain"


#: RTT's training grid, declared once in RTTConfig (types, ranges, defaults).
_RetainFields = create_model(
    "_RetainFields",
    __base__=AttackConfig,
    **rtt_fields(
        "lrs", "epochs", "batch_size", "optimizer", "weight_decay", "grad_clip", "warmup_steps",
        "retain_eval", "replicates", "eval_every_steps",
    ),
)  # fmt: skip


class RetainRelearnConfig(_RetainFields):  # type: ignore[misc,valid-type]
    """Retain-only relearning in a study's ``attacks:``: the fine-tuning grid, as RTT's.

    ``max_texts`` caps the retain texts (a seeded sample; ``None``: all), e.g.
    to train on as many texts as RTT's T has; ``replicates`` as RTT's.
    """

    name: Literal["retain_relearn"] = "retain_relearn"
    max_texts: int | None = Field(None, ge=1)

    title: ClassVar[str] = "retain-only relearning: fine-tune on retain text only, measure V"

    def resolved(self, seed: int, train_splits: int | None = None) -> dict[str, Any]:
        d = super().resolved(seed, train_splits)
        if d.get("eval_every_steps") is None:  # absent by default: job keys do not move
            d.pop("eval_every_steps", None)
        return d


def retain_folds(
    dataset: Dataset,
    texts: Sequence[str],
    sources: Sequence[str | None] | None,
    vs: Sequence[str],
) -> list[Fold]:
    """One fold per V, each training on the same retain texts; provenance checked for every split."""
    from rtteval.attacks.folds import Fold, TrainItem, check_provenance

    items = [
        TrainItem(t, RETAIN, f"{RETAIN}#{i}", source=sources[i] if sources else None)
        for i, t in enumerate(texts)
    ]
    folds = [Fold(v, [], RETAIN, items) for v in vs]
    if folds:
        # no fact of ANY forget split (T or V) may be in the retain texts
        for s in dataset.split_names:
            check_provenance(replace(folds[0], v=s, t=[RETAIN]), dataset)
    return folds


@register_attack("retain_relearn")
class RetainRelearn:
    """Fine-tune on retain data only; V measured per epoch, as RTT (this module's docstring)."""

    name: ClassVar[str] = "retain_relearn"
    config_type: ClassVar[type[AttackConfig]] = RetainRelearnConfig

    def run(self, config: dict[str, Any], ctx: AttackContext) -> ModelAttack:
        from rtteval.attacks.folds import fold_names
        from rtteval.attacks.relearn import relearn
        from rtteval.errors import DataError
        from rtteval.stages.unlearn import retain_data

        seed = int(config.get("seed", 0))
        cfg = RetainRelearnConfig.model_validate({k: v for k, v in config.items() if k != "seed"})
        dataset = ctx.dataset
        vs = fold_names(dataset, ctx.folds)
        rd = retain_data(dataset, ctx.retain_dataset, seed=seed)
        texts, sources = list(rd.texts), rd.text_sources
        if cfg.max_texts is not None and len(texts) > cfg.max_texts:
            keep = sorted(random.Random(f"rtteval-retain-relearn/{seed}").sample(
                range(len(texts)), cfg.max_texts))  # fmt: skip
            texts = [texts[i] for i in keep]
            sources = [sources[i] for i in keep] if sources else None
        if not texts:
            raise DataError(f"{dataset.name}: no retain text to train on ({rd.source})")
        fs = retain_folds(dataset, texts, sources, vs)
        settings = SimpleNamespace(
            **{**cfg.model_dump(), "precision": cfg.precision or "auto"}, seed=seed
        )
        record = {**cfg.resolved(seed), "text_format": RETAIN, "folds": vs, "retain_source": rd.source,
                  "n_retain_texts": len(texts)}  # fmt: skip
        retain_q = rd.eval_questions if ctx.retain_questions is None else ctx.retain_questions
        return relearn(
            ctx.model, ctx.tokenizer, dataset, fs, settings, ctx.scoring_or_default(),
            config=record, retain_questions=retain_q, label=ctx.label, name="retain-relearn",
            progress=ctx.progress, log=ctx.log,
        )  # fmt: skip
