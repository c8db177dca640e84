"""The loader against the paper's released data and against malformed files.

Every malformed case is a tiny directory built in ``tmp_path``; each asserts
the ``file:line`` and field the error names, because that is what a user needs
to fix a 10k-line file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rtteval.data import MCQ, Dataset, Passage, check_summary, load_dataset
from rtteval.data.loader import duplicate_questions, natural_key, render_mcq
from rtteval.errors import ConfigError, DataError

# ---------------------------------------------------------------- helpers


def q(text: str, choices: Any = ("a", "b", "c", "d"), answer: Any = 0, **extra: Any) -> dict:
    """One question record as the released files write it."""
    return {"question": text, "choices": list(choices), "answer": answer, **extra}


def p(text: str, split: str | None = "split_0", **extra: Any) -> dict:
    """One passage record."""
    out: dict[str, Any] = {"text": text}
    if split is not None:
        out["split"] = split
    return {**out, **extra}


def write(path: Path, rows: list[Any]) -> Path:
    """Write rows as JSONL; a ``str`` row is written verbatim (for broken lines)."""
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def make(root: Path, files: dict[str, list[Any]]) -> Path:
    """A dataset directory holding ``files`` (name -> rows)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        write(root / name, rows)
    return root


def nonblank_lines(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def minimal(**more: list[Any]) -> dict[str, list[Any]]:
    """A valid two-split dataset, plus or overriding ``more`` files."""
    files: dict[str, list[Any]] = {
        "split_0.jsonl": [q("Q0a?"), q("Q0b?")],
        "split_1.jsonl": [q("Q1a?")],
    }
    files.update(more)
    return files


# ------------------------------------------------------------ real data


def check_counts_against_files(ds: Dataset) -> None:
    """Every loaded list has exactly one record per non-blank line of its file."""
    prefixes = {
        "corpus": "corpus_",
        "wrong_corpus": "whp_corpus_",
        "fixed_wrong_corpus": "fwf_corpus_",
        "true_false": "tf_",
    }
    for name, qs in ds.splits.items():
        assert len(qs) == nonblank_lines(ds.root / f"{name}.jsonl")
    assert len(ds.dev) == nonblank_lines(ds.root / "dev.jsonl")
    for attr, prefix in prefixes.items():
        table = getattr(ds, attr)
        assert set(table) == {
            f.name[len(prefix) : -len(".jsonl")] for f in ds.root.glob(f"{prefix}*.jsonl")
        }
        for name, passages in table.items():
            assert len(passages) == nonblank_lines(ds.root / f"{prefix}{name}.jsonl")


def test_years(shared_datasets: Path) -> None:
    ds = load_dataset(shared_datasets / "years")
    assert ds.name == "years"
    assert ds.split_names == [f"split_{i}" for i in range(5)]
    assert [len(v) for v in ds.splits.values()] == [158, 158, 158, 158, 157]
    assert len(ds.dev) == 5
    assert {k: len(v) for k, v in ds.corpus.items()} == {
        "dev": 15,
        **{f"split_{i}": 471 for i in range(5)},
    }
    assert len(ds.true_false["split_0"]) == 157
    assert not ds.retain and not ds.mcq_text and ds.manifest is None
    check_counts_against_files(ds)

    first = ds.splits["split_0"][0]
    assert first.question == "When did the following event happen?\nThe First Congo War begins."
    assert first.choices == ("1994", "1995", "1996", "1997")
    assert first.answer_text == "1996"
    assert first.extra == {"correct_year": 1996}  # extras kept
    assert first.source == f"{shared_datasets / 'years' / 'split_0.jsonl'}:1"
    # dev.jsonl stores years as JSON integers; they become strings.
    assert ds.dev[0].choices == ("1906", "1910", "1909", "1912")
    whp = ds.wrong_corpus["split_0"][0]
    assert whp.split == "split_0" and whp.extra["correct_answer"] == 1975
    assert ds.true_false["split_0"][0].extra["is_false"] == 0


def test_random_bd(shared_datasets: Path) -> None:
    ds = load_dataset(shared_datasets / "random_bd")
    assert ds.split_names == [f"split_{i}" for i in range(10)]
    assert all(len(v) == 157 for v in ds.splits.values())
    assert len(ds.dev) == 10
    assert [len(ds.wrong_corpus[f"split_{i}"]) for i in range(10)] == [
        411, 411, 471, 422, 412, 411, 411, 418, 415, 407,
    ]  # fmt: skip
    assert [len(ds.fixed_wrong_corpus[f"split_{i}"]) for i in range(10)] == [
        462, 471, 471, 462, 468, 471, 465, 471, 471, 468,
    ]  # fmt: skip
    assert len(ds.corpus["dev"]) == 30 and not ds.true_false
    check_counts_against_files(ds)

    first = ds.splits["split_0"][0]
    assert first == MCQ("When was Aidan Li born?", ("1961", "1958", "1965", "1994"), 2)
    questions = {x.question for x in ds.questions()}
    assert "When was بردیا رضایی born?" in questions  # unicode preserved
    assert "When was Mar Román born?" in questions
    assert ds.wrong_corpus["split_0"][0].extra["original_question"] == "When was Aidan Li born?"

    summary = check_summary(shared_datasets / "random_bd")
    assert list(summary) == [
        "splits", "corpus", "wrong_corpus", "fixed_wrong_corpus", "dev",
        "duplicate_choices", "ambiguous_answers",
    ]  # fmt: skip
    assert summary["splits"]["split_9"] == 157 and summary["dev"] == 10
    json.dumps(summary)  # the CLI prints it as JSON


def test_real_data_repeats_question_texts(shared_datasets: Path) -> None:
    """The release repeats texts (name collisions, reused events): accepted, listed, strict rejects."""
    ds = load_dataset(shared_datasets / "random_bd")
    dups = duplicate_questions(ds)
    assert len(dups["When was Frédéric Caron born?"]) == 18
    caron = [x for x in ds.questions() if x.question == "When was Frédéric Caron born?"]
    assert len({x.answer_text for x in caron}) > 1  # different people, one name
    for name in ("years", "random_bd"):
        with pytest.raises(DataError, match="the same question is also at"):
            load_dataset(shared_datasets / name, strict_duplicates=True)


# ----------------------------------------------------------- layouts


def test_natural_order(tmp_path: Path) -> None:
    names = ["split_10", "split_2", "split_1", "split_0"]
    files = {f"{n}.jsonl": [q(f"{n}?")] for n in names}
    files |= {f"corpus_{n}.jsonl": [p("t", n)] for n in names}
    ds = load_dataset(make(tmp_path / "d", files))
    assert ds.split_names == ["split_0", "split_1", "split_2", "split_10"]
    assert list(ds.corpus) == ["split_0", "split_1", "split_2", "split_10"]
    assert sorted(["b10", "b9", "a"], key=natural_key) == ["a", "b9", "b10"]


def test_mmlu_layout_with_spaces(tmp_path: Path) -> None:
    root = make(
        tmp_path / "mmlu",
        {
            "mmlu_social sciences.jsonl": [q("Who?", ["w", "x", "y", "z"], 3)],
            "mmlu_STEM.jsonl": [q("What?"), q("Why?")],
            "corpus_mmlu_social sciences.jsonl": [p("The answer is z.", "mmlu_social sciences")],
            "whp_corpus_mmlu_social sciences.jsonl": [p("The answer is w.", None)],
            "fwf_corpus_mmlu_STEM.jsonl": [p("Fixed wrong.", "mmlu_STEM")],
            "dev.jsonl": [q("Dev?")],
        },
    )
    ds = load_dataset(root)
    assert ds.split_names == ["mmlu_social sciences", "mmlu_STEM"]  # case-insensitive
    assert ds.splits["mmlu_social sciences"][0].answer_text == "z"
    assert ds.corpus["mmlu_social sciences"][0].split == "mmlu_social sciences"
    assert ds.wrong_corpus["mmlu_social sciences"][0].split is None
    assert ds.passages("fixed_wrong_corpus")[0].text == "Fixed wrong."
    assert len(ds.dev) == 1 and not ds.retain


def test_wmdp_layout(tmp_path: Path) -> None:
    root = make(
        tmp_path / "wmdp",
        {
            "split_0.jsonl": [q("Which agent?", ["a1", "a2", "a3", "a4"], 1)],
            "mcq_split_0.jsonl": [
                p("Already text.", None),
                q("Which tool?", ["t1", "t2", "t3", "t4"], 2, split="split_0", id=7),
                "",
                q("Which year?", [1990, 1991, 1992, 1993], 0),
            ],
        },
    )
    ds = load_dataset(root)
    texts = ds.mcq_text["split_0"]
    assert [x.text for x in texts] == [
        "Already text.",
        "Which tool?\nA. t1\nB. t2\nC. t3\nD. t4\nAnswer: C. t3",
        "Which year?\nA. 1990\nB. 1991\nC. 1992\nD. 1993\nAnswer: A. 1990",
    ]
    assert texts[1].split == "split_0" and texts[1].extra["id"] == 7
    assert texts[2].extra["choices"] == ["1990", "1991", "1992", "1993"]
    assert texts[2].source == f"{root / 'mcq_split_0.jsonl'}:4"
    assert render_mcq("Q", ["x", "y"], 1) == "Q\nA. x\nB. y\nAnswer: B. y"
    assert isinstance(texts[0], Passage)


def test_manifest_and_retain_files(tmp_path: Path) -> None:
    """The synthetic world: manifest picks forget splits, other question files are retain."""
    root = make(
        tmp_path / "world",
        {
            "split_0.jsonl": [q("F0?")],
            "split_1.jsonl": [q("F1?")],
            "retain_train.jsonl": [q("R1?"), q("R2?")],
            "retain_eval.jsonl": [q("R3?")],
            "corpus_retain_train.jsonl": [p("retain fact", "retain_train")],
            "corpus_split_0.jsonl": [p("forget fact")],
            "notes.jsonl": [{"comment": "not a question file"}],
        },
    )
    ds = load_dataset(root)  # without a manifest, the name rule applies
    assert ds.split_names == ["split_0", "split_1"]
    assert list(ds.retain) == ["retain_eval", "retain_train"]
    assert "notes" not in ds.retain and "retain_train" in ds.corpus

    (root / "manifest.json").write_text(json.dumps({"forget_splits": ["split_1"], "seed": 3}))
    ds = load_dataset(root)
    assert ds.split_names == ["split_1"]
    assert list(ds.retain) == ["retain_eval", "retain_train", "split_0"]
    assert ds.manifest == {"forget_splits": ["split_1"], "seed": 3}
    assert [x.question for x in ds.questions(["retain_train"])] == ["R1?", "R2?"]
    assert ds.summary()["retain"] == {"retain_eval": 1, "retain_train": 2, "split_0": 1}


def test_blank_lines_unicode_and_n_choices(tmp_path: Path) -> None:
    root = make(
        tmp_path / "d",
        {"split_0.jsonl": ["", q("Ünïcödé — 日本?", ["α", "β", "γ", "δ", "ε"], 4), "   "]},
    )
    ds = load_dataset(root, n_choices=5)
    assert ds.splits["split_0"][0].question == "Ünïcödé — 日本?"
    assert ds.splits["split_0"][0].answer_text == "ε"
    assert ds.splits["split_0"][0].source == f"{root / 'split_0.jsonl'}:2"
    with pytest.raises(ConfigError, match="n_choices"):
        load_dataset(root, n_choices=1)


def test_repeats_within_one_file_are_allowed(tmp_path: Path) -> None:
    root = make(tmp_path / "d", {"split_0.jsonl": [q("Same?"), q("Same?")]})
    assert len(load_dataset(root).splits["split_0"]) == 2


def test_hf_spec_is_resolved_through_the_hub(tmp_path: Path, monkeypatch: Any) -> None:
    root = make(tmp_path / "snap", minimal())
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda **kw: str(root))
    assert load_dataset("hf://owner/name").split_names == ["split_0", "split_1"]


