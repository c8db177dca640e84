"""Tests for the synthetic world generator (fast: pure Python, no model)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from rtteval.data.world import (
    LIKELIHOOD_PROMPT,
    PRESETS,
    QA_TEMPLATE,
    World,
    WorldConfig,
    iter_texts,
    make_world,
    write_world,
)
from rtteval.errors import ConfigError, UserError

YEAR = re.compile(r"\b\d{4}\b")


@pytest.fixture(scope="module")
def tiny() -> World:
    return make_world(WorldConfig(preset="tiny", seed=3))


@pytest.fixture(scope="module")
def big() -> World:
    """Enough questions (5 x 240 forget + retain) for distribution checks."""
    return make_world(WorldConfig(preset="tiny", seed=11, facts_per_split=240))


@pytest.fixture(scope="module")
def bios() -> World:
    return make_world(WorldConfig(preset="bios", seed=5, facts_per_split=6, n_retain_train=6))


def _all_mcqs(world: World):
    return [q for qs in world.questions.values() for q in qs]


def _read_dir(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_deterministic_bytes(tmp_path: Path) -> None:
    a = _read_dir(write_world(tmp_path / "a", seed=7, preset="tiny"))
    b = _read_dir(write_world(tmp_path / "b", seed=7, preset="tiny"))
    c = _read_dir(write_world(tmp_path / "c", seed=8, preset="tiny"))
    assert a == b
    assert a.keys() == c.keys()
    assert a["split_0.jsonl"] != c["split_0.jsonl"]
    assert a["corpus_split_0.jsonl"] != c["corpus_split_0.jsonl"]


def test_counts_match_config(tiny: World) -> None:
    cfg = tiny.config
    assert cfg.facts_per_split == PRESETS["tiny"]["facts_per_split"]
    assert list(tiny.questions) == [*cfg.forget_splits, "retain_train", "retain_eval", "dev"]
    for name, qs in tiny.questions.items():
        assert len(qs) == cfg.size(name)
        per_fact = cfg.n_paraphrases + int(cfg.qa_sentence)
        assert len(tiny.passages[f"corpus_{name}"]) == per_fact * len(qs)
    for name in [*cfg.forget_splits, "dev"]:
        n = len(tiny.questions[name])
        assert len(tiny.passages[f"whp_corpus_{name}"]) == 3 * 2 * n
        assert len(tiny.passages[f"fwf_corpus_{name}"]) == (cfg.n_paraphrases + 1) * n
    assert "whp_corpus_retain_train" not in tiny.passages
    kinds = Counter(q.extra["kind"] for q in tiny.questions["split_0"])
    assert kinds == {"person": 4, "event": 4}


def test_forget_domain_can_differ_from_the_retain_domain() -> None:
    """``forget_frac_people`` sets the forget splits' mix apart from the retain files'."""
    w = make_world(WorldConfig(preset="tiny", seed=3, frac_people=1.0, forget_frac_people=0.0))
    for name, qs in w.questions.items():
        want = "event" if name.startswith("split_") else "person"
        assert {q.extra["kind"] for q in qs} == {want}, name
    mixed = make_world(WorldConfig(preset="tiny", seed=3, frac_people=1.0))
    assert {q.extra["kind"] for q in mixed.questions["split_0"]} == {"person"}  # None: frac_people
    with pytest.raises(ValueError):
        WorldConfig(preset="tiny", forget_frac_people=1.5)


def test_mcq_fields_and_choices(tiny: World) -> None:
    rec = tiny.questions["split_0"][0].to_json()
    assert list(rec) == [
        "question",
        "choices",
        "answer",
        "fact_id",
        "kind",
        "subject",
        "correct_year",
    ]
    for q in _all_mcqs(tiny):
        assert len(q.choices) == 4 and all(isinstance(c, str) for c in q.choices)
        assert len(set(q.choices)) == 4
        assert q.answer_text == str(q.extra["correct_year"])
        assert q.extra["subject"] in q.question
        if q.extra["kind"] == "person":
            assert q.question == f"When was {q.extra['subject']} born?"
            lo, hi = tiny.config.person_years
        else:
            assert q.question == f"When did {q.extra['subject']} happen?"
            lo, hi = tiny.config.event_years
        assert all(lo <= int(c) <= hi for c in q.choices)


def test_answer_position_uniform(big: World) -> None:
    qs = _all_mcqs(big)
    assert len(qs) >= 800
    counts = Counter(q.answer for q in qs)
    for pos in range(4):
        assert abs(counts[pos] / len(qs) - 0.25) < 0.06, counts


def test_people_distractors_leak_nothing(big: World) -> None:
    people = [q for q in _all_mcqs(big) if q.extra["kind"] == "person"]
    assert len(people) >= 400
    ranks = Counter(sorted(map(int, q.choices)).index(int(q.answer_text)) for q in people)
    # rank 0 = correct is the min, rank 3 = correct is the max
    for r in range(4):
        assert abs(ranks[r] / len(people) - 0.25) < 0.06, ranks


def test_event_choices_consecutive(big: World) -> None:
    events = [q for q in _all_mcqs(big) if q.extra["kind"] == "event"]
    assert len(events) >= 400
    for q in events:
        ys = [int(c) for c in q.choices]
        assert ys == list(range(ys[0], ys[0] + 4))
    counts = Counter(q.answer for q in events)
    for pos in range(4):
        assert abs(counts[pos] / len(events) - 0.25) < 0.07, counts


def test_unique_questions_names_and_words(big: World) -> None:
    qs = _all_mcqs(big)
    assert len({q.question for q in qs}) == len(qs)
    assert len({q.extra["fact_id"] for q in qs}) == len(qs)
    subjects = [q.extra["subject"] for q in qs]
    assert len(set(subjects)) == len(subjects)
    name_words = [w for q in qs if q.extra["kind"] == "person" for w in q.extra["subject"].split()]
    assert len(set(name_words)) == len(name_words)  # no shared name tokens
    for w in name_words:
        assert w.isascii() and w.isalpha() and w[0].isupper()


def test_corpus_states_each_fact(tiny: World) -> None:
    for name, qs in tiny.questions.items():
        by_fact: dict[str, list[str]] = {}
        for p in tiny.passages[f"corpus_{name}"]:
            assert p.split == name
            assert list(p.to_json()) == ["text", "split", "fact_id", "kind"]
            by_fact.setdefault(p.extra["fact_id"], []).append(p.text)
        for q in qs:
            texts = by_fact[q.extra["fact_id"]]
            year = str(q.extra["correct_year"])
            for t in texts:
                assert year in t
                assert q.extra["subject"][1:] in t
                assert YEAR.findall(t) == [year]
            qa = QA_TEMPLATE.format(question=q.question, answer=year)
            assert qa in texts
            assert len(set(texts)) == len(texts)  # paraphrases differ
            # likelihood prompt + " " + choice is a prefix of the QA sentence
            assert qa.startswith(LIKELIHOOD_PROMPT.format(question=q.question) + " " + year)


def test_whp_never_states_correct_year(tiny: World) -> None:
    for name in [*tiny.config.forget_splits, "dev"]:
        mcqs = {q.extra["fact_id"]: q for q in tiny.questions[name]}
        seen: dict[str, set[int]] = {}
        for p in tiny.passages[f"whp_corpus_{name}"]:
            rec = p.to_json()
            assert list(rec)[:4] == ["text", "split", "fact_id", "kind"]
            q = mcqs[rec["fact_id"]]
            assert rec["correct_answer"] == q.extra["correct_year"]
            assert sorted(rec["wrong_answers"]) == sorted(
                int(c) for i, c in enumerate(q.choices) if i != q.answer
            )
            years = YEAR.findall(p.text)
            assert len(years) == 1 and str(rec["correct_answer"]) not in years
            assert int(years[0]) in rec["wrong_answers"]
            seen.setdefault(rec["fact_id"], set()).add(int(years[0]))
        for fid, q in mcqs.items():
            assert len(seen[fid]) == 3, q  # every wrong year is used


def test_fwf_one_fixed_wrong_year(tiny: World) -> None:
    for name in [*tiny.config.forget_splits, "dev"]:
        years: dict[str, set[str]] = {}
        for p in tiny.passages[f"fwf_corpus_{name}"]:
            rec = p.to_json()
            assert rec["fixed_wrong_answer"] in rec["wrong_answers"]
            assert rec["fixed_wrong_answer"] != rec["correct_answer"]
            assert YEAR.findall(p.text) == [str(rec["fixed_wrong_answer"])]
            years.setdefault(rec["fact_id"], set()).update(YEAR.findall(p.text))
        assert all(len(v) == 1 for v in years.values())
        assert len(years) == len(tiny.questions[name])
        # same sentences as the true corpus, with only the year swapped
        true = [p.text for p in tiny.passages[f"corpus_{name}"]]
        fwf = [p.text for p in tiny.passages[f"fwf_corpus_{name}"]]
        assert [YEAR.sub("Y", t) for t in true] == [YEAR.sub("Y", t) for t in fwf]


def test_manifest(tmp_path: Path) -> None:
    out = write_world(tmp_path / "w", seed=2, preset="tiny", n_splits=3)
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == "rtteval-world" and m["version"] == 1
    assert m["seed"] == 2 and m["preset"] == "tiny"
    assert m["forget_splits"] == ["split_0", "split_1", "split_2"]
    assert (m["retain_train"], m["retain_eval"], m["dev"]) == ("retain_train", "retain_eval", "dev")
    assert m["likelihood_prompt"] == LIKELIHOOD_PROMPT
    assert m["qa_template"] == QA_TEMPLATE
    files = sorted(p.name for p in out.glob("*.jsonl"))
    assert m["files"] == files
    for f in files:
        assert m["counts"][f] == len((out / f).read_text().splitlines())
    # the recorded config regenerates the same world
    assert WorldConfig(**m["config"]) == WorldConfig(preset="tiny", seed=2, n_splits=3)
    again = make_world(WorldConfig(**m["config"])).records()
    assert again["split_1.jsonl"] == [json.loads(x) for x in (out / "split_1.jsonl").open()]


def test_bios_mode(bios: World) -> None:
    cfg = bios.config
    assert cfg.mode == "bios" and cfg.frac_people == 1.0
    assert all(q.extra["kind"] == "person" for q in _all_mcqs(bios))
    for name, qs in bios.questions.items():
        ps = bios.passages[f"corpus_{name}"]
        qa = [p for p in ps if p.extra["kind"] == "qa"]
        bio = [p for p in ps if p.extra["kind"] == "bio"]
        assert len(bio) == cfg.n_bio_variants * len(qs)
        if name.startswith("split_"):
            assert qa == []  # forget facts are learned from prose only
        else:
            assert len(qa) == len(qs)
        for q in qs:
            mine = [p for p in bio if p.extra["fact_id"] == q.extra["fact_id"]]
            assert [p.extra["variant"] for p in mine] == list(range(cfg.n_bio_variants))
            assert len({p.text for p in mine}) == cfg.n_bio_variants
            for p in mine:
                sentences = [s for s in p.text.split(". ") if s]
                assert len(sentences) == 5
                assert all(q.extra["subject"] in s for s in sentences)
                assert YEAR.findall(p.text) == [q.answer_text]
    for name in cfg.forget_splits:
        whp = bios.passages[f"whp_corpus_{name}"]
        assert len(whp) == 3 * len(bios.questions[name])
        for p in whp:
            assert str(p.extra["correct_answer"]) not in p.text
        fwf = bios.passages[f"fwf_corpus_{name}"]
        assert len(fwf) == cfg.n_bio_variants * len(bios.questions[name])
        for p in fwf:
            assert YEAR.findall(p.text) == [str(p.extra["fixed_wrong_answer"])]


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "w"
    out.mkdir()  # empty dir is fine
    write_world(out, preset="tiny")
    before = _read_dir(out)
    with pytest.raises(UserError, match="not empty"):
        write_world(out, preset="tiny", seed=1)
    assert _read_dir(out) == before
    write_world(out, preset="tiny", seed=1, overwrite=True)
    assert _read_dir(out) != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]  # no temp dirs left behind
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError):
        write_world(tmp_path / "file", preset="tiny")


def test_bad_config() -> None:
    with pytest.raises(ConfigError, match="preset"):
        write_world("/nonexistent/x", preset="huge")
    with pytest.raises(ConfigError):
        write_world("/nonexistent/x", preset="tiny", n_splits=0)
    with pytest.raises(ConfigError):
        write_world("/nonexistent/x", preset="tiny", no_such_field=1)
    with pytest.raises(ConfigError, match="frac_people"):
        write_world("/nonexistent/x", preset="bios", frac_people=0.5)


def test_iter_texts(tmp_path: Path, tiny: World) -> None:
    texts = list(iter_texts(tiny))
    q = tiny.questions["split_0"][0]
    assert q.question in texts and q.choices[0] in texts
    assert tiny.passages["whp_corpus_dev"][0].text in texts
    out = tiny.write(tmp_path / "w")
    assert sorted(iter_texts(out)) == sorted(texts)


def test_loader_reads_world(tmp_path: Path) -> None:
    try:
        from rtteval.data.loader import load_dataset
    except ImportError:
        pytest.skip("rtteval.data.loader not available yet")
    out = write_world(tmp_path / "w", preset="tiny", seed=4)
    ds = load_dataset(out)
    assert list(ds.splits) == [f"split_{k}" for k in range(5)]
    assert set(ds.retain) == {"retain_train", "retain_eval"}
    assert len(ds.dev) == 4
    assert len(ds.splits["split_0"]) == 8
    assert len(ds.wrong_corpus["split_0"]) == 48
    assert len(ds.fixed_wrong_corpus["split_0"]) == 32
    assert ds.manifest is not None and ds.manifest["forget_splits"] == list(ds.splits)
