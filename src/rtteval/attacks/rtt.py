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

import hashlib
import math
import random
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from rtteval.attacks.facts import FactMatcher
from rtteval.data.types import MCQ, Dataset
from rtteval.data.world import QA_TEMPLATE
from rtteval.errors import ConfigError, DataError
from rtteval.metrics import CurvePoint
from rtteval.models import restore_state, snapshot_state
from rtteval.scoring import (
    ScoringConfig,
    check_context,
    continuation_ids,
    evaluate_mcq,
    format_mcq,
)
from rtteval.train import (
    Ensemble,
    Precision,
    TrainConfig,
    TrainResult,
    cast_for_precision,
    cast_parameters,
    check_precision,
    encode_texts,
    ensemble_unsupported,
    lm_loss_fn,
    make_batches,
    train,
)

LossKind = Literal["auto", "mcq", "mcq_answer", "qa", "corpus"]
LOSSES = ("auto", "mcq", "mcq_answer", "qa", "corpus")


class ProvenanceError(AssertionError):
    """A V fact reached T's training data (or the held-out slice): the attack would be invalid."""


# --------------------------------------------------------------------------- config


@dataclass
class RTTConfig:
    """The attack's grid and data; plain data, stored with the results.

    Defaults are for tiny models trained from scratch (measured on tiny-1m
    and the small world, see ``docs/results-schema.md``); :meth:`paper` is the
    paper's setting for an 8B model.

    * ``loss``: ``mcq`` — the paper's: the whole text "question, lettered
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
    """

    lrs: list[float] = field(default_factory=lambda: [3e-4, 1e-3, 3e-3])
    epochs: int = 5
    batch_size: int = 16
    optimizer: Literal["adamw", "lion"] = "adamw"
    loss: LossKind = "auto"
    folds: list[str] | None = None
    holdout_fraction: float = 0.2
    overlap: Literal["drop", "error"] = "drop"
    retain_eval: Literal["epoch", "end", "none"] = "epoch"
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    warmup_steps: int = 0
    train_splits: int | None = None
    seed: int = 0
    precision: Precision = "auto"
    replicates: int = 1

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
            loss="mcq",
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
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown loss {self.loss!r}; use one of {LOSSES}", field="loss")
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
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.replicates == 1:
            del d["replicates"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RTTConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def is_world(dataset: Dataset) -> bool:
    return (dataset.manifest or {}).get("format") == "rtteval-world"


def resolve_loss(dataset: Dataset, cfg: RTTConfig) -> str:
    """``auto`` -> ``qa`` for a world (its models answer by likelihood), ``mcq`` otherwise."""
    if cfg.loss != "auto":
        return cfg.loss
    return "qa" if is_world(dataset) else "mcq"


# --------------------------------------------------------------------------- folds


def question_id(q: MCQ) -> str:
    """A stable id: the world's ``fact_id`` with a content hash, else the hash alone.

    Used to line up the same V questions across models (the bootstrap pairs
    them) and to record provenance.  The hash of question, choices and
    answer is part of every id because a ``fact_id`` is positional
    (``split_0-0003``): two worlds made with different seeds reuse it for
    different facts, and must not be taken for the same questions.
    """
    h = hashlib.sha1(
        "\x1f".join([q.question, *q.choices, str(q.answer)]).encode("utf-8")
    ).hexdigest()
    fid = q.extra.get("fact_id")
    return f"{fid}:{h[:8]}" if fid is not None else f"q:{h[:16]}"


@dataclass
class TrainItem:
    """One training text and where it came from.

    ``prompt`` (``mcq_answer`` only) is the prefix of ``text`` that gets no
    loss.  ``split``, ``ref`` (a question id or ``corpus_<split>#<index>``)
    and ``fact_id`` (worlds: the fact the text states) are the recorded
    provenance; :func:`check_provenance` trusts none of them alone and also
    searches the text itself.  ``source`` is the dataset line it was built
    from (``path:line``), for errors.
    """

    text: str
    split: str
    ref: str
    prompt: str | None = None
    fact_id: str | None = None
    source: str | None = None


@dataclass
class Fold:
    """V, T, and exactly what RTT trains on for this fold."""

    v: str
    t: list[str]
    loss: str
    items: list[TrainItem]
    holdout: list[MCQ] = field(default_factory=list)
    holdout_splits: list[str] = field(default_factory=list)
    dropped: list[dict[str, str]] = field(default_factory=list)
    holdout_isolated: bool = True

    @property
    def train_texts(self) -> list[str]:
        return [it.text for it in self.items]

    def provenance(self) -> dict[str, Any]:
        """What goes in results.json: enough to audit that V was never trained on."""
        per_split: dict[str, int] = {}
        for it in self.items:
            per_split[it.split] = per_split.get(it.split, 0) + 1
        return {
            "v": self.v,
            "t": list(self.t),
            "loss": self.loss,
            "n_train_texts": len(self.items),
            "train_texts_per_split": per_split,
            "train_sources": sorted({it.ref for it in self.items}),
            "holdout_ids": [question_id(q) for q in self.holdout],
            "holdout_isolated": self.holdout_isolated,
            "dropped_overlap": list(self.dropped),
            "checked": True,
        }


def _subject(q: MCQ) -> str | None:
    s = q.extra.get("subject")
    return str(s) if s else None


def _qa_template(dataset: Dataset) -> str:
    return str((dataset.manifest or {}).get("qa_template", QA_TEMPLATE))


def _fact_id(x: MCQ | Any) -> str | None:
    fid = x.extra.get("fact_id")
    return None if fid is None else str(fid)


def _question_item(q: MCQ, split: str, loss: str, dataset: Dataset) -> TrainItem:
    ref, fid = question_id(q), _fact_id(q)
    if loss == "mcq":
        return TrainItem(format_mcq(q, with_answer=True), split, ref, fact_id=fid, source=q.source)
    if loss == "mcq_answer":
        return TrainItem(
            format_mcq(q, with_answer=True), split, ref, prompt=format_mcq(q), fact_id=fid,
            source=q.source,
        )  # fmt: skip
    if loss == "qa":
        text = _qa_template(dataset).format(question=q.question, answer=q.answer_text)
        return TrainItem(text, split, ref, fact_id=fid, source=q.source)
    raise ConfigError(f"loss {loss!r} is not built from questions")


def build_folds(dataset: Dataset, cfg: RTTConfig | None = None) -> list[Fold]:
    """One :class:`Fold` per V in ``cfg.folds`` (default: every forget split), T = the others.

    The held-out slice (``holdout_fraction`` of T's questions, seeded by
    ``seed`` and V) is removed from the training texts.  Every fold is
    checked with :func:`check_provenance` before it is returned.
    """
    cfg = (cfg or RTTConfig()).validate()
    names = dataset.split_names
    if len(names) < 2:
        raise DataError(f"RTT needs at least 2 forget splits, the dataset has {names}")
    vs = list(cfg.folds) if cfg.folds else names
    unknown = [v for v in vs if v not in dataset.splits]
    if unknown:
        raise ConfigError(f"unknown fold(s) {unknown}; forget splits are {names}", field="folds")
    k = cfg.train_splits
    if k is not None and k > len(names) - 1:
        raise ConfigError(
            f"train_splits={k}, but with {len(names)} forget splits T has at most {len(names) - 1}",
            field="train_splits",
        )
    loss = resolve_loss(dataset, cfg)
    folds = []
    for v in vs:
        t_names = [n for n in names if n != v]
        if k is not None:
            i = names.index(v)
            chosen = {names[(i + j) % len(names)] for j in range(1, k + 1)}
            t_names = [n for n in names if n in chosen]  # split order, as with k=None
        v_texts = {q.question for q in dataset.splits[v]}
        # T's questions, minus any whose text is also a V question
        t_qs: list[tuple[str, MCQ]] = []
        dropped: list[dict[str, str]] = []
        for t in t_names:
            for q in dataset.splits[t]:
                if q.question in v_texts:
                    dropped.append(
                        {"split": t, "id": question_id(q), "question": q.question,
                         "fact_id": q.extra.get("fact_id")}
                    )  # fmt: skip
                else:
                    t_qs.append((t, q))
        if dropped and cfg.overlap == "error":
            ex = dropped[0]
            raise DataError(
                f"{len(dropped)} question(s) of T also appear in V={v}, e.g. "
                f"{ex['question']!r} in {ex['split']}; pass overlap='drop' (--overlap drop) "
                "to leave them out of T"
            )
        # the honest attacker's held-out slice of T
        hold_idx: set[int] = set()
        if cfg.holdout_fraction > 0 and len(t_qs) >= 2:
            n_hold = min(len(t_qs) - 1, max(1, round(cfg.holdout_fraction * len(t_qs))))
            rng = random.Random(f"rtteval-rtt-holdout/{cfg.seed}/{v}")
            hold_idx = set(rng.sample(range(len(t_qs)), n_hold))
            # a question text repeated within T goes wholly to one side
            hold_texts = {t_qs[i][1].question for i in hold_idx}
            hold_idx = {i for i, (_, q) in enumerate(t_qs) if q.question in hold_texts}
        holdout = [q for i, (_, q) in enumerate(t_qs) if i in hold_idx]
        holdout_splits = [s for i, (s, _) in enumerate(t_qs) if i in hold_idx]
        train_qs = [(s, q) for i, (s, q) in enumerate(t_qs) if i not in hold_idx]
        isolated = True
        if loss == "corpus":
            items, isolated = _corpus_items(dataset, t_names, v, holdout, dropped)
            _refuse_misaligned_corpus(dataset, v, items)
        else:
            items = [_question_item(q, s, loss, dataset) for s, q in train_qs]
        if not items:
            raise DataError(f"fold V={v}: T has no training texts for loss {loss!r}")
        fold = Fold(v, t_names, loss, items, holdout, holdout_splits, dropped, isolated)
        check_provenance(fold, dataset)
        folds.append(fold)
    return folds


def _corpus_items(
    dataset: Dataset, t_names: list[str], v: str, holdout: list[MCQ], dropped: list[dict[str, str]]
) -> tuple[list[TrainItem], bool]:
    """T's prose passages, minus those of held-out (and overlap-dropped) facts.

    A passage is linked to its fact by ``fact_id`` (worlds) or by containing
    the fact's subject.  Datasets whose passages carry neither (the paper's)
    cannot exclude the held-out facts' prose, so the honest attacker's slice
    is not isolated there; that is recorded, not hidden.
    """
    if not any(dataset.corpus.get(t) for t in t_names):
        raise DataError(f"fold V={v}: loss 'corpus' but T {t_names} has no corpus_*.jsonl")
    excl_fids = {str(q.extra["fact_id"]) for q in holdout if q.extra.get("fact_id") is not None}
    excl_fids |= {str(d["fact_id"]) for d in dropped if d.get("fact_id") is not None}
    subjects = [s for s in (_subject(q) for q in holdout) if s]
    pat = _word_pattern(subjects)
    items = []
    linked = True
    for t in t_names:
        for i, p in enumerate(dataset.corpus.get(t, [])):
            fid = _fact_id(p)
            if fid is not None and fid in excl_fids:
                continue
            if pat is not None and pat.search(p.text):
                continue
            if fid is None and pat is None:
                linked = False
            items.append(
                TrainItem(p.text, p.split or t, f"corpus_{t}#{i}", fact_id=fid, source=p.source)
            )
    # a T question dropped because V has the same text: drop the prose stating it too
    unlinked = [d for d in dropped if d.get("fact_id") is None]
    if unlinked and items:
        texts = {d["question"] for d in unlinked}
        qs = [q for t in t_names for q in dataset.splits[t] if q.question in texts]
        matcher = FactMatcher(dataset.questions()).index([it.text for it in items])
        gone = {i for q in qs for i in matcher.stated_in(q)}
        items = [it for i, it in enumerate(items) if i not in gone]
    return items, linked or not holdout


def _refuse_misaligned_corpus(dataset: Dataset, v: str, items: Sequence[TrainItem]) -> None:
    """Refuse corpus RTT when T's prose states V facts (a dataset without fact ids).

    The paper's Years files are the case in point: ``corpus_split_K`` is not
    the partition of ``split_K``, so T's prose states most of V's facts.
    This is the user's data, so the message says what was measured; the
    check in :func:`check_provenance` would stop it anyway, as a bug.
    """
    v_qs = [q for q in dataset.splits[v] if _fact_id(q) is None]
    if not v_qs:
        return
    matcher = FactMatcher(dataset.questions()).index([it.text for it in items])
    leaked = [(q, hits) for q in v_qs if (hits := matcher.stated_in(q))]
    if leaked:
        q, hits = leaked[0]
        raise DataError(
            f"loss 'corpus' on dataset {dataset.name!r}: T's prose states {len(leaked)} of "
            f"{len(dataset.splits[v])} V={v} facts ({100 * len(leaked) / len(dataset.splits[v]):.0f}%), "
            f"e.g. {q.question!r} -> {q.answer_text} in {items[hits[0]].text[:80]!r}; its corpus "
            "splits are not the partition of its question splits, so corpus RTT would train on V; "
            "use loss 'mcq'",
            field="loss",
        )


def _word_pattern(words: Iterable[str]) -> re.Pattern[str] | None:
    ws = sorted({w for w in words if w}, key=len, reverse=True)
    if not ws:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(re.escape(w) for w in ws) + r")(?!\w)")


