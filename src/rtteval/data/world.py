"""The synthetic world of facts behind rtteval's embedded default.

Deeb & Roger (arXiv 2410.08827) test whether unlearning removed facts from the
weights by *retraining on T* (RTT): fine-tune the unlearned model on some
forget splits and see whether accuracy on the *other* splits comes back.  To
reproduce that on a laptop we pretrain a tiny Llama from scratch on a world of
facts it cannot have seen anywhere else, so every bit of knowledge it has about
these facts was put there by us:

* fictional **people** with uniformly random birth years (the paper's *Random
  Birthdays*), and
* fictional **events** with years whose MCQ choices are four consecutive years
  (the paper's *Years*).

:func:`write_world` writes the world in the paper's released layout (see
``docs/architecture.md``) plus a ``manifest.json``, so the very same loader
reads the embedded default and the paper's data.  Everything is deterministic
in the seed: the same seed gives byte-identical files, which is what lets a
cached pretrained model be matched to its data.

Mode ``"bios"`` follows Allen-Zhu & Li ("Physics of Language Models 3.1"):
facts are only *extractable* by QA if the pretraining corpus states them in
diverse ways, so each person gets several permuted biographies; QA sentences
are shown for retain people only (mixed training), so forget facts are learned
from prose alone.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rtteval.data.types import MCQ, Passage
from rtteval.errors import ConfigError, UserError

__all__ = [
    "LIKELIHOOD_PROMPT",
    "PRESETS",
    "QA_TEMPLATE",
    "World",
    "WorldConfig",
    "iter_texts",
    "make_world",
    "write_world",
]

#: The QA sentence put in corpora.  Likelihood scoring uses
#: ``LIKELIHOOD_PROMPT + " " + choice``, which is a prefix of this sentence for
#: the right choice: keep the two in sync (both are recorded in the manifest).
QA_TEMPLATE = "Q: {question} A: {answer}."
LIKELIHOOD_PROMPT = "Q: {question} A:"

FORMAT = "rtteval-world"
VERSION = 1
N_CHOICES = 4

# Sizes are plain data so they can be tuned without touching the generator.
PRESETS: dict[str, dict[str, Any]] = {
    "small": {
        "mode": "qa",
        "n_splits": 5,
        "facts_per_split": 40,
        "n_retain_train": 100,
        "n_retain_eval": 100,
        "n_dev": 10,
        "frac_people": 0.5,
        "n_paraphrases": 3,
        "qa_sentence": True,
    },
    "tiny": {
        "mode": "qa",
        "n_splits": 5,
        "facts_per_split": 8,
        "n_retain_train": 16,
        "n_retain_eval": 16,
        "n_dev": 4,
        "frac_people": 0.5,
        "n_paraphrases": 3,
        "qa_sentence": True,
    },
    "bios": {
        "mode": "bios",
        "n_splits": 5,
        "facts_per_split": 40,
        "n_retain_train": 100,
        "n_retain_eval": 100,
        "n_dev": 10,
        "frac_people": 1.0,
        "n_bio_variants": 8,
        "qa_sentence": True,
    },
}

# ---------------------------------------------------------------------------
# Sentence templates.  ``{Subj}`` is the subject with its first letter
# capitalised (for sentence starts: "The Treaty of Velmora happened ...").

PERSON_TEMPLATES: tuple[str, ...] = (
    "{Subj} was born in {year}.",
    "In {year}, {subj} was born.",
    "{Subj}'s birth year is {year}.",
    "The year {year} saw the birth of {subj}.",
    "{Subj} came into the world in {year}.",
    "Records show that {subj} was born in {year}.",
)
EVENT_TEMPLATES: tuple[str, ...] = (
    "{Subj} happened in {year}.",
    "In {year}, {subj} took place.",
    "{Subj} took place in the year {year}.",
    "The year {year} is remembered for {subj}.",
    "{Subj} occurred in {year}.",
    "Historians date {subj} to {year}.",
)
PERSON_QUESTION = "When was {subj} born?"
EVENT_QUESTION = "When did {subj} happen?"

EVENT_KINDS: tuple[str, ...] = (
    "the Treaty of {place}",
    "the Siege of {place}",
    "the founding of {place}",
    "the Great Fire of {place}",
    "the Battle of {place}",
    "the Flood of {place}",
    "the Fall of {place}",
    "the Council of {place}",
    "the Plague of {place}",
    "the Uprising of {place}",
)

# Biography sentences, one tuple per attribute; every one names the person in
# full (Allen-Zhu & Li's "fullname" augmentation).
BIO_TEMPLATES: dict[str, tuple[str, ...]] = {
    "year": (
        "{name} was born in {value}.",
        "{name}'s birth year is {value}.",
        "{name} came into the world in {value}.",
        "The year {value} saw the birth of {name}.",
    ),
    "city": (
        "{name} was born in the city of {value}.",
        "{name}'s hometown is {value}.",
        "{name} grew up in {value}.",
    ),
    "university": (
        "{name} studied at {value}.",
        "{name} graduated from {value}.",
        "{name} attended {value}.",
    ),
    "major": (
        "{name} majored in {value}.",
        "{name} earned a degree in {value}.",
        "{name}'s field of study was {value}.",
    ),
    "employer": (
        "{name} worked for {value}.",
        "{name} was employed by {value}.",
        "{name} took a job at {value}.",
    ),
}
BIO_ATTRIBUTES: tuple[str, ...] = tuple(BIO_TEMPLATES)
MAJORS: tuple[str, ...] = (
    "mathematics",
    "chemistry",
    "history",
    "linguistics",
    "economics",
    "biology",
    "architecture",
    "philosophy",
    "astronomy",
    "medicine",
    "law",
    "music",
)
UNIVERSITY_KINDS: tuple[str, ...] = (
    "the University of {place}",
    "{place} College",
    "the {place} Institute",
)
EMPLOYER_KINDS: tuple[str, ...] = (
    "{word} Industries",
    "{word} Shipping",
    "the {word} Company",
    "{word} Laboratories",
)

# Syllables for names.  Generated words must not collide with any word the
# templates use (a name "The" would confuse a word-level model), so those are
# reserved.
_ONSETS = (
    "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
    "br", "dr", "kr", "tr", "th", "sh", "st", "gr", "qu",
)  # fmt: skip
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ia", "ou")
_CODAS = ("", "", "", "", "", "n", "r", "l", "s", "th", "rk", "nd", "sk", "m", "ll")
_SURNAME_ENDINGS = ("", "", "", "", "ell", "ton", "ar", "ik", "ov", "ane")
_PLACE_ENDINGS = ("", "mouth", "ford", "ava", "heim", "grad", "mere", "wick", "dale", "ora")


def _template_words() -> frozenset[str]:
    words: set[str] = {"q", "a", "when", "was", "did", "born", "happen"}
    texts = [*PERSON_TEMPLATES, *EVENT_TEMPLATES, *EVENT_KINDS, *MAJORS]
    texts += [t for ts in BIO_TEMPLATES.values() for t in ts]
    texts += [*UNIVERSITY_KINDS, *EMPLOYER_KINDS]
    for text in texts:
        for raw in text.replace("'s", " ").split():
            w = raw.strip(".,?{}").lower()
            if w.isalpha():
                words.add(w)
    return frozenset(words)


_RESERVED = _template_words()


# ---------------------------------------------------------------------------
# Configuration


class WorldConfig(BaseModel):
    """Everything that determines a world; ``model_dump()`` goes in the manifest.

    ``preset`` fills in every field the caller did not give (so
    ``WorldConfig(preset="tiny")`` is the tiny world, and ``WorldConfig(**dump)``
    round-trips exactly); explicit fields always win.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(0, ge=0)
    preset: str = "small"
    mode: Literal["qa", "bios"] = "qa"
    n_splits: int = Field(5, ge=1)
    facts_per_split: int = Field(40, ge=1)
    n_retain_train: int = Field(100, ge=1)
    n_retain_eval: int = Field(100, ge=1)
    n_dev: int = Field(10, ge=1)
    frac_people: float = Field(0.5, ge=0.0, le=1.0)
    forget_frac_people: float | None = Field(None, ge=0.0, le=1.0)
    n_paraphrases: int = Field(3, ge=1, le=len(PERSON_TEMPLATES))
    qa_sentence: bool = True
    person_years: tuple[int, int] = (1900, 2009)
    event_years: tuple[int, int] = (1800, 1999)
    n_bio_variants: int = Field(8, ge=1, le=64)
    bio_pool_size: int = Field(16, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        preset = data.get("preset", "small")
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
        return {**PRESETS[preset], **data}

    @model_validator(mode="after")
    def _check(self) -> WorldConfig:
        for name in ("person_years", "event_years"):
            lo, hi = getattr(self, name)
            if lo < 1000 or hi > 9999:
                raise ValueError(f"{name}: years must have 4 digits, got ({lo}, {hi})")
            if hi - lo < N_CHOICES - 1:
                raise ValueError(f"{name}: need at least {N_CHOICES} years, got ({lo}, {hi})")
        if self.mode == "bios" and self.frac_people != 1.0:
            raise ValueError("mode 'bios' has people only: frac_people must be 1.0")
        return self

    @property
    def forget_splits(self) -> list[str]:
        return [f"split_{k}" for k in range(self.n_splits)]

    @property
    def question_files(self) -> list[str]:
        """Question-file names in generation (and manifest) order."""
        return [*self.forget_splits, "retain_train", "retain_eval", "dev"]

    def size(self, name: str) -> int:
        """Number of facts in question file ``name``."""
        if name.startswith("split_"):
            return self.facts_per_split
        return {
            "retain_train": self.n_retain_train,
            "retain_eval": self.n_retain_eval,
            "dev": self.n_dev,
        }[name]


def world_config(preset: str = "small", *, seed: int = 0, **overrides: Any) -> WorldConfig:
    """Build a :class:`WorldConfig`, turning validation errors into :class:`ConfigError`."""
    try:
        return WorldConfig(seed=seed, preset=preset, **overrides)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or None
        raise ConfigError(err["msg"].removeprefix("Value error, "), field=loc) from None


# ---------------------------------------------------------------------------
# Generation


class _Words:
    """Generates capitalised ASCII words, each used at most once in a world.

    Unique words keep facts independent for a word-level tokenizer: relearning
    one split cannot move another split's facts through a shared name token,
    which is what the RTT comparison across splits relies on.
    """

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def _syllable(self) -> str:
        r = self.rng
        return r.choice(_ONSETS) + r.choice(_VOWELS) + r.choice(_CODAS)

    def new(
        self, syllables: tuple[int, int], endings: tuple[str, ...] = ("",), max_len: int = 9
    ) -> str:
        for _ in range(10_000):
            n = self.rng.randint(*syllables)
            w = "".join(self._syllable() for _ in range(n)) + self.rng.choice(endings)
            w = w.capitalize()
            if 4 <= len(w) <= max_len and w.isascii() and w.isalpha():
                low = w.lower()
                if low not in _RESERVED and low not in self.used:
                    self.used.add(low)
                    return w
        raise RuntimeError("ran out of fresh words")  # pragma: no cover - space is ~10^6+

    def person(self) -> str:
        return f"{self.new((2, 2))} {self.new((1, 2), _SURNAME_ENDINGS, max_len=8)}"

    def place(self) -> str:
        return self.new((1, 2), _PLACE_ENDINGS, max_len=11)


@dataclass
class _BioPlan:
    """One biography: sentence order and template choice per attribute."""

    order: tuple[str, ...]
    templates: tuple[int, ...]  # indexed like ``order``


@dataclass
class _Fact:
    fact_id: str
    file: str
    kind: Literal["person", "event"]
    subject: str
    year: int
    choices: list[int]
    answer: int
    paraphrases: list[int]  # template indices
    whp_offset: int  # where RIA's template rotation starts
    fixed_wrong: int
    attrs: dict[str, str] = field(default_factory=dict)
    bios: list[_BioPlan] = field(default_factory=list)

    @property
    def question(self) -> str:
        tpl = PERSON_QUESTION if self.kind == "person" else EVENT_QUESTION
        return tpl.format(subj=self.subject)

    @property
    def wrong_years(self) -> list[int]:
        return [c for i, c in enumerate(self.choices) if i != self.answer]

    def templates(self) -> tuple[str, ...]:
        return PERSON_TEMPLATES if self.kind == "person" else EVENT_TEMPLATES

    def prose(self, template: int, year: int) -> str:
        subj = self.subject
        return self.templates()[template].format(
            subj=subj, Subj=subj[:1].upper() + subj[1:], year=year
        )

    def qa(self, year: int) -> str:
        return QA_TEMPLATE.format(question=self.question, answer=year)

    def bio(self, variant: int, year: int) -> str:
        plan = self.bios[variant]
        values = {**self.attrs, "year": str(year)}
        return " ".join(
            BIO_TEMPLATES[a][t].format(name=self.subject, value=values[a])
            for a, t in zip(plan.order, plan.templates, strict=True)
        )

    def mcq(self) -> MCQ:
        extra = {
            "fact_id": self.fact_id,
            "kind": self.kind,
            "subject": self.subject,
            "correct_year": self.year,
        }
        return MCQ(self.question, tuple(str(c) for c in self.choices), self.answer, extra)


def _draw_mcq(rng: random.Random, kind: str, years: tuple[int, int]) -> tuple[int, list[int], int]:
    """Return (correct year, choices, answer index) without leaking the answer.

    People: the three distractors are distinct uniform years from the same range,
    so the correct one is exchangeable with them (its rank is uniform).  Events:
    four consecutive years; the window start and the correct position are drawn
    independently and uniformly, so the position is exactly uniform and every
    choice stays inside the range (no "out of range" tell at the edges).
    """
    lo, hi = years
    answer = rng.randrange(N_CHOICES)
    if kind == "person":
        year = rng.randint(lo, hi)
        pool = [y for y in range(lo, hi + 1) if y != year]
        distractors = rng.sample(pool, N_CHOICES - 1)
        choices = [*distractors[:answer], year, *distractors[answer:]]
    else:
        start = rng.randint(lo, hi - (N_CHOICES - 1))
        choices = list(range(start, start + N_CHOICES))
        year = choices[answer]
    return year, choices, answer


def _draw_bio_plans(rng: random.Random, n: int) -> list[_BioPlan]:
    """``n`` distinct biographies (order and templates) for one person."""
    plans: list[_BioPlan] = []
    seen: set[tuple[tuple[str, ...], tuple[int, ...]]] = set()
    while len(plans) < n:
        order = list(BIO_ATTRIBUTES)
        rng.shuffle(order)
        tpls = tuple(rng.randrange(len(BIO_TEMPLATES[a])) for a in order)
        key = (tuple(order), tpls)
        if key not in seen:
            seen.add(key)
            plans.append(_BioPlan(tuple(order), tpls))
    return plans


@dataclass
class World:
    """A generated world in memory.

    ``questions`` maps question-file names (``split_0``, ``retain_train``,
    ``dev``, ...) to MCQs; ``passages`` maps corpus-file names (``corpus_dev``,
    ``whp_corpus_split_0``, ...) to passages.  Iteration order is file order.
    """

    config: WorldConfig
    questions: dict[str, list[MCQ]]
    passages: dict[str, list[Passage]]

    @property
    def forget_splits(self) -> list[str]:
        return self.config.forget_splits

    def records(self) -> dict[str, list[dict[str, Any]]]:
        """JSON records per file name (with ``.jsonl``), in a fixed order."""
        out: dict[str, list[dict[str, Any]]] = {}
        for name, qs in self.questions.items():
            out[f"{name}.jsonl"] = [q.to_json() for q in qs]
        for name, ps in self.passages.items():
            out[f"{name}.jsonl"] = [p.to_json() for p in ps]
        return out

    def manifest(self) -> dict[str, Any]:
        recs = self.records()
        return {
            "format": FORMAT,
            "version": VERSION,
            "seed": self.config.seed,
            "preset": self.config.preset,
            "config": self.config.model_dump(mode="json"),
            "forget_splits": self.forget_splits,
            "retain_train": "retain_train",
            "retain_eval": "retain_eval",
            "dev": "dev",
            "likelihood_prompt": LIKELIHOOD_PROMPT,
            "qa_template": QA_TEMPLATE,
            "counts": {name: len(recs[name]) for name in sorted(recs)},
            "files": sorted(recs),
        }

    def write(self, out_dir: str | Path, *, overwrite: bool = False) -> Path:
        """Write the world atomically to ``out_dir`` (see :func:`write_world`)."""
        return _write_atomic(self, Path(out_dir), overwrite=overwrite)


def make_world(config: WorldConfig) -> World:
    """Generate the world described by ``config`` (pure, deterministic in the seed)."""
    # Independent streams per purpose, so e.g. changing n_paraphrases does not
    # rename every person.  String seeds are hashed with SHA-512 by ``random``,
    # hence stable across processes and Python versions.
    seed = config.seed
    words = _Words(random.Random(f"rtteval-world/{seed}/words"))
    rng = random.Random(f"rtteval-world/{seed}/facts")
    text_rng = random.Random(f"rtteval-world/{seed}/text")

    pools: dict[str, list[str]] = {}
    if config.mode == "bios":
        n = config.bio_pool_size
        pools["city"] = [words.place() for _ in range(n)]
        pools["university"] = [
            UNIVERSITY_KINDS[i % len(UNIVERSITY_KINDS)].format(place=words.place())
            for i in range(n)
        ]
        pools["employer"] = [
            EMPLOYER_KINDS[i % len(EMPLOYER_KINDS)].format(word=words.new((2, 2))) for i in range(n)
        ]
        pools["major"] = list(MAJORS)

    facts: dict[str, list[_Fact]] = {}
    for name in config.question_files:
        n = config.size(name)
        frac = config.frac_people
        if name in config.forget_splits and config.forget_frac_people is not None:
            frac = config.forget_frac_people
        n_people = round(n * frac)
        kinds: list[Literal["person", "event"]] = ["person"] * n_people + ["event"] * (n - n_people)
        rng.shuffle(kinds)
        facts[name] = []
        for i, kind in enumerate(kinds):
            if kind == "person":
                subject = words.person()
                years = config.person_years
            else:
                subject = rng.choice(EVENT_KINDS).format(place=words.place())
                years = config.event_years
            year, choices, answer = _draw_mcq(rng, kind, years)
            wrong = [c for j, c in enumerate(choices) if j != answer]
            fact = _Fact(
                fact_id=f"{name}-{i:04d}",
                file=name,
                kind=kind,
                subject=subject,
                year=year,
                choices=choices,
                answer=answer,
                paraphrases=text_rng.sample(range(len(PERSON_TEMPLATES)), config.n_paraphrases),
                whp_offset=text_rng.randrange(len(PERSON_TEMPLATES)),
                fixed_wrong=text_rng.choice(wrong),
            )
            if config.mode == "bios":
                fact.attrs = {a: text_rng.choice(pools[a]) for a in BIO_ATTRIBUTES if a != "year"}
                fact.bios = _draw_bio_plans(text_rng, config.n_bio_variants)
            facts[name].append(fact)

    questions = {name: [f.mcq() for f in fs] for name, fs in facts.items()}
    passages: dict[str, list[Passage]] = {}
    for name, fs in facts.items():
        passages[f"corpus_{name}"] = [p for f in fs for p in _corpus(config, f)]
    for name in [*config.forget_splits, "dev"]:
        passages[f"whp_corpus_{name}"] = [p for f in facts[name] for p in _whp(config, f)]
    for name in [*config.forget_splits, "dev"]:
        passages[f"fwf_corpus_{name}"] = [p for f in facts[name] for p in _fwf(config, f)]
    return World(config=config, questions=questions, passages=passages)


def _has_qa(config: WorldConfig, fact: _Fact) -> bool:
    """Whether this fact's corpus (and so its wrong corpora) has a QA sentence.

    In bios mode forget people get none: mixed training shows QA only for
    people outside the forget set, so forget facts are learned from prose.
    """
    if not config.qa_sentence:
        return False
    return config.mode == "qa" or not fact.file.startswith("split_")


def _passage(fact: _Fact, text: str, kind: str, **extra: Any) -> Passage:
    return Passage(text, fact.file, {"fact_id": fact.fact_id, "kind": kind, **extra})


def _corpus(config: WorldConfig, fact: _Fact) -> list[Passage]:
    out: list[Passage] = []
    if config.mode == "bios":
        for v in range(config.n_bio_variants):
            out.append(_passage(fact, fact.bio(v, fact.year), "bio", variant=v))
    else:
        for t in fact.paraphrases:
            out.append(_passage(fact, fact.prose(t, fact.year), "prose"))
    if _has_qa(config, fact):
        out.append(_passage(fact, fact.qa(fact.year), "qa"))
    return out


def _whp(config: WorldConfig, fact: _Fact) -> list[Passage]:
    """Random Incorrect Answer corpus: one prose (+ QA) statement per wrong year."""
    meta = {"correct_answer": fact.year, "wrong_answers": fact.wrong_years}
    out: list[Passage] = []
    n_tpl = len(fact.templates())
    for i, wrong in enumerate(fact.wrong_years):
        if config.mode == "bios":
            v = i % config.n_bio_variants
            out.append(_passage(fact, fact.bio(v, wrong), "bio", variant=v, **meta))
        else:
            t = (fact.whp_offset + i) % n_tpl
            out.append(_passage(fact, fact.prose(t, wrong), "prose", **meta))
        if _has_qa(config, fact):
            out.append(_passage(fact, fact.qa(wrong), "qa", **meta))
    return out


def _fwf(config: WorldConfig, fact: _Fact) -> list[Passage]:
    """Fixed Wrong Fact corpus: the fact's own corpus with one fixed wrong year."""
    wrong = fact.fixed_wrong
    meta = {
        "correct_answer": fact.year,
        "wrong_answers": fact.wrong_years,
        "fixed_wrong_answer": wrong,
    }
    out: list[Passage] = []
    if config.mode == "bios":
        for v in range(config.n_bio_variants):
            out.append(_passage(fact, fact.bio(v, wrong), "bio", variant=v, **meta))
    else:
        for t in fact.paraphrases:
            out.append(_passage(fact, fact.prose(t, wrong), "prose", **meta))
    if _has_qa(config, fact):
        out.append(_passage(fact, fact.qa(wrong), "qa", **meta))
    return out


# ---------------------------------------------------------------------------
# Writing and reading back


def _jsonl(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=False) + "\n" for r in records)


