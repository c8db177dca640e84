"""In-context shots: k answered T questions before each V question, no weight change.

Few-shot prompting alone raises accuracy on unlearning benchmarks
(arXiv 2411.12103): if unlearning only taught the model to hide an answer,
showing it that answering is expected may undo the hiding.  This attack
puts k answered questions from T (the other forget splits) before every V
question, in the scoring mode's own format, and measures V; the weights are
never touched.  The same arms apply: on the original (ceiling) the shots
must not hurt, and on the never-learned control (floor) they add no V fact,
so V stays at chance.

Its provenance: the shots are T questions only, with any T question whose
text is also a V question dropped (as RTT's ``overlap: drop``); they are
wrapped as a :class:`~rtteval.attacks.folds.Fold` and checked with
:func:`~rtteval.attacks.folds.check_provenance` right before they are shown,
so a V question, fact id, subject or (data without fact ids) V fact stated
in a shot is refused.

The records are the shared ones: the number of shots k takes the grid's lr
slot and every k is one "epoch" 1 (docs/attacks.md), so the optimistic pick
over k is selection's pick over (lr, epoch) unchanged; epoch 0 ("before") is
V with no shots.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator

from rtteval.attacks.base import AttackConfig, AttackContext, register_attack

if TYPE_CHECKING:
    from rtteval.attacks.folds import Fold
    from rtteval.attacks.records import ModelAttack
    from rtteval.data.types import MCQ, Dataset
    from rtteval.scoring import ScoringConfig


class ICLConfig(AttackConfig):
    """In-context shots in a study's ``attacks:``: the shot counts k to try (each one grid point)."""

    name: Literal["icl"] = "icl"
    shots: list[Annotated[int, Field(ge=1)]] = Field([1, 3, 5, 10], min_length=1)

    trains: ClassVar[bool] = False
    title: ClassVar[str] = (
        "in-context shots: k answered T questions before each V question, no weight change"
    )

    @field_validator("shots")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"shots has duplicates: {v}")
        return v


def shot_text(q: MCQ, dataset: Dataset, scoring: ScoringConfig) -> str:
    """One answered question in the scoring mode's format (what the model is shown)."""
    from rtteval.attacks.folds import _qa_template, is_world
    from rtteval.data.types import LETTERS
    from rtteval.scoring import format_mcq

    if scoring.mode == "likelihood":
        if is_world(dataset):  # the world's answered statement, as its corpus and RTT's `qa` say it
            return _qa_template(dataset).format(question=q.question, answer=q.answer_text)
        return scoring.likelihood_prompt.format(question=q.question) + " " + q.answer_text
    return format_mcq(q) + f" {LETTERS[q.answer]}."  # as scoring.letter_prompt writes dev shots


def shot_pool(dataset: Dataset, v: str, seed: int) -> list[tuple[str, MCQ]]:
    """T's questions (every forget split but V, minus texts also in V), in a seeded order."""
    v_texts = {q.question for q in dataset.splits[v]}
    pool = [
        (s, q)
        for s in dataset.split_names
        if s != v
        for q in dataset.splits[s]
        if q.question not in v_texts
    ]
    random.Random(f"rtteval-icl/{seed}/{v}").shuffle(pool)
    return pool


def shot_fold(
    dataset: Dataset, v: str, shots: Sequence[tuple[str, MCQ]], scoring: ScoringConfig
) -> Fold:
    """The shots as a :class:`Fold` (T = the other splits), provenance-checked."""
    from rtteval.attacks.folds import Fold, TrainItem, check_provenance, question_id

    items = [
        TrainItem(
            shot_text(q, dataset, scoring), s, question_id(q),
            fact_id=None if q.extra.get("fact_id") is None else str(q.extra["fact_id"]),
            source=q.source,
        )
        for s, q in shots
    ]  # fmt: skip
    fold = Fold(v, [s for s in dataset.split_names if s != v], "icl", items)
    check_provenance(fold, dataset)
    return fold