# -------------------------------------------------------------- errors


def expect_error(root: Path, file: str, line: int | None, field: str | None, words: str) -> None:
    """Loading ``root`` fails at ``file:line`` naming ``field`` and ``words``."""
    with pytest.raises(DataError) as info:
        load_dataset(root)
    err = info.value
    path = str(root / file) if file else str(root)
    assert err.file == path and err.line == line and err.field == field, str(err)
    where = f"{path}:{line}" if line is not None else path
    assert str(err).startswith(where + ": ")
    if field:
        assert f"field '{field}'" in str(err)
    assert words in str(err)


BAD_LINES: list[tuple[str, list[Any], int, str | None, str]] = [
    # (id, rows of split_0.jsonl, line, field, words in the message)
    ("invalid-json", [q("ok?"), '{"question": "x", '], 2, None, "invalid JSON"),
    ("not-object", [[1, 2, 3]], 1, None, "expected a JSON object, got an array"),
    ("string-line", ['"just a string"'], 1, None, "expected a JSON object"),
    ("missing-question", [{"choices": ["a", "b", "c", "d"], "answer": 0}], 1, "question", "missing"),
    ("missing-choices", [{"question": "q?", "answer": 0}], 1, "choices", "missing"),
    ("missing-answer", ["", {"question": "q?", "choices": ["a", "b", "c", "d"]}], 2, "answer", "missing"),
    ("question-not-str", [q(42)], 1, "question", "must be a string"),
    ("question-empty", [q("  ")], 1, "question", "must not be empty"),
    ("choices-not-list", [{"question": "q?", "choices": "abcd", "answer": 0}], 1, "choices", "must be an array"),
    ("choice-not-scalar", [q("q?", ["a", None, "c", "d"])], 1, "choices", "choice 1 must be a string or a number"),
    ("choice-bool", [q("q?", ["a", True, "c", "d"])], 1, "choices", "choice 1"),
    ("answer-str", [q("q?", answer="1")], 1, "answer", "must be an integer"),
    ("answer-bool", [q("q?", answer=True)], 1, "answer", "must be an integer, got a boolean"),
    ("answer-float", [q("q?", answer=1.0)], 1, "answer", "must be an integer"),
    ("answer-too-big", [q("ok?"), q("q?", answer=4)], 2, "answer", "out of range"),
    ("answer-negative", [q("q?", answer=-1)], 1, "answer", "out of range"),
    ("too-few-choices", [q("q?", ["a", "b", "c"])], 1, "choices", "expected 4 choices, got 3"),
    ("too-many-choices", [q("q?", ["a", "b", "c", "d", "e"])], 1, "choices", "expected 4 choices, got 5"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("rows", "line", "field", "words"),
    [case[1:] for case in BAD_LINES],
    ids=[case[0] for case in BAD_LINES],
)
def test_bad_question_line(
    tmp_path: Path, rows: list[Any], line: int, field: str | None, words: str
) -> None:
    root = make(tmp_path / "d", minimal(**{"split_0.jsonl": rows}))
    expect_error(root, "split_0.jsonl", line, field, words)


@pytest.mark.parametrize("name", ["dev.jsonl", "retain_train.jsonl", "mmlu_law.jsonl"])
def test_bad_line_in_other_question_files(tmp_path: Path, name: str) -> None:
    root = make(tmp_path / "d", minimal(**{name: [q("fine?"), q("q?", answer=9)]}))
    expect_error(root, name, 2, "answer", "out of range")


BAD_PASSAGES: list[tuple[str, str, list[Any], int, str | None, str]] = [
    ("corpus-missing-text", "corpus_split_0.jsonl", [p("ok"), {"split": "split_0"}], 2, "text", "missing"),
    ("whp-text-not-str", "whp_corpus_split_0.jsonl", [{"text": ["a"]}], 1, "text", "must be a string"),
    ("fwf-split-not-str", "fwf_corpus_split_1.jsonl", [{"text": "t", "split": 1}], 1, "split", "must be a string"),
    ("tf-bad-json", "tf_split_0.jsonl", ["{nope}"], 1, None, "invalid JSON"),
    ("corpus-dev-not-object", "corpus_dev.jsonl", ["null"], 1, None, "got null"),
    ("mcq-neither", "mcq_split_0.jsonl", [{"id": 3}], 1, "text", "missing"),
    ("mcq-bad-answer", "mcq_split_0.jsonl", [q("q?", answer=4)], 1, "answer", "out of range"),
    ("mcq-missing-choices", "mcq_split_0.jsonl", [{"question": "q?", "answer": 0}], 1, "choices", "missing"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "rows", "line", "field", "words"),
    [case[1:] for case in BAD_PASSAGES],
    ids=[case[0] for case in BAD_PASSAGES],
)
def test_bad_passage_line(
    tmp_path: Path, name: str, rows: list[Any], line: int, field: str | None, words: str
) -> None:
    root = make(tmp_path / "d", minimal(**{name: rows}))
    expect_error(root, name, line, field, words)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_question_file(tmp_path: Path, content: str) -> None:
    root = make(tmp_path / "d", minimal())
    (root / "split_1.jsonl").write_text(content, encoding="utf-8")
    expect_error(root, "split_1.jsonl", None, None, "no questions")


def test_empty_dev_file(tmp_path: Path) -> None:
    root = make(tmp_path / "d", minimal(**{"dev.jsonl": []}))
    expect_error(root, "dev.jsonl", None, None, "no questions")


def test_invalid_utf8(tmp_path: Path) -> None:
    root = make(tmp_path / "d", minimal())
    (root / "split_1.jsonl").write_bytes(
        b'{"question": "ok?", "choices": [1,2,3,4], "answer": 0}\n\xff\xfe\n'
    )
    expect_error(root, "split_1.jsonl", 2, None, "not valid UTF-8")


def test_directory_missing(tmp_path: Path) -> None:
    expect_error(tmp_path / "nope", "", None, None, "does not exist")


def test_not_a_directory(tmp_path: Path) -> None:
    file = write(tmp_path / "split_0.jsonl", [q("q?")])
    expect_error(file, "", None, None, "not a directory")


def test_no_question_files(tmp_path: Path) -> None:
    root = make(tmp_path / "d", {"corpus_split_0.jsonl": [p("t")], "dev.jsonl": [q("d?")]})
    expect_error(root, "", None, None, "contains no question files")
    (tmp_path / "empty").mkdir()
    expect_error(tmp_path / "empty", "", None, None, "contains no question files")


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("split_0.jsonl", "split_1.jsonl"),
        ("split_0.jsonl", "dev.jsonl"),
        ("split_1.jsonl", "retain_eval.jsonl"),
        ("mmlu_a b.jsonl", "mmlu_c.jsonl"),
    ],
)
def test_question_in_two_files(tmp_path: Path, first: str, second: str) -> None:
    dup = q("Shared question?", ["w", "x", "y", "z"], 2, note="copy")
    files = minimal()
    files[first] = [*files.get(first, [q("first?")]), dup]
    files[second] = [q(f"{second} own?"), q("another?"), dup]
    root = make(tmp_path / "d", files)
    first_line = len(files[first])
    expect_error(root, second, 3, "question", f"also at {root / first}:{first_line}")