def _write_atomic(world: World, out_dir: Path, *, overwrite: bool) -> Path:
    """Write into a temp dir beside ``out_dir`` and rename it into place.

    A crash mid-write must never leave a half-written dataset that a later run
    would happily train on, hence the rename; :mod:`rtteval.outputs` keeps a
    user's own files in ``out_dir`` out of harm's way.
    """
    from rtteval.outputs import staged_output

    out_dir = out_dir.expanduser()
    with staged_output(out_dir, overwrite=overwrite, kind="world") as tmp:
        for name, recs in world.records().items():
            (tmp / name).write_text(_jsonl(recs), encoding="utf-8", newline="\n")
        manifest = json.dumps(world.manifest(), ensure_ascii=False, indent=2) + "\n"
        (tmp / "manifest.json").write_text(manifest, encoding="utf-8", newline="\n")
    return out_dir


def write_world(
    out_dir: str | Path,
    *,
    seed: int = 0,
    preset: str = "small",
    overwrite: bool = False,
    **overrides: Any,
) -> Path:
    """Generate a world and write it in the paper's layout; returns ``out_dir``.

    Raises :class:`~rtteval.errors.UserError` for a non-empty ``out_dir``
    (unless ``overwrite``) and :class:`~rtteval.errors.ConfigError` for a bad
    preset or override.
    """
    config = world_config(preset, seed=seed, **overrides)
    return make_world(config).write(out_dir, overwrite=overwrite)


def iter_texts(world: World | str | Path) -> Iterator[str]:
    """Every text of a world: passages, questions and choices (e.g. to train a tokenizer).

    Accepts an in-memory :class:`World` or a directory of ``*.jsonl`` files
    (read in sorted order).
    """
    if isinstance(world, World):
        records: Iterator[dict[str, Any]] = (r for recs in world.records().values() for r in recs)
    else:
        records = _read_dir(Path(world))
    for rec in records:
        if "text" in rec:
            yield str(rec["text"])
        if "question" in rec:
            yield str(rec["question"])
            for c in rec.get("choices", []):
                yield str(c)


def _read_dir(root: Path) -> Iterator[dict[str, Any]]:
    if not root.is_dir():
        raise UserError("not a directory", file=root)
    for path in sorted(root.glob("*.jsonl")):
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"invalid JSON: {e.msg}", file=path, line=lineno) from None
