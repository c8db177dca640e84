"""Load and validate a dataset directory in the released format of Deeb & Roger.

The paper ("Do Unlearning Methods Remove Information from Language Model
Weights?", arXiv 2410.08827) ships every dataset as a flat directory of JSONL
files; the file name decides what a file is (see ``docs/architecture.md``):

==================================  =========================================
file                                loaded into
==================================  =========================================
``split_K.jsonl``                   ``Dataset.splits["split_K"]`` (forget)
``mmlu_<category>.jsonl``           ``Dataset.splits["mmlu_<category>"]``
``dev.jsonl``                       ``Dataset.dev``
``corpus_<name>.jsonl``             ``Dataset.corpus[name]``
``whp_corpus_<name>.jsonl``         ``Dataset.wrong_corpus[name]`` (RIA)
``fwf_corpus_<name>.jsonl``         ``Dataset.fixed_wrong_corpus[name]`` (FWF)
``tf_<name>.jsonl``                 ``Dataset.true_false[name]``
``mcq_<name>.jsonl`` (WMDP-Deduped) ``Dataset.mcq_text[name]``
any other question file             ``Dataset.retain[name]``
``manifest.json`` (optional)        ``Dataset.manifest``
==================================  =========================================

``manifest.json``'s ``forget_splits`` list, when present, replaces the name
rule for forget splits: the listed question files are the forget splits and
every other question file (``split_K`` and ``mmlu_*`` included) is retain.
MMLU category names may contain spaces (``mmlu_social sciences.jsonl``).

Everything is validated up front, because a malformed line found an hour into
an RTT run wastes the run; every problem is a :class:`~rtteval.errors.DataError`
naming ``file:line`` and the field.

Duplicated questions.  The released data repeats question *texts*:
``random_bd`` draws names at random, so the same name appears up to 18 times,
in one split or in several, each time with its own random birth year (they are
different people who share a name); ``years`` asks about Churchill becoming
Prime Minister in two splits (1940 and 1951, both true) and reuses five dev
events in forget splits with different distractors.  None of these is the
*same* question, so by default only the same MCQ in two different question
files is an error: same question text, same answer text and the same set of
choices (their order ignored).  Such a copy would let RTT train on the very
questions it evaluates.  Repeats inside one file are allowed: a file is never
divided between training and evaluation, so they cannot leak.  Pass
``strict_duplicates=True`` to reject any question text that appears in two
files; :func:`duplicate_questions` lists the repeats for inspection.

Duplicated choices.  The released ``random_bd`` draws its distractor years at
random, so some questions offer the same year twice, sometimes the correct
one (docs/datasets.md has the counts).  Refusing them would refuse the
paper's own data, so by default they load and ``rtteval data check`` counts
them (``duplicate_choices``); ``distinct_choices=True`` (``data check
--strict``) rejects them with ``file:line``.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rtteval.data.hub import resolve_dataset_path
from rtteval.data.types import LETTERS, MCQ, Dataset, Passage, mcq_answer, mcq_prompt
from rtteval.errors import ConfigError, DataError, DataWarning

MANIFEST = "manifest.json"
QUESTION_FIELDS = ("question", "choices", "answer")

# (file-name prefix, Dataset attribute).  No prefix is a prefix of another, so
# the order does not matter; a question file can never start with one of these.
PASSAGE_PREFIXES: tuple[tuple[str, str], ...] = (
    ("corpus_", "corpus"),
    ("whp_corpus_", "wrong_corpus"),
    ("fwf_corpus_", "fixed_wrong_corpus"),
    ("tf_", "true_false"),
    ("mcq_", "mcq_text"),
)
FORGET_PREFIXES = ("split_", "mmlu_")
DEV = "dev"

_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key putting ``split_2`` before ``split_10`` (numbers compare as numbers).

    ``re.split`` with a capture group always yields text at even positions and
    digits at odd ones, so two keys never compare an ``int`` with a ``str``.
    The raw name breaks ties between names equal up to case or leading zeros.
    """
    parts = _DIGITS.split(name)
    return (
        tuple(int(p) if i % 2 else p.casefold() for i, p in enumerate(parts)),
        name,
    )