class _Haystack:
    """Many texts joined once, so each needle is one fast substring search."""

    SEP = "\x00"

    def __init__(self, texts: Sequence[str]):
        self.texts = list(texts)
        self.blob = self.SEP.join(self.texts)
        self.starts = np.cumsum([0] + [len(t) + 1 for t in self.texts[:-1]]) if self.texts else []

    def where(self, pos: int) -> int:
        return int(np.searchsorted(self.starts, pos, side="right") - 1)

    def find(self, needle: str) -> int | None:
        if not needle or not self.texts:
            return None
        pos = self.blob.find(needle)
        return None if pos < 0 else self.where(pos)

    def find_words(self, pat: re.Pattern[str] | None) -> list[tuple[str, int]]:
        if pat is None or not self.texts:
            return []
        return [(m.group(0), self.where(m.start())) for m in pat.finditer(self.blob)]


def check_provenance(fold: Fold, dataset: Dataset) -> None:
    """Assert that no V fact is in T's training texts or held-out slice.

    V is re-read from ``dataset`` (not from the fold), and the texts are
    searched directly (not just their recorded sources), so a fold whose
    texts were built or edited wrongly fails here.  Checked:

    * V is not among T; every training text's recorded split is in T;
    * no V question text occurs in a training text or held-out question;
    * no V ``fact_id`` is a training text's source or a held-out question's;
    * no V ``subject`` (worlds) occurs, as whole words, in a training text or
      held-out question;
    * no training text records a V ``fact_id`` (worlds: exact);
    * no training text states a V fact that has no ``fact_id`` (the paper's
      data: :class:`rtteval.attacks.facts.FactMatcher`, the V answer with
      most of the V question's subject words);
    * held-out T questions are likewise absent from the training texts.

    Raises :class:`ProvenanceError` listing the offenders.
    """
    problems: list[str] = []
    if fold.v not in dataset.splits:
        problems.append(f"V={fold.v!r} is not a forget split of the dataset")
    if fold.v in fold.t:
        problems.append(f"V={fold.v} is listed in T {fold.t}")
    for i, it in enumerate(fold.items):
        if it.split == fold.v or it.split not in fold.t:
            problems.append(f"training text #{i} is recorded as from {it.split!r}, not from T")
    v_qs = dataset.splits.get(fold.v, [])
    hay = _Haystack(fold.train_texts)
    hold_hay = _Haystack([q.question for q in fold.holdout])
    hold_ids = {question_id(q) for q in fold.holdout}
    refs = {it.ref for it in fold.items}

    def scan(qs: Sequence[MCQ], what: str, include_holdout: bool) -> None:
        for q in qs:
            j = hay.find(q.question)
            if j is not None:
                problems.append(
                    f"{what} question {q.question!r} is in training text #{j} "
                    f"(recorded from {fold.items[j].split}): {fold.items[j].text[:80]!r}"
                )
            if include_holdout and hold_hay.find(q.question) is not None:
                problems.append(f"{what} question {q.question!r} is in the held-out slice of T")
            qid = question_id(q)
            fid = q.extra.get("fact_id")
            if (
                qid in refs
                or (fid is not None and str(fid) in refs)
                or (include_holdout and qid in hold_ids)
            ):
                problems.append(
                    f"{what} fact {qid} is among T's training sources or held-out slice"
                )
        pat = _word_pattern(s for s in (_subject(q) for q in qs) if s)
        for word, j in hay.find_words(pat):
            problems.append(
                f"{what} subject {word!r} is in training text #{j}: {hay.texts[j][:80]!r}"
            )
        if include_holdout:
            for word, j in hold_hay.find_words(pat):
                problems.append(f"{what} subject {word!r} is in held-out question #{j}")

    scan(v_qs, f"V={fold.v}", include_holdout=True)
    v_fids = {f for f in (_fact_id(q) for q in v_qs) if f is not None}
    for i, it in enumerate(fold.items):
        if it.fact_id is not None and it.fact_id in v_fids:
            problems.append(f"training text #{i} states V fact {it.fact_id}: {it.text[:80]!r}")
    unlinked = [q for q in v_qs if _fact_id(q) is None]
    if unlinked and fold.items:
        matcher = FactMatcher(dataset.questions()).index(fold.train_texts)
        for q in unlinked:
            for j in matcher.stated_in(q)[:1]:
                problems.append(
                    f"V fact {q.question!r} -> {q.answer_text} is stated in training text #{j} "
                    f"(recorded from {fold.items[j].split}): {fold.items[j].text[:80]!r}"
                )
    if fold.holdout_isolated:
        scan(fold.holdout, "held-out T", include_holdout=False)
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ProvenanceError(
            f"RTT fold V={fold.v}: {len(problems)} provenance violation(s); V facts must never "
            f"be trained on:\n  {shown}{more}"
        )


