"""RTT: retraining on T (Deeb & Roger, arXiv 2410.08827, Section 3).

If unlearning removed facts from the weights, fine-tuning the unlearned
model on *some* forget facts (T) cannot bring back *other* forget facts (V),
because facts are independent: learning Aidan Li's birthday says nothing
about Alla Nelles's.  If the facts were only hidden, fine-tuning on T undoes
the hiding for V too.  So for every forget split V we fine-tune on the other
splits and measure V accuracy after every epoch, for a grid of learning
rates, on the unlearned model, the original model (the ceiling) and a model
that never learned the facts (the floor: V cannot be guessed from T).

The one property everything rests on is that **no V fact is in T's training
data**.  A relearning script elsewhere trained on the wrong set; here
:func:`build_folds` records where every training text came from, and
:func:`check_provenance` re-derives V from the dataset and asserts — right
before training, on the very texts that are trained on — that no V question,
fact id or subject occurs in them, and (data without fact ids) that no text
states a V fact (:mod:`rtteval.attacks.facts`).  A violation raises
:class:`ProvenanceError`, never a warning.

The model is attacked in memory: its weights are snapshotted once and
restored before every (fold, learning rate) run and again at the end, so the
caller gets its model back unchanged and nothing is reloaded from disk.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field, create_model, model_validator
from transformers import PreTrainedTokenizerBase

from rtteval.attacks.base import AttackConfig, AttackContext, register_attack
from rtteval.attacks.folds import (
    TEXT_FORMATS,
    Fold,
    TextFormat,
    build_folds,
    check_provenance,
    resolve_text_format,
)
from rtteval.attacks.records import ModelAttack
from rtteval.attacks.relearn import relearn
from rtteval.config.study import LocatedError, Precision
from rtteval.data.types import MCQ, Dataset
from rtteval.errors import ConfigError, UserError
from rtteval.scoring import ScoringConfig
from rtteval.training.precision import check_precision

__all__ = ["RTT", "RTTConfig", "RTTSpec", "attack_model"]


@dataclass
class RTTConfig:
    """The attack's grid and data; plain data, stored with the results.

    Defaults are for tiny models trained from scratch (measured on tiny-1m
    and the small world, see ``docs/results-schema.md``); :meth:`paper` is the
    paper's setting for an 8B model.

    * ``text_format``, the format of the training texts: ``mcq`` — the paper's: the whole text "question, lettered
      choices, ``Answer: L. choice``"; ``mcq_answer`` — the same text, loss on
      the answer tokens only; ``qa`` — the QA sentence ``Q: ... A: year.``
      that likelihood scoring reads; ``corpus`` — T's prose passages;
      ``auto`` — ``qa`` for a synthetic world, ``mcq`` otherwise.
    * ``folds``: V split names to attack (``None``: every forget split).
    * ``holdout_fraction``: share of T's questions kept out of training, on
      which the honest attacker picks (lr, epoch).  ``0`` is the paper's
      exact protocol (all of T trained on), and then only the optimistic
      selection is reported.
    * ``overlap``: what to do with a T question whose text is also a V
      question (the paper's Random Birthdays has 71 such cross-split
      duplicates): ``drop`` it from T (recorded in the provenance) or
      ``error``.
    * ``retain_eval``: evaluate retain questions after every epoch, only at
      the end of each run, or never.
    * ``train_splits``: how many splits form T (``None``: all splits but V).
      With k, fold V = split i trains on the k splits after it, cyclically,
      so every split is in T equally often; used to measure how recovery
      grows with the amount of retraining data.
    * ``replicates``: RTT runs per (fold, lr), each with its own data order,
      so the CIs cover RTT's training noise; curves are averaged over them
      for selection and kept apart in the results.  Left out of
      :meth:`to_dict` at 1, so existing results and job keys stay the same.
    * ``eval_every_steps``: also evaluate V every k optimizer steps (the
      budget curves, docs/attacks.md; every fine-tuning attack takes it from here); left out
      of :meth:`to_dict` when ``None``, as ``replicates`` at 1.
    """

    # Each field's type and range is declared here once: a study's ``attacks: [{name: rtt}]``
    # entry (:class:`RTTSpec`) and ``rtteval attack`` take them from these annotations.
    lrs: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=1)] = field(
        default_factory=lambda: [3e-4, 1e-3, 3e-3]
    )
    epochs: Annotated[int, Field(ge=1)] = 5
    batch_size: Annotated[int, Field(ge=1)] = 16
    optimizer: Literal["adamw", "lion"] = "adamw"
    text_format: TextFormat = "auto"
    folds: list[str] | None = None
    holdout_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.2
    overlap: Literal["drop", "error"] = "drop"
    retain_eval: Literal["epoch", "end", "none"] = "epoch"
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    grad_clip: Annotated[float, Field(gt=0)] | None = 1.0
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    train_splits: int | None = None
    seed: int = 0
    precision: Precision = "auto"
    replicates: Annotated[int, Field(ge=1)] = 1
    eval_every_steps: Annotated[int, Field(ge=1)] | None = None

    @classmethod
    def paper(cls, **overrides: Any) -> RTTConfig:
        """The paper's RTT for Llama-3-8B (finetune_corpus.py; docs/paper-fidelity.md).

        Lion, 6 epochs, batch 4, lr 1e-7 ... 3.2e-6, the whole MCQ text as
        loss, linear warmup over 24 steps, no clipping.  ``holdout_fraction=0``
        trains on all of T as the paper does; pass a positive value to get
        the honest attacker as well.
        """
        base: dict[str, Any] = dict(
            lrs=[1e-7, 2e-7, 4e-7, 8e-7, 1.6e-6, 3.2e-6],
            epochs=6,
            batch_size=4,
            optimizer="lion",
            text_format="mcq",
            holdout_fraction=0.0,
            grad_clip=None,
            warmup_steps=24,
        )
        base.update(overrides)
        return cls(**base)

    def validate(self) -> RTTConfig:
        if not self.lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in self.lrs):
            raise ConfigError(f"lrs must be positive numbers, got {self.lrs}", field="lrs")
        if len(set(self.lrs)) != len(self.lrs):
            raise ConfigError(f"lrs has duplicates: {self.lrs}", field="lrs")
        if self.epochs < 1:
            raise ConfigError("epochs must be >= 1", field="epochs")
        if self.batch_size < 1:
            raise ConfigError("batch_size must be >= 1", field="batch_size")
        if self.optimizer not in ("adamw", "lion"):
            raise ConfigError(f"unknown optimizer {self.optimizer!r}", field="optimizer")
        if self.text_format not in TEXT_FORMATS:
            raise ConfigError(
                f"unknown text_format {self.text_format!r}; use one of {TEXT_FORMATS}",
                field="text_format",
            )
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ConfigError("holdout_fraction must be in [0, 1)", field="holdout_fraction")
        if self.overlap not in ("drop", "error"):
            raise ConfigError("overlap must be drop or error", field="overlap")
        if self.retain_eval not in ("epoch", "end", "none"):
            raise ConfigError("retain_eval must be epoch, end or none", field="retain_eval")
        if self.train_splits is not None and self.train_splits < 1:
            raise ConfigError("train_splits must be >= 1 (or None: all)", field="train_splits")
        if self.grad_clip is not None and not (
            self.grad_clip > 0 and math.isfinite(self.grad_clip)
        ):
            raise ConfigError(f"grad_clip must be > 0, got {self.grad_clip}", field="grad_clip")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ConfigError("weight_decay must be >= 0", field="weight_decay")
        if self.warmup_steps < 0:
            raise ConfigError("warmup_steps must be >= 0", field="warmup_steps")
        if self.seed < 0:
            raise ConfigError("seed must be >= 0", field="seed")
        check_precision(self.precision)
        if self.replicates < 1:
            raise ConfigError("replicates must be >= 1", field="replicates")
        if self.eval_every_steps is not None and self.eval_every_steps < 1:
            raise ConfigError("eval_every_steps must be >= 1 (or None)", field="eval_every_steps")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.replicates == 1:
            del d["replicates"]
        if self.eval_every_steps is None:
            del d["eval_every_steps"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RTTConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _optional_fields(cfg_type: type, skip: set[str]) -> dict[str, Any]:
    """``cfg_type``'s fields with their declared types and ranges, each optional (unset: None)."""
    hints = typing.get_type_hints(cfg_type, include_extras=True)
    return {f.name: (hints[f.name] | None, None) for f in fields(cfg_type) if f.name not in skip}


