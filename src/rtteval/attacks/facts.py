"""Does a training text state an MCQ's fact?  The leak test for data without fact ids.

A synthetic world tags every question and passage with a ``fact_id``, so RTT's
provenance check there is exact.  The paper's released datasets carry no
ids, and their prose paraphrases the questions ("The First Congo War
begins." / "The First Congo War began in 1996."), so the V question's text
never occurs verbatim in a passage that states its fact.  The rule here: a
text states question q's fact when it contains q's answer as whole words and
more than half of q's *subject words* -- the question's words minus the
dataset's template words (those in over a fifth of its questions, e.g.
"When did the following event happen?"), minus stop words, each cut to its
first six letters so that "begins" meets "began".

Calibrated on the paper's Years and Random Birthdays (docs/paper-fidelity.md
gives the counts): it finds the Years corpus leak (``corpus_split_K`` is not
the partition of ``split_K``) and, on Random Birthdays, only the facts that
really are repeated across splits (same name, same year).  Requiring more
than half, not half, is what keeps two people who share a surname and a
birth year apart.

Only what a text *asserts* counts: the lettered choice lines of an MCQ text
are removed first, since a distractor year is not a claim.  And an MCQ text
has a subject of its own, so there the subject words must be the same set:
"Voyager 2 launched by NASA." answered 1977 is another fact than Voyager 1's,
though it shares three of four words and the year (Years has such pairs in
different splits, and they must not stop an ``mcq`` RTT).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Sequence

from rtteval.data.types import MCQ

_WORD = re.compile(r"\w+")
#: Lines ``A. ...`` of an MCQ-form text: options, not statements.
_CHOICE_LINE = re.compile(r"^[A-H]\. .*(?:\n|$)", re.MULTILINE)
_STOP = frozenset(
    [
        "a",
        "an",
        "and",
        "as",
        "at",
        "be",
        "been",
        "by",
        "for",
        "from",
        "he",
        "her",
        "his",
        "in",
        "into",
        "is",
        "it",
        "its",
        "of",
        "on",
        "or",
        "she",
        "that",
        "the",
        "their",
        "they",
        "this",
        "to",
        "was",
        "were",
        "which",
        "who",
        "with",
    ]
)
#: Share of a dataset's questions a word must appear in to count as template.
TEMPLATE_SHARE = 0.2
#: Fewer questions than this and no word is taken for template (too few to tell).
TEMPLATE_MIN_QUESTIONS = 10
STEM = 6


def _stem(word: str) -> str:
    return word.casefold()[:STEM]


def statement(text: str) -> str:
    """What a text asserts: an MCQ-form text without its option lines, prose unchanged."""
    return _CHOICE_LINE.sub("", text) if "Answer:" in text else text


class FactMatcher:
    """Finds the texts that state a question's fact (answer + most subject words).

    Built once per dataset (``questions``: all its questions, to learn the
    template words) and per set of texts (:meth:`index`).
    """

    def __init__(self, questions: Sequence[MCQ]):
        df: Counter[str] = Counter()
        for q in questions:
            df.update({_stem(w) for w in _WORD.findall(q.question)})
        n = len(questions)
        self.template = (
            {w for w, c in df.items() if c > TEMPLATE_SHARE * n}
            if n >= TEMPLATE_MIN_QUESTIONS
            else set()
        )
        self._texts: list[str] = []
        self._stems: list[set[str]] = []
        self._mcq_subjects: list[set[str] | None] = []
        self._by_word: dict[str, list[int]] = defaultdict(list)

    def subject(self, q: MCQ) -> set[str]:
        """The question's subject words (stemmed): not template, not stop words."""
        return self._subject_words(q.question)

    def _subject_words(self, text: str) -> set[str]:
        return {
            s
            for w in _WORD.findall(text)
            if w.casefold() not in _STOP and (s := _stem(w)) not in self.template
        }

    def index(self, texts: Sequence[str]) -> FactMatcher:
        """Index ``texts`` (their statements) for :meth:`stated_in`; returns self."""
        self._texts = [statement(t) for t in texts]
        self._stems = []
        self._mcq_subjects = []
        self._by_word = defaultdict(list)
        for i, t in enumerate(self._texts):
            words = _WORD.findall(t)
            self._stems.append({_stem(w) for w in words})
            head, sep, _ = t.rpartition("\nAnswer:")
            self._mcq_subjects.append(self._subject_words(head) if sep else None)
            for w in {w.casefold() for w in words}:
                self._by_word[w].append(i)
        return self

    def stated_in(self, q: MCQ) -> list[int]:
        """Indices of the indexed texts that state ``q``'s fact."""
        subj = self.subject(q)
        answer_words = [w.casefold() for w in _WORD.findall(q.answer_text)]
        if not subj or not answer_words:
            return []
        candidates = self._by_word.get(answer_words[0], [])
        if len(answer_words) > 1:
            pat = re.compile(r"(?<!\w)" + re.escape(q.answer_text.casefold()) + r"(?!\w)")
            candidates = [i for i in candidates if pat.search(self._texts[i].casefold())]
        return [
            i
            for i in candidates
            if (self._mcq_subjects[i] == subj)
            or (self._mcq_subjects[i] is None and 2 * len(subj & self._stems[i]) > len(subj))
        ]