# --------------------------------------------------------------------------- results


def _bits(xs: Sequence[bool] | None) -> str | None:
    return None if xs is None else "".join("1" if x else "0" for x in xs)


def _unbits(s: str | None) -> list[bool] | None:
    return None if s is None else [c == "1" for c in s]


@dataclass
class EpochEval:
    """Accuracies after ``epoch`` epochs of RTT (0: before), with per-question correctness."""

    epoch: int
    v_acc: float
    v_correct: list[bool]
    holdout_acc: float | None = None
    holdout_correct: list[bool] | None = None
    retain_acc: float | None = None
    loss: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "v_acc": self.v_acc,
            "holdout_acc": self.holdout_acc,
            "retain_acc": self.retain_acc,
            "loss": self.loss,
            "v_correct": _bits(self.v_correct),
            "holdout_correct": _bits(self.holdout_correct),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EpochEval:
        return cls(
            epoch=int(d["epoch"]),
            v_acc=float(d["v_acc"]),
            v_correct=_unbits(d["v_correct"]) or [],
            holdout_acc=d.get("holdout_acc"),
            holdout_correct=_unbits(d.get("holdout_correct")),
            retain_acc=d.get("retain_acc"),
            loss=d.get("loss"),
        )


@dataclass
class RunResult:
    """One (fold, learning rate, replicate) fine-tuning run: its curve, epoch 1 onwards."""

    lr: float
    status: str
    epochs: list[EpochEval]
    steps: int = 0
    wall_time: float = 0.0
    message: str = ""
    replicate: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "replicate": self.replicate,
            "status": self.status,
            "steps": self.steps,
            "wall_time": self.wall_time,
            "message": self.message,
            "epochs": [e.to_dict() for e in self.epochs],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunResult:
        return cls(
            lr=float(d["lr"]),
            status=d["status"],
            epochs=[EpochEval.from_dict(e) for e in d["epochs"]],
            steps=int(d.get("steps", 0)),
            wall_time=float(d.get("wall_time", 0.0)),
            message=d.get("message", ""),
            replicate=int(d.get("replicate", 0)),
        )