def render_mcq(question: str, choices: tuple[str, ...] | list[str], answer: int) -> str:
    """The text a WMDP-Deduped ``mcq_*`` record trains on.

    ``"question\\nA. c1\\nB. c2\\nC. c3\\nD. c4\\nAnswer: X. cX"`` -- the
    evaluation prompt followed by the answer (:func:`rtteval.data.types.mcq_prompt`),
    so fine-tuning on it teaches exactly what the evaluation asks for.
    """
    return mcq_prompt(question, choices) + mcq_answer(choices, answer)


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(1-based line number, object)`` for every non-blank line.

    Lines are decoded one by one so that an encoding error still gets its
    line number; a UTF-8 byte-order mark on the first line is tolerated
    because some editors on Windows write one.
    """
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read file: {e.strerror or e}", file=path) from e
    for lineno, chunk in enumerate(raw.split(b"\n"), start=1):
        try:
            text = chunk.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"not valid UTF-8: {e.reason}", file=path, line=lineno) from e
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"invalid JSON: {e.msg} (column {e.colno})", file=path, line=lineno
            ) from e
        if not isinstance(obj, dict):
            raise DataError(
                f"expected a JSON object, got {_json_type(obj)}", file=path, line=lineno
            )
        yield lineno, obj


def _json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for messages users can act on."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _is_int(value: Any) -> bool:
    """``True`` for JSON integers; ``true``/``false`` are not answers even though bool is an int."""
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_mcq(
    obj: dict[str, Any], path: Path, line: int, n_choices: int | None, strict: bool = False
) -> MCQ:
    """Validate one question record; ``n_choices=None`` accepts 2..8 choices.

    ``strict`` also rejects a choice that repeats another (see the module
    docstring: the released ``random_bd`` has such questions).
    """

    def fail(field: str, message: str) -> DataError:
        return DataError(message, file=path, line=line, field=field)

    for name in QUESTION_FIELDS:
        if name not in obj:
            raise fail(name, "missing field")
    question, choices, answer = obj["question"], obj["choices"], obj["answer"]
    if not isinstance(question, str):
        raise fail("question", f"must be a string, got {_json_type(question)}")
    if not question.strip():
        raise fail("question", "must not be empty")
    if not isinstance(choices, list):
        raise fail("choices", f"must be an array, got {_json_type(choices)}")
    if n_choices is not None and len(choices) != n_choices:
        raise fail("choices", f"expected {n_choices} choices, got {len(choices)}")
    if n_choices is None and not 2 <= len(choices) <= len(LETTERS):
        raise fail("choices", f"expected 2 to {len(LETTERS)} choices, got {len(choices)}")
    texts: list[str] = []
    for i, c in enumerate(choices):
        # Years are stored as JSON integers in some files; prompts need text.
        if isinstance(c, bool) or not isinstance(c, str | int | float):
            raise fail("choices", f"choice {i} must be a string or a number, got {_json_type(c)}")
        texts.append(str(c))
    if strict:
        seen = [t.strip() for t in texts]
        dup = next((i for i, t in enumerate(seen) if t in seen[:i]), None)
        if dup is not None:
            raise fail(
                "choices", f"choice {dup} ({texts[dup]!r}) repeats choice {seen.index(seen[dup])}"
            )
    if not _is_int(answer):
        raise fail("answer", f"must be an integer, got {_json_type(answer)}")
    if not 0 <= answer < len(choices):
        raise fail("answer", f"{answer} is out of range for {len(choices)} choices (0-based)")
    extra = {k: v for k, v in obj.items() if k not in QUESTION_FIELDS}
    return MCQ(question, tuple(texts), answer, extra=extra, source=f"{path}:{line}")


def _parse_passage(obj: dict[str, Any], path: Path, line: int) -> Passage:
    """Validate one corpus record: ``text`` is required, ``split`` optional."""
    if "text" not in obj:
        raise DataError("missing field", file=path, line=line, field="text")
    text, split = obj["text"], obj.get("split")
    if not isinstance(text, str):
        raise DataError(
            f"must be a string, got {_json_type(text)}", file=path, line=line, field="text"
        )
    if split is not None and not isinstance(split, str):
        raise DataError(
            f"must be a string, got {_json_type(split)}", file=path, line=line, field="split"
        )
    extra = {k: v for k, v in obj.items() if k not in ("text", "split")}
    return Passage(text, split, extra=extra, source=f"{path}:{line}")


def _parse_mcq_text(obj: dict[str, Any], path: Path, line: int) -> Passage:
    """One WMDP-Deduped ``mcq_*`` line, read leniently.

    A line with ``text`` is an ordinary passage.  Otherwise a line with the
    question fields is validated as an MCQ (any 2..8 choices) and kept as a
    passage whose text is :func:`render_mcq` of it; the original fields stay in
    ``extra`` (choices as strings) so nothing is lost.
    """
    if "text" in obj or not any(k in obj for k in QUESTION_FIELDS):
        return _parse_passage(obj, path, line)
    mcq = _parse_mcq(obj, path, line, None)
    split = obj.get("split")
    if split is not None and not isinstance(split, str):
        raise DataError(
            f"must be a string, got {_json_type(split)}", file=path, line=line, field="split"
        )
    extra = {k: v for k, v in obj.items() if k != "split"}
    extra["choices"] = list(mcq.choices)
    text = render_mcq(mcq.question, mcq.choices, mcq.answer)
    return Passage(text, split, extra=extra, source=f"{path}:{line}")


def _load_questions(path: Path, n_choices: int, strict: bool = False) -> list[MCQ]:
    """All questions of one question file; an empty question file is an error."""
    out = [_parse_mcq(obj, path, line, n_choices, strict) for line, obj in _read_jsonl(path)]
    if not out:
        raise DataError("no questions (the file is empty or has only blank lines)", file=path)
    return out


def _load_manifest(path: Path) -> dict[str, Any]:
    """Parse ``manifest.json`` and check the one key the loader acts on."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8-sig"))
    except OSError as e:
        raise DataError(f"cannot read file: {e.strerror or e}", file=path) from e
    except UnicodeDecodeError as e:
        raise DataError(f"not valid UTF-8: {e.reason}", file=path) from e
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e.msg}", file=path, line=e.lineno) from e
    if not isinstance(manifest, dict):
        raise DataError(f"expected a JSON object, got {_json_type(manifest)}", file=path)
    forget = manifest.get("forget_splits")
    if forget is not None and not (
        isinstance(forget, list) and all(isinstance(s, str) for s in forget)
    ):
        raise DataError("must be a list of split names", file=path, field="forget_splits")
    return manifest