def with_shots(scoring: ScoringConfig, texts: Sequence[str], shots: Sequence[MCQ]) -> ScoringConfig:
    """``scoring`` with the shots put before every question.

    Letter modes: the shots go first among the scoring's dev shots (so a
    paper dataset's own few-shot prompt, if any, stays after them);
    likelihood: the shot statements, one per line, before the question prompt.
    """
    if scoring.mode == "likelihood":
        block = "\n".join(texts).replace("{", "{{").replace("}", "}}")
        return replace(scoring, likelihood_prompt=block + "\n" + scoring.likelihood_prompt)
    dev = list(shots) + list(scoring.dev[: scoring.n_shots])
    return replace(scoring, dev=dev, n_shots=len(dev))


@register_attack("icl")
class ICL:
    """k answered T questions before each V question (this module's docstring)."""

    name: ClassVar[str] = "icl"
    config_type: ClassVar[type[AttackConfig]] = ICLConfig

    def run(self, config: dict[str, Any], ctx: AttackContext) -> ModelAttack:
        from rtteval.attacks.folds import fold_names, question_id
        from rtteval.attacks.records import EpochEval, FoldAttack, ModelAttack, RunResult
        from rtteval.attacks.relearn import scoring_to_dict
        from rtteval.errors import ConfigError
        from rtteval.scoring import evaluate_mcq

        t0 = time.perf_counter()
        model, tokenizer, dataset, label = ctx.model, ctx.tokenizer, ctx.dataset, ctx.label
        seed = int(config.get("seed", 0))
        cfg = ICLConfig.from_job(config)
        scoring = ctx.scoring_or_default()
        vs = fold_names(dataset, ctx.folds)
        retain_q = list(ctx.retain_questions or [])

        def acc(qs: Sequence[MCQ], sc: ScoringConfig) -> list[bool]:
            return evaluate_mcq(model, tokenizer, qs, sc).correct if qs else []

        retain_before = sum(c := acc(retain_q, scoring)) / len(c) if retain_q else None
        kmax = max(cfg.shots)
        out: list[FoldAttack] = []
        for v in vs:
            v_qs = dataset.splits[v]
            pool = shot_pool(dataset, v, seed)
            if len(pool) < kmax:
                raise ConfigError(
                    f"fold V={v}: {kmax} shots asked for, but T has only {len(pool)} questions",
                    field="shots",
                )
            fold = shot_fold(dataset, v, pool[:kmax], scoring)  # checked right before use
            bc = acc(v_qs, scoring)
            before = EpochEval(0, sum(bc) / len(bc), bc)
            runs = []
            for k in cfg.shots:
                tk = time.perf_counter()
                sc = with_shots(scoring, fold.train_texts[:k], [q for _, q in pool[:k]])
                vc = acc(v_qs, sc)
                rc = acc(retain_q, sc)
                ee = EpochEval(
                    1, sum(vc) / len(vc), vc, retain_acc=sum(rc) / len(rc) if rc else None
                )
                runs.append(RunResult(float(k), "completed", [ee], 0, time.perf_counter() - tk))
                ctx.say(f"icl {label} V={v} k={k}: V acc {before.v_acc:.2f} -> {ee.v_acc:.2f}")
            prov = fold.provenance()
            prov["shot_order"] = [question_id(q) for _, q in pool[:kmax]]  # k uses the first k
            out.append(
                FoldAttack(v, list(fold.t), [question_id(q) for q in v_qs],
                           [len(q.choices) for q in v_qs], before, runs, prov)
            )  # fmt: skip
        record = {**cfg.resolved(seed), "folds": vs, "grid_axis": "shots",
                  "lrs": [float(k) for k in cfg.shots], "epochs": 1}  # fmt: skip
        return ModelAttack(
            label=label, dataset=dataset.name, config=record, scoring=scoring_to_dict(scoring),
            folds=out, retain_before=retain_before, wall_time=time.perf_counter() - t0,
            meta={"n_retain": len(retain_q), "device": str(next(model.parameters()).device),
                  "precision": str(next(model.parameters()).dtype).removeprefix("torch.")},
        )  # fmt: skip