@dataclass
class FoldAttack:
    """Everything measured on one fold of one model."""

    v: str
    t: list[str]
    question_ids: list[str]
    n_choices: list[int]
    before: EpochEval
    runs: list[RunResult]
    provenance: dict[str, Any] = field(default_factory=dict)

    def point(self, lr: float, epoch: int, replicate: int = 0) -> EpochEval | None:
        if epoch == 0:
            return self.before
        for r in self.runs:
            if r.lr == lr and r.replicate == replicate:
                for e in r.epochs:
                    if e.epoch == epoch:
                        return e
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": self.v,
            "t": self.t,
            "question_ids": self.question_ids,
            "n_choices": self.n_choices,
            "before": self.before.to_dict(),
            "runs": [r.to_dict() for r in self.runs],
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FoldAttack:
        return cls(
            v=d["v"],
            t=list(d["t"]),
            question_ids=list(d["question_ids"]),
            n_choices=[int(k) for k in d["n_choices"]],
            before=EpochEval.from_dict(d["before"]),
            runs=[RunResult.from_dict(r) for r in d["runs"]],
            provenance=d.get("provenance", {}),
        )


@dataclass
class ModelAttack:
    """RTT of one model over every fold and learning rate: the raw material of the report."""

    label: str
    dataset: str
    config: dict[str, Any]
    scoring: dict[str, Any]
    folds: list[FoldAttack]
    retain_before: float | None = None
    wall_time: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def lrs(self) -> list[float]:
        return [float(x) for x in self.config["lrs"]]

    @property
    def replicates(self) -> int:
        return int(self.config.get("replicates", 1))

    @property
    def question_ids(self) -> list[str]:
        return [q for f in self.folds for q in f.question_ids]

    def _points(self, lr: float, epoch: int) -> list[list[EpochEval | None]]:
        """``[replicate][fold]`` evaluations at one grid point (epoch 0: the shared "before")."""
        reps = 1 if epoch == 0 else self.replicates
        return [[f.point(lr, epoch, r) for f in self.folds] for r in range(reps)]

    @property
    def n_choices(self) -> list[int]:
        return [k for f in self.folds for k in f.n_choices]

    def grid(self) -> list[tuple[float, int]]:
        """(lr, epoch) points, epoch >= 1, that every fold and replicate reached.

        Diverged runs end early.
        """
        out = []
        for lr in self.lrs:
            for ep in range(1, int(self.config["epochs"]) + 1):
                if all(e is not None for evs in self._points(lr, ep) for e in evs):
                    out.append((lr, ep))
        return out

    def diverged_lrs(self) -> set[float]:
        """Learning rates whose run diverged on some fold (selection shares an lr over folds)."""
        return {r.lr for f in self.folds for r in f.runs if r.status == "diverged"}

    def curve_points(self, *, include_before: bool = False) -> list[CurvePoint]:
        """Pooled over folds: V (and held-out) accuracy over all their questions at each point.

        Every epoch of a learning rate that diverged on any fold is marked
        ``diverged`` (epoch 0, the model before RTT, never is), which keeps it
        out of selection: the evaluations before the blow-up are of a run
        the attacker would have discarded.
        With replicates, each accuracy is their mean.
        """
        pts = []
        bad = self.diverged_lrs()
        keys = self.grid()
        if include_before:
            keys = [(lr, 0) for lr in self.lrs] + keys
        for lr, ep in keys:
            evs = [e for rep in self._points(lr, ep) for e in rep]
            v = self.correct_at(lr, ep)
            hs = [e.holdout_correct for e in evs if e is not None and e.holdout_correct]
            h = float(np.concatenate([np.asarray(x, float) for x in hs]).mean()) if hs else None
            rs = [e.retain_acc for e in evs if e is not None and e.retain_acc is not None]
            pts.append(
                CurvePoint(
                    lr, ep, float(v.mean()), h, float(np.mean(rs)) if rs else None,
                    diverged=ep > 0 and lr in bad,
                )
            )  # fmt: skip
        return pts

    def correct_at(self, lr: float, epoch: int) -> np.ndarray:
        """0/1 correctness on all V questions (folds concatenated) at one grid point.

        With replicates, the mean over them (a fraction per question).
        """
        return self.correct_grid([(lr, epoch)]).mean(axis=0)[0]

    def correct_grid(self, grid: Sequence[tuple[float, int]]) -> np.ndarray:
        """Correctness ``[replicates, len(grid), questions]`` (epoch 0 repeated per replicate)."""
        out = np.zeros((self.replicates, len(grid), len(self.question_ids)))
        for gi, (lr, epoch) in enumerate(grid):
            for ri in range(self.replicates):
                evs = [f.point(lr, epoch, 0 if epoch == 0 else ri) for f in self.folds]
                if any(e is None for e in evs):
                    raise KeyError(
                        f"{self.label}: no evaluation at lr={lr}, epoch={epoch}, replicate {ri} "
                        "in every fold"
                    )
                out[ri, gi] = np.concatenate([np.asarray(e.v_correct, float) for e in evs])  # type: ignore[union-attr]
        return out

    def retain_at(self, lr: float, epoch: int) -> float | None:
        if epoch == 0:
            return self.retain_before
        rs = [
            e.retain_acc
            for rep in self._points(lr, epoch)
            for e in rep
            if e is not None and e.retain_acc is not None
        ]
        return float(np.mean(rs)) if rs else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "dataset": self.dataset,
            "config": self.config,
            "scoring": self.scoring,
            "retain_before": self.retain_before,
            "wall_time": self.wall_time,
            "meta": self.meta,
            "folds": [f.to_dict() for f in self.folds],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelAttack:
        return cls(
            label=d["label"],
            dataset=d["dataset"],
            config=d["config"],
            scoring=d.get("scoring", {}),
            folds=[FoldAttack.from_dict(f) for f in d["folds"]],
            retain_before=d.get("retain_before"),
            wall_time=float(d.get("wall_time", 0.0)),
            meta=d.get("meta", {}),
        )