def _is_question_file(path: Path) -> bool:
    """Whether an unrecognised ``<name>.jsonl`` holds questions.

    The architecture says only "other files *with question fields*" are retain
    files, so a stray JSONL (say, someone's notes) is skipped rather than
    breaking the load.  The first record decides; a file that is empty or
    does not parse is treated as a question file so its problem is reported.
    """
    try:
        first = next(_read_jsonl(path), None)
    except DataError:
        return True
    return first is None or any(k in first[1] for k in QUESTION_FIELDS)


def _check_duplicates(files: list[tuple[Path, list[MCQ]]], strict: bool) -> None:
    """Reject a question that appears in two different question files.

    See the module docstring: by default "the same question" means the same
    text, answer text and choice set; ``strict`` compares the text alone.
    """
    seen: dict[Any, tuple[Path, MCQ]] = {}
    for path, questions in files:
        for q in questions:
            key: Any = (
                q.question if strict else (q.question, q.answer_text, tuple(sorted(q.choices)))
            )
            first = seen.setdefault(key, (path, q))
            if first[0] != path:
                # source is "path:line" (built by _parse_mcq); the path may hold colons.
                line = int(str(q.source).rsplit(":", 1)[1])
                raise DataError(
                    f"the same question is also at {first[1].source}; a question may be in "
                    "only one question file, or RTT would train on questions it evaluates",
                    file=path,
                    line=line,
                    field="question",
                )