def rtt_fields(*names: str) -> dict[str, Any]:
    """RTTConfig's fields ``names`` with their types, ranges and defaults, for ``create_model``.

    Another relearning attack (``retain_relearn``) takes RTT's training grid
    from here rather than declaring it again.
    """
    hints = typing.get_type_hints(RTTConfig, include_extras=True)
    by_name = {f.name: f for f in fields(RTTConfig)}
    out: dict[str, Any] = {}
    for n in names:
        f = by_name[n]
        if f.default_factory is not MISSING:
            out[n] = (hints[n], Field(default_factory=f.default_factory))
        else:
            out[n] = (hints[n], f.default)
    return out


#: RTTConfig's settings as optional fields of an ``attacks:`` entry (declared once, in RTTConfig).
_RTTFields = create_model(
    "_RTTFields",
    __base__=AttackConfig,
    paper=(bool, False),
    **_optional_fields(RTTConfig, skip={"folds", "train_splits", "seed", "precision"}),
)


class RTTSpec(_RTTFields):  # type: ignore[misc,valid-type]
    """RTT in a study's ``attacks:``; unset fields take :class:`RTTConfig`'s defaults.

    The fields are :class:`RTTConfig`'s (with their ranges), each optional.
    ``paper: true`` starts from the paper's 8B setting (``RTTConfig.paper()``,
    docs/paper-fidelity.md) before the explicit fields apply; ``grad_clip:
    null`` written out turns clipping off.  One attack job runs per (model,
    fold) with the whole lr x epoch grid inside it.
    """

    name: Literal["rtt"] = "rtt"

    varies_t: ClassVar[bool] = True
    title: ClassVar[str] = "RTT: fine-tune on the other forget splits (T), measure V"

    @model_validator(mode="before")
    @classmethod
    def _no_loss_key(cls, data: Any) -> Any:
        """The field was renamed: it names the training texts' format, not a loss."""
        if isinstance(data, dict) and "loss" in data:
            raise LocatedError(
                ("loss",),
                f"'loss' is now 'text_format' (the format of the training texts); write "
                f"'text_format: {data['loss']}'",
            )
        return data

    @model_validator(mode="after")
    def _resolves(self) -> RTTSpec:
        """The resolved RTTConfig passes its own checks (duplicate lrs ...) at load time."""
        if not self.model_fields_set - {"name"}:  # the defaults
            return self
        try:
            self.resolved(seed=0)
        except UserError as e:
            raise LocatedError((e.field,) if e.field else (), e.message) from None
        return self

    def resolved(self, seed: int, train_splits: int | None = None) -> dict[str, Any]:
        """The resolved :class:`RTTConfig` as a dict (stored in job keys)."""
        base = RTTConfig.paper() if self.paper else RTTConfig()
        skip = {"name", "paper", "eval_batch_size", "controls", "folds", "precision"}
        for k, v in self.model_dump().items():
            # an unset field keeps the default; ``grad_clip: null`` written out means no clipping
            if k not in skip and (
                v is not None or (k == "grad_clip" and k in self.model_fields_set)
            ):
                setattr(base, k, v)
        base.seed = seed
        base.train_splits = train_splits
        base.folds = None
        base.validate()
        d = base.to_dict()
        d.pop("precision")  # added to the job by the plan
        return d


