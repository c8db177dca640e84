"""Plain record types for the paper's file format.

A question is one line of ``split_K.jsonl``; a passage is one line of a
``*corpus_*.jsonl`` file.  Unknown fields are kept in ``extra`` so that
nothing a dataset author wrote is silently dropped (e.g. ``correct_year``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

LETTERS = ("A", "B", "C", "D", "E", "F", "G", "H")


# The one MCQ formatter: the scorer's prompt, RTT's training text and the
# WMDP-Deduped ``mcq_*`` records all come from these two functions, so what a
# model is trained on and what it is asked can never drift apart.  The layout
# is the paper's released code (``create_prompt`` and
# ``create_prompt_letter_answer`` in finetune_corpus.py); docs/paper-fidelity.md
# cites the lines.


def mcq_prompt(question: str, choices: tuple[str, ...] | list[str]) -> str:
    """``question\nA. c1\n...\nAnswer:`` -- the paper's prompt, byte for byte."""
    lines = [question] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    return "\n".join([*lines, "Answer:"])


def mcq_answer(choices: tuple[str, ...] | list[str], answer: int) -> str:
    """What follows ``Answer:`` in a training text: `` L. choice``."""
    return f" {LETTERS[answer]}. {choices[answer]}"


@dataclass(frozen=True)
class MCQ:
    """A multiple-choice question.

    ``choices`` are always strings: the released files sometimes store years
    as integers, but prompts need text, and ``"1996"`` must equal ``1996``.
    """

    question: str
    choices: tuple[str, ...]
    answer: int
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    source: str | None = field(default=None, compare=False, hash=False)

    @property
    def answer_text(self) -> str:
        return self.choices[self.answer]

    def to_json(self) -> dict[str, Any]:
        return {
            "question": self.question,
            "choices": list(self.choices),
            "answer": self.answer,
            **self.extra,
        }


@dataclass(frozen=True)
class Passage:
    """A prose passage; ``split`` names the question split it states facts of."""

    text: str
    split: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    source: str | None = field(default=None, compare=False, hash=False)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"text": self.text}
        if self.split is not None:
            out["split"] = self.split
        out.update(self.extra)
        return out


@dataclass
class Dataset:
    """A dataset directory in the paper's layout, fully loaded and validated.

    ``splits`` holds the forget splits (``split_K`` or ``mmlu_<category>``) in
    natural order; ``retain`` holds any other question files (the synthetic
    world's ``retain_train`` / ``retain_eval``).  Corpus dicts are keyed by the
    question-file name they belong to (``"split_0"``, ``"dev"``, ...).
    """

    root: Path
    splits: dict[str, list[MCQ]]
    corpus: dict[str, list[Passage]] = field(default_factory=dict)
    wrong_corpus: dict[str, list[Passage]] = field(default_factory=dict)
    fixed_wrong_corpus: dict[str, list[Passage]] = field(default_factory=dict)
    true_false: dict[str, list[Passage]] = field(default_factory=dict)
    mcq_text: dict[str, list[Passage]] = field(default_factory=dict)
    retain: dict[str, list[MCQ]] = field(default_factory=dict)
    dev: list[MCQ] = field(default_factory=list)
    manifest: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def split_names(self) -> list[str]:
        return list(self.splits)

    def questions(self, names: list[str] | None = None) -> list[MCQ]:
        """All questions of the named splits (all forget splits by default)."""
        names = self.split_names if names is None else names
        out: list[MCQ] = []
        for n in names:
            out.extend(self.splits[n] if n in self.splits else self.retain[n])
        return out

    def split_off(self, names: Sequence[str]) -> tuple[Dataset, Dataset]:
        """``(self without the question splits names, a dataset of just those splits)``.

        For data whose own splits serve as retain data (the paper's Random
        Birthdays forgets split_0..4 and keeps split_5..9): each part keeps
        its splits' questions and every corpus of theirs.
        """
        from rtteval.errors import DataError

        missing = [n for n in names if n not in self.splits]
        if missing:
            raise DataError(
                f"{self.root}: no split(s) {missing} to keep as retain; it has {self.split_names}",
                field="retain_splits",
            )
        if len(set(names)) >= len(self.splits):
            raise DataError(f"{self.root}: retain_splits {list(names)} leave no forget split")
        keep = set(names)
        tables = (
            "splits",
            "corpus",
            "wrong_corpus",
            "fixed_wrong_corpus",
            "true_false",
            "mcq_text",
        )

        def part(inside: bool) -> dict[str, Any]:
            return {
                t: {k: v for k, v in getattr(self, t).items() if (k in keep) == inside}
                for t in tables
            }

        return replace(self, **part(False)), replace(self, **part(True), retain={}, manifest=None)

    def passages(self, kind: str, names: list[str] | None = None) -> list[Passage]:
        """Passages of one corpus kind (``corpus``, ``wrong_corpus``, ...) for the named splits."""
        table: dict[str, list[Passage]] = getattr(self, kind)
        names = self.split_names if names is None else names
        out: list[Passage] = []
        for n in names:
            out.extend(table.get(n, []))
        return out

    def summary(self) -> dict[str, Any]:
        """The counts printed by ``rtteval data check``."""
        out: dict[str, Any] = {
            "splits": {k: len(v) for k, v in self.splits.items()},
            "corpus": {k: len(v) for k, v in self.corpus.items()},
            "wrong_corpus": {k: len(v) for k, v in self.wrong_corpus.items()},
            "fixed_wrong_corpus": {k: len(v) for k, v in self.fixed_wrong_corpus.items()},
            "dev": len(self.dev),
        }
        if self.retain:
            out["retain"] = {k: len(v) for k, v in self.retain.items()}
        if self.true_false:
            out["true_false"] = {k: len(v) for k, v in self.true_false.items()}
        if self.mcq_text:
            out["mcq_text"] = {k: len(v) for k, v in self.mcq_text.items()}
        qs = [q for part in (self.splits, self.retain) for v in part.values() for q in v]
        dup = [q for q in [*qs, *self.dev] if len({c.strip() for c in q.choices}) < len(q.choices)]
        if dup:
            # the released random_bd has these; --strict refuses them (rtteval.data.loader)
            out["duplicate_choices"] = len(dup)
            out["ambiguous_answers"] = sum(
                [c.strip() for c in q.choices].count(q.choices[q.answer].strip()) > 1 for q in dup
            )
        return out