def _list_dir(root: Path) -> list[Path]:
    """The entries of a dataset directory, or one line saying why there are none."""
    if not root.exists():
        raise DataError("dataset directory does not exist", file=root)
    if not root.is_dir():
        raise DataError("not a directory (expected a dataset directory)", file=root)
    try:
        return list(root.iterdir())
    except OSError as e:  # an unreadable directory: one line, not a traceback
        raise DataError(f"cannot read directory: {e.strerror or e}", file=root) from None


def _classify_files(entries: list[Path]) -> tuple[dict[str, dict[str, Path]], dict[str, Path]]:
    """Passage files by table and split name, and question files by name (the layout's table)."""
    passage_files: dict[str, dict[str, Path]] = {attr: {} for _, attr in PASSAGE_PREFIXES}
    question_files: dict[str, Path] = {}
    for file in entries:
        if file.name.startswith(".") or file.suffix != ".jsonl" or not file.is_file():
            continue
        stem = file.name[: -len(".jsonl")]
        for prefix, attr in PASSAGE_PREFIXES:
            if stem.startswith(prefix):
                passage_files[attr][stem[len(prefix) :]] = file
                break
        else:
            if stem == DEV or _is_question_file(file):
                question_files[stem] = file
    return passage_files, question_files


def _forget_and_retain(
    root: Path,
    question_files: dict[str, Path],
    manifest: dict[str, Any] | None,
    manifest_path: Path,
) -> tuple[list[str], list[str]]:
    """Forget and retain question files, in natural order: the manifest's list, or by name."""
    forget_names = manifest.get("forget_splits") if manifest else None
    if forget_names is not None:
        for n in forget_names:
            if n == DEV or n not in question_files:
                why = "dev cannot be a forget split" if n == DEV else f"there is no {n}.jsonl"
                raise DataError(
                    f"lists {n!r}, but {why}", file=manifest_path, field="forget_splits"
                )

    def is_forget(name: str) -> bool:
        if forget_names is not None:
            return name in forget_names
        return name.startswith(FORGET_PREFIXES)

    names = sorted(question_files, key=natural_key)
    forget = [n for n in names if n != DEV and is_forget(n)]
    retain = [n for n in names if n != DEV and not is_forget(n)]
    if not forget:
        raise DataError(
            "contains no question files (expected split_K.jsonl or mmlu_<category>.jsonl"
            + (", or the names in manifest.json's forget_splits" if manifest else "")
            + ")",
            file=root,
        )
    return forget, retain


def _load_passages(
    passage_files: dict[str, dict[str, Path]],
) -> dict[str, dict[str, list[Passage]]]:
    """Every passage table (corpus, wrong_corpus, ...): split name -> passages."""
    tables: dict[str, dict[str, list[Passage]]] = {}
    for _, attr in PASSAGE_PREFIXES:
        parse = _parse_mcq_text if attr == "mcq_text" else _parse_passage
        tables[attr] = {}
        for name in sorted(passage_files[attr], key=natural_key):
            file = passage_files[attr][name]
            if not name:
                raise DataError("file name has no split name after the prefix", file=file)
            tables[attr][name] = [parse(obj, file, line) for line, obj in _read_jsonl(file)]
    return tables