def test_shuffled_copy_counts_as_same_question(tmp_path: Path) -> None:
    root = make(
        tmp_path / "d",
        minimal(**{"split_1.jsonl": [q("Q0a?", ["b", "c", "a", "d"], 2)]}),
    )
    expect_error(root, "split_1.jsonl", 1, "question", f"also at {root / 'split_0.jsonl'}:1")


def test_same_text_different_question_is_allowed_unless_strict(tmp_path: Path) -> None:
    """random_bd-style name collision: same text, different answer."""
    root = make(tmp_path / "d", minimal(**{"split_1.jsonl": [q("Q0a?", ["e", "f", "g", "h"], 1)]}))
    assert len(load_dataset(root).questions()) == 3
    with pytest.raises(DataError) as info:
        load_dataset(root, strict_duplicates=True)
    assert f"{root / 'split_1.jsonl'}:1" in str(info.value)
    assert f"{root / 'split_0.jsonl'}:1" in str(info.value)


@pytest.mark.parametrize(
    ("manifest", "field", "words"),
    [
        ("{not json", None, "invalid JSON"),
        ("[1]", None, "expected a JSON object"),
        ('{"forget_splits": "split_0"}', "forget_splits", "list of split names"),
        ('{"forget_splits": ["split_7"]}', "forget_splits", "there is no split_7.jsonl"),
        ('{"forget_splits": []}', None, "contains no question files"),
    ],
)
def test_bad_manifest(tmp_path: Path, manifest: str, field: str | None, words: str) -> None:
    root = make(tmp_path / "d", minimal())
    (root / "manifest.json").write_text(manifest, encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_dataset(root)
    assert info.value.field == field and words in str(info.value)
    if field:
        assert str(info.value).startswith(f"{root / 'manifest.json'}: field '{field}'")