def attack_model(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    cfg: RTTConfig | None = None,
    scoring: ScoringConfig | None = None,
    *,
    retain_questions: Sequence[MCQ] | None = None,
    label: str = "model",
    folds: Sequence[Fold] | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    batched: bool | None = None,
) -> ModelAttack:
    """Run RTT on ``model`` for every fold x learning rate; the model is returned unchanged.

    For each fold, the model is fine-tuned on T's texts for every learning
    rate and V measured after every epoch by the loop all relearning attacks
    share, :func:`rtteval.attacks.relearn.relearn` (which also documents
    ``batched``).

    ``folds`` (default :func:`build_folds`) lets a caller supply folds; they
    are re-checked with :func:`check_provenance` here, immediately before
    training, so an edited fold that leaks V fails with
    :class:`ProvenanceError` instead of producing a number.
    """
    cfg = (cfg or RTTConfig()).validate()
    if scoring is None:
        from rtteval.stages.pretrain import scoring_for

        scoring = scoring_for(dataset, batch_size=128)
    folds = list(folds) if folds is not None else build_folds(dataset, cfg)
    for f in folds:
        check_provenance(f, dataset)
    config = cfg.to_dict()
    config["text_format"] = folds[0].text_format if folds else resolve_text_format(dataset, cfg)
    config["folds"] = [f.v for f in folds]
    return relearn(
        model, tokenizer, dataset, folds, cfg, scoring, config=config,
        retain_questions=retain_questions, label=label, name="RTT", progress=progress,
        log=log, batched=batched,
    )  # fmt: skip


@register_attack("rtt")
class RTT:
    """Retraining on T: the paper's attack (this module's docstring)."""

    name: ClassVar[str] = "rtt"
    config_type: ClassVar[type[AttackConfig]] = RTTSpec

    def run(self, config: dict[str, Any], ctx: AttackContext) -> ModelAttack:
        """:func:`attack_model` with ``config`` = :meth:`RTTSpec.resolved`'s dict."""
        cfg = RTTConfig.from_dict(config)
        if ctx.folds:
            cfg.folds = list(ctx.folds)
        return attack_model(
            ctx.model, ctx.tokenizer, ctx.dataset, cfg, ctx.scoring,
            retain_questions=ctx.retain_questions, label=ctx.label, progress=ctx.progress,
            log=ctx.log,
        )  # fmt: skip