def load_dataset(
    path: str | Path,
    *,
    n_choices: int = 4,
    strict_duplicates: bool = False,
    distinct_choices: bool = False,
) -> Dataset:
    """Load and validate a dataset directory (or ``hf://owner/name[@rev]``).

    ``n_choices`` is the number of choices every question must have (the
    paper's datasets all have 4); ``mcq_*`` training text is exempt.
    ``strict_duplicates`` rejects any question text found in two question
    files, not only identical questions (see the module docstring for why the
    default is looser: the released data repeats texts).  ``distinct_choices``
    rejects a question that offers the same choice twice.

    Raises :class:`~rtteval.errors.DataError` for any malformed input.
    """
    if n_choices < 2 or n_choices > len(LETTERS):
        raise ConfigError(
            f"must be between 2 and {len(LETTERS)}, got {n_choices}", field="n_choices"
        )
    root = resolve_dataset_path(path)
    entries = _list_dir(root)
    manifest_path = root / MANIFEST
    has_manifest = manifest_path in entries and manifest_path.is_file()
    manifest = _load_manifest(manifest_path) if has_manifest else None
    passage_files, question_files = _classify_files(entries)
    forget, retain = _forget_and_retain(root, question_files, manifest, manifest_path)

    loaded = {
        n: _load_questions(question_files[n], n_choices, distinct_choices) for n in forget + retain
    }
    dev = (
        _load_questions(question_files[DEV], n_choices, distinct_choices)
        if DEV in question_files
        else []
    )
    order = [(question_files[n], loaded[n]) for n in forget + retain]
    if dev:
        order.append((question_files[DEV], dev))
    _check_duplicates(order, strict_duplicates)
    tables = _load_passages(passage_files)
    if not distinct_choices:
        _warn_ambiguous([q for n in forget + retain for q in loaded[n]] + list(dev))

    return Dataset(
        root=root,
        splits={n: loaded[n] for n in forget},
        corpus=tables["corpus"],
        wrong_corpus=tables["wrong_corpus"],
        fixed_wrong_corpus=tables["fixed_wrong_corpus"],
        true_false=tables["true_false"],
        mcq_text=tables["mcq_text"],
        retain={n: loaded[n] for n in retain},
        dev=dev,
        manifest=manifest,
    )


def _warn_ambiguous(questions: list[MCQ]) -> None:
    """Say when a question offers its correct answer twice: two letters are then right.

    Scoring counts only the answer's index, so such a question is harder
    than it looks; the paper's ``random_bd`` has some, which must load, so
    this warns (once per load, naming the first) rather than refusing.
    """
    bad = [
        q for q in questions
        if [c.strip() for c in q.choices].count(q.choices[q.answer].strip()) > 1
    ]  # fmt: skip
    if bad:
        warnings.warn(
            DataWarning(
                f"{bad[0].source}: field 'choices': {len(bad)} question(s) offer the correct "
                "answer twice (scored by its index only; `rtteval data check --strict` refuses them)"
            ),
            stacklevel=2,
        )


def check_summary(
    path: str | Path, *, n_choices: int = 4, strict_duplicates: bool = False
) -> dict[str, Any]:
    """What ``rtteval data check DIR`` prints: validate, then count.

    ``{"splits": {name: n}, "corpus": {...}, "wrong_corpus": {...},
    "fixed_wrong_corpus": {...}, "dev": n}`` plus ``retain`` /
    ``true_false`` / ``mcq_text`` when the dataset has them, and
    ``duplicate_choices`` / ``ambiguous_answers`` (questions offering a choice
    twice; of those, the ones whose answer is the repeated choice) when any.
    """
    return load_dataset(path, n_choices=n_choices, strict_duplicates=strict_duplicates).summary()


def duplicate_questions(dataset: Dataset) -> dict[str, list[str]]:
    """Question texts that occur more than once, mapped to every ``file:line``.

    For inspection only: repeats that :func:`load_dataset` accepted (same text,
    different question -- see the module docstring) show up here.
    """
    where: dict[str, list[str]] = {}
    groups = [*dataset.splits.values(), *dataset.retain.values(), dataset.dev]
    for questions in groups:
        for q in questions:
            where.setdefault(q.question, []).append(str(q.source))
    return {text: places for text, places in where.items() if len(places) > 1}