# --------------------------------------------------------------------------- the attack


def scoring_to_dict(scoring: ScoringConfig) -> dict[str, Any]:
    d = {k: v for k, v in asdict(scoring).items() if k != "dev"}
    d["n_dev"] = len(scoring.dev)
    return d


def _encode_items(
    tokenizer: PreTrainedTokenizerBase, items: Sequence[TrainItem]
) -> tuple[list[list[int]], list[list[int]] | None]:
    """Token ids (BOS ... EOS); loss masks only when some item has a no-loss prompt."""
    sources = [it.source for it in items]
    if not any(it.prompt is not None for it in items):
        return encode_texts(tokenizer, [it.text for it in items], sources=sources), None
    seqs, masks = [], []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for it in items:
        if it.prompt is None:
            ids = encode_texts(tokenizer, [it.text])[0]
            seqs.append(ids)
            masks.append([1] * len(ids))
            continue
        if not it.text.startswith(it.prompt):
            raise ValueError(f"prompt is not a prefix of its text: {it.text[:60]!r}")
        ctx, cont = continuation_ids(tokenizer, it.prompt, it.text[len(it.prompt) :])
        ids = ctx + cont + eos
        seqs.append(ids)
        masks.append([0] * len(ctx) + [1] * (len(cont) + len(eos)))
    check_context(tokenizer, [len(x) for x in seqs], sources, what="a training text")
    return seqs, masks


