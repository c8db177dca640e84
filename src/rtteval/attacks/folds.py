"""Folds and provenance: what an attack trains on, and the proof that no V fact is in it.

Shared by every attack.  A :class:`Fold` is one V split (the facts measured)
with the texts trained on for it and where each came from.
:func:`build_folds` makes RTT's folds (T = the other forget splits, minus
the honest attacker's held-out slice); any attack may build its own, e.g.
from retain data.  :func:`check_provenance` re-derives V from the dataset
and asserts, on the very texts that are trained on, that no V question,
fact id or subject occurs in them, and (data without fact ids) that no text
states a V fact (:mod:`rtteval.attacks.facts`).  A violation raises
:class:`ProvenanceError`, never a warning.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from rtteval.attacks.facts import FactMatcher
from rtteval.data.types import MCQ, Dataset
from rtteval.data.world import QA_TEMPLATE
from rtteval.errors import ConfigError, DataError
from rtteval.scoring import format_mcq

#: The format of RTT's training texts (RTTConfig.text_format): what T is written as, not a loss.
TextFormat = Literal["auto", "mcq", "mcq_answer", "qa", "corpus"]
TEXT_FORMATS = ("auto", "mcq", "mcq_answer", "qa", "corpus")


class ProvenanceError(AssertionError):
    """A V fact reached T's training data (or the held-out slice): the attack would be invalid."""


class FoldSettings(Protocol):
    """What :func:`build_folds` reads from a config (RTT's :class:`~rtteval.attacks.rtt.RTTConfig`)."""

    text_format: str
    folds: list[str] | None
    holdout_fraction: float
    overlap: str
    train_splits: int | None
    seed: int

    def validate(self) -> Any: ...


def is_world(dataset: Dataset) -> bool:
    return (dataset.manifest or {}).get("format") == "rtteval-world"


def resolve_text_format(dataset: Dataset, cfg: FoldSettings) -> str:
    """``auto`` -> ``qa`` for a world (its models answer by likelihood), ``mcq`` otherwise."""
    if cfg.text_format != "auto":
        return cfg.text_format
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
    """V, T, and exactly what the attack trains on for this fold."""

    v: str
    t: list[str]
    text_format: str
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
            "text_format": self.text_format,
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


def _question_item(q: MCQ, split: str, text_format: str, dataset: Dataset) -> TrainItem:
    ref, fid = question_id(q), _fact_id(q)
    if text_format == "mcq":
        return TrainItem(format_mcq(q, with_answer=True), split, ref, fact_id=fid, source=q.source)
    if text_format == "mcq_answer":
        return TrainItem(
            format_mcq(q, with_answer=True), split, ref, prompt=format_mcq(q), fact_id=fid,
            source=q.source,
        )  # fmt: skip
    if text_format == "qa":
        text = _qa_template(dataset).format(question=q.question, answer=q.answer_text)
        return TrainItem(text, split, ref, fact_id=fid, source=q.source)
    raise ConfigError(f"text_format {text_format!r} is not built from questions")


def fold_names(dataset: Dataset, folds: Sequence[str] | None) -> list[str]:
    """The V splits an attack runs on: ``folds`` (checked), or every forget split."""
    vs = list(folds) if folds else dataset.split_names
    unknown = [v for v in vs if v not in dataset.splits]
    if unknown:
        raise ConfigError(
            f"unknown fold(s) {unknown}; forget splits are {dataset.split_names}", field="folds"
        )
    return vs


def build_folds(dataset: Dataset, cfg: FoldSettings) -> list[Fold]:
    """One :class:`Fold` per V in ``cfg.folds`` (default: every forget split), T = the others.

    The held-out slice (``holdout_fraction`` of T's questions, seeded by
    ``seed`` and V) is removed from the training texts.  Every fold is
    checked with :func:`check_provenance` before it is returned.
    """
    cfg = cfg.validate()
    names = dataset.split_names
    if len(names) < 2:
        raise DataError(f"RTT needs at least 2 forget splits, the dataset has {names}")
    vs = fold_names(dataset, cfg.folds)
    k = cfg.train_splits
    if k is not None and k > len(names) - 1:
        raise ConfigError(
            f"train_splits={k}, but with {len(names)} forget splits T has at most {len(names) - 1}",
            field="train_splits",
        )
    text_format = resolve_text_format(dataset, cfg)
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
        if text_format == "corpus":
            items, isolated = _corpus_items(dataset, t_names, v, holdout, dropped)
            _refuse_misaligned_corpus(dataset, v, items)
        else:
            items = [_question_item(q, s, text_format, dataset) for s, q in train_qs]
        if not items:
            raise DataError(f"fold V={v}: T has no training texts for text_format {text_format!r}")
        fold = Fold(v, t_names, text_format, items, holdout, holdout_splits, dropped, isolated)
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
        raise DataError(f"fold V={v}: text_format 'corpus' but T {t_names} has no corpus_*.jsonl")
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
            f"text_format 'corpus' on dataset {dataset.name!r}: T's prose states {len(leaked)} of "
            f"{len(dataset.splits[v])} V={v} facts ({100 * len(leaked) / len(dataset.splits[v]):.0f}%), "
            f"e.g. {q.question!r} -> {q.answer_text} in {items[hits[0]].text[:80]!r}; its corpus "
            "splits are not the partition of its question splits, so corpus RTT would train on V; "
            "use text_format 'mcq'",
            field="text_format",
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
            f"fold V={fold.v}: {len(problems)} provenance violation(s); V facts must never "
            f"be trained on:\n  {shown}{more}"
        )