class _Evaluator:
    """Per-question correctness for named question groups.

    Groups requested together are scored in one batched pass (fewer, fuller
    batches), except under calibrated scoring, which subtracts a per-set mean
    and so must see each set alone.  Scoring itself is
    :func:`rtteval.scoring.evaluate_mcq` (with its one-pass-per-question path
    for single-token choices, which matters because RTT evaluates after every
    epoch of every run).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        scoring: ScoringConfig,
        groups: dict[str, Sequence[MCQ]],
    ):
        self.tokenizer = tokenizer
        self.scoring = scoring
        self.groups = {k: list(v) for k, v in groups.items()}

    def __call__(self, model: torch.nn.Module, names: Sequence[str]) -> dict[str, list[bool]]:
        names = [n for n in names if self.groups.get(n)]
        if not names:
            return {}
        if self.scoring.mode == "calibrated":
            return {
                n: evaluate_mcq(model, self.tokenizer, self.groups[n], self.scoring).correct
                for n in names
            }
        allq = [q for n in names for q in self.groups[n]]
        correct = evaluate_mcq(model, self.tokenizer, allq, self.scoring).correct
        out, i = {}, 0
        for n in names:
            k = len(self.groups[n])
            out[n] = correct[i : i + k]
            i += k
        return out


def _acc(xs: Sequence[bool] | None) -> float | None:
    return (sum(xs) / len(xs)) if xs else None


def _ensemble_for(
    model: torch.nn.Module, lrs: Sequence[float], batched: bool | None
) -> Ensemble | None:
    """The lr grid as one batched model, or None to train the lrs one by one.

    Automatic (``batched=None``): batched when there are several lrs, every
    layer of the model has a grouped version and, on a GPU, the G copies with
    gradients and optimizer state fit twice over in free memory.
    """
    if batched is False or (batched is None and len(lrs) < 2):
        return None
    reason = ensemble_unsupported(model)
    device = next(model.parameters()).device
    if reason is None and batched is None and device.type == "cuda":
        need = 5 * len(lrs) * sum(p.numel() * p.element_size() for p in model.parameters())
        if torch.cuda.mem_get_info(device)[0] < 2 * need:
            reason = f"{len(lrs)} copies need ~{need / 2**30:.1f} GiB"
    if reason is not None:
        if batched:
            raise ConfigError(f"batched RTT impossible: {reason}")
        return None
    return Ensemble(model, lrs)


def _run_result(lr: float, res: TrainResult, steps_per_epoch: int, rep: int = 0) -> RunResult:
    """One run's curve: an :class:`EpochEval` per evaluated epoch, with its mean training loss."""
    epochs = []
    for row in res.history:
        ep = int(row["epoch"])
        ls = res.losses[(ep - 1) * steps_per_epoch : ep * steps_per_epoch]
        epochs.append(
            EpochEval(
                ep,
                float(row["v_acc"]),
                list(row["_v"]),
                row["holdout_acc"],
                None if row["_h"] is None else list(row["_h"]),
                row["retain_acc"],
                float(np.mean(ls)) if ls else None,
            )
        )
    return RunResult(lr, res.status, epochs, res.steps, res.wall_time, res.message, rep)


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

    For each fold: V (and the held-out slice of T) is evaluated before RTT;
    then, for each learning rate, the initial weights are restored from an
    in-memory snapshot and the model is fine-tuned on the fold's training
    texts for ``cfg.epochs`` epochs with :func:`rtteval.train.train`,
    evaluating V, the held-out slice and (per ``cfg.retain_eval``) the retain
    questions after every epoch.  Epoch batches are seeded by (seed, fold,
    epoch) and shared by all learning rates, so the grid differs only in lr.

    ``folds`` (default :func:`build_folds`) lets a caller supply folds; they
    are re-checked with :func:`check_provenance` here, immediately before
    training, so an edited fold that leaks V fails with
    :class:`ProvenanceError` instead of producing a number.

    ``batched`` trains a fold's learning rates together as one
    :class:`rtteval.train.Ensemble` (same numbers, up to float rounding; the
    runs then share one ``wall_time``): ``None`` decides automatically (see
    :func:`_ensemble_for`), ``False`` runs them one by one, ``True`` insists.
    """
    cfg = (cfg or RTTConfig()).validate()
    if scoring is None:
        from rtteval.pretrain import scoring_for

        scoring = scoring_for(dataset, batch_size=128)
    folds = list(folds) if folds is not None else build_folds(dataset, cfg)
    for f in folds:
        check_provenance(f, dataset)
    retain_q = list(retain_questions or [])
    say = log or (lambda _msg: None)
    t0 = time.perf_counter()
    was_training = model.training
    snapshot = snapshot_state(model)
    dtypes = [p.dtype for p in model.parameters()]
    precision = cast_for_precision(model, cfg.precision)  # undone below: model comes back as given
    ensemble = _ensemble_for(model, cfg.lrs, batched)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    fold_results: list[FoldAttack] = []
    warned: set[str] = set()
    try:
        model.eval()
        retain_before = None
        retain_ev = _Evaluator(tokenizer, scoring, {"r": retain_q})
        if retain_q and cfg.retain_eval != "none":
            retain_before = _acc(retain_ev(model, ["r"])["r"])
        for fi, fold in enumerate(folds):
            v_qs = dataset.splits[fold.v]
            seqs, masks = _encode_items(tokenizer, fold.items)
            restore_state(model, snapshot)  # "before" is the model as given, not after a run
            ev = _Evaluator(tokenizer, scoring, {"v": v_qs, "h": fold.holdout, "r": retain_q})
            groups0 = ev(model, ["v", "h"])
            before = EpochEval(
                0,
                _acc(groups0["v"]) or 0.0,
                groups0["v"],
                _acc(groups0.get("h")),
                groups0.get("h"),
                retain_before,
            )
            batch_cache: dict[tuple[int, int], list] = {}

            def replicate_batches(
                rep: int, _fi: int = fi, _seqs=seqs, _masks=masks, _c=batch_cache
            ):
                """Epoch batches of one replicate (replicate 0: the order without replicates)."""

                def epoch_batches(epoch: int) -> list:
                    if (rep, epoch) not in _c:
                        _c[rep, epoch] = make_batches(
                            _seqs,
                            cfg.batch_size,
                            pad_id,
                            seed=cfg.seed * 1_000_003 + _fi * 1009 + epoch + rep * 7_919_993,
                            loss_masks=_masks,
                        )
                    return _c[rep, epoch]

                return epoch_batches

            n_evals: dict[int, int] = {}  # per evaluated model, for retain_eval="end"

            def evaluate(m: torch.nn.Module, _ev=ev, _n=n_evals):
                _n[id(m)] = _n.get(id(m), 0) + 1
                with_retain = cfg.retain_eval == "epoch" or (
                    cfg.retain_eval == "end" and _n[id(m)] == cfg.epochs
                )
                res = _ev(m, ["v", "h", "r"] if with_retain else ["v", "h"])
                return {
                    "v_acc": _acc(res["v"]),
                    "holdout_acc": _acc(res.get("h")),
                    "retain_acc": _acc(res.get("r")),
                    "_v": res["v"],
                    "_h": res.get("h"),
                }

            tcfg = TrainConfig(
                lr=cfg.lrs[0],
                epochs=cfg.epochs,
                optimizer=cfg.optimizer,
                weight_decay=cfg.weight_decay,
                warmup_steps=cfg.warmup_steps,
                schedule="constant",
                grad_clip=cfg.grad_clip,
                seed=cfg.seed,
                eval_every_epochs=1,
                precision=cfg.precision,
            )
            runs = []
            # Replicates run one after another: the batched lr grid shares one batch order
            # across its members, so a replicate (a new order) cannot be a member.
            for rep in range(cfg.replicates):
                batches = replicate_batches(rep)
                what = f"RTT {label} V={fold.v}" + (f" r{rep}" if cfg.replicates > 1 else "")
                rcfg = replace(tcfg, seed=cfg.seed + rep * 7_919_993)
                n_evals.clear()
                if ensemble is not None:  # every lr at once; the model stays at the snapshot
                    ensemble.reset_(model)
                    bar = f"{what} lrs={','.join(f'{lr:g}' for lr in cfg.lrs)}"
                    results = train(
                        ensemble,
                        batches,
                        lm_loss_fn,
                        rcfg,
                        evaluate=evaluate,
                        progress=bar if progress else None,
                    )
                else:
                    results = []
                    for lr in cfg.lrs:
                        restore_state(model, snapshot)
                        n_evals.clear()
                        results.append(
                            train(
                                model,
                                batches,
                                lm_loss_fn,
                                replace(rcfg, lr=lr),
                                evaluate=evaluate,
                                progress=f"{what} lr={lr:g}" if progress else None,
                            )
                        )
                for lr, res in zip(cfg.lrs, results, strict=True):
                    warned.update(res.warnings)
                    runs.append(_run_result(lr, res, max(1, len(batches(0))), rep))
                    curve = " ".join(f"{e.v_acc:.2f}" for e in runs[-1].epochs)
                    say(f"{what} lr={lr:g}: V acc {before.v_acc:.2f} -> {curve}")
            fold_results.append(
                FoldAttack(
                    v=fold.v,
                    t=list(fold.t),
                    question_ids=[question_id(q) for q in v_qs],
                    n_choices=[len(q.choices) for q in v_qs],
                    before=before,
                    runs=runs,
                    provenance=fold.provenance(),
                )
            )
    finally:
        cast_parameters(model, dtypes)
        restore_state(model, snapshot)
        model.train(was_training)
    config = cfg.to_dict()
    config["loss"] = folds[0].loss if folds else resolve_loss(dataset, cfg)
    config["folds"] = [f.v for f in folds]
    return ModelAttack(
        label=label,
        dataset=dataset.name,
        config=config,
        scoring=scoring_to_dict(scoring),
        folds=fold_results,
        retain_before=retain_before,
        wall_time=time.perf_counter() - t0,
        meta={
            "n_retain": len(retain_q),
            "device": str(next(model.parameters()).device),
            "precision": precision,
            "precision_warnings": sorted(warned),
        },
    )
