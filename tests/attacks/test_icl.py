"""The in-context-shots attack: T-only shots in the scoring format, provenance, arms, CLI and YAML."""

from __future__ import annotations

from pathlib import Path

import pytest

from rtteval.attacks import AttackContext, get_attack
from rtteval.attacks.folds import ProvenanceError, question_id
from rtteval.attacks.icl import ICLConfig, shot_fold, shot_pool, shot_text, with_shots
from rtteval.attacks.records import ModelAttack
from rtteval.data import load_dataset
from rtteval.data.types import MCQ
from rtteval.models import load_model
from rtteval.scoring import ScoringConfig, letter_prompt
from rtteval.stages.pretrain import scoring_for
from tests.attacks._nontraining import assert_at_chance, cli_args, run_cli, run_yaml


def test_shots_are_t_questions_in_the_scoring_format(tiny_world: Path) -> None:
    ds = load_dataset(tiny_world)
    v_texts = {q.question for q in ds.splits["split_2"]}
    pool = shot_pool(ds, "split_2", seed=0)
    # T only: every other split's questions, none of V's, in a seeded order
    assert {s for s, _ in pool} == set(ds.split_names) - {"split_2"}
    assert not [q for _, q in pool if q.question in v_texts]
    assert pool == shot_pool(ds, "split_2", seed=0) != shot_pool(ds, "split_2", seed=1)
    # likelihood (a world): the world's answered statements, then the question prompt
    sc = scoring_for(ds)
    fold = shot_fold(ds, "split_2", pool[:3], sc)
    q0 = pool[0][1]
    assert fold.train_texts[0] == f"Q: {q0.question} A: {q0.answer_text}."
    prompt = with_shots(sc, fold.train_texts, [q for _, q in pool[:3]]).likelihood_prompt
    v = ds.splits["split_2"][0]
    assert prompt.format(question=v.question) == "\n".join(
        [*fold.train_texts, sc.likelihood_prompt.format(question=v.question)]
    )
    # letter mode: the paper's answered MCQ shots, before the dataset's own dev shots
    dev = MCQ("Dev?", ("a", "b", "c", "d"), 1)
    letter = ScoringConfig(mode="letter", dev=[dev], n_shots=1)
    shots = [q for _, q in pool[:2]]
    texts = [shot_text(q, ds, letter) for q in shots]
    got = letter_prompt(v, with_shots(letter, texts, shots))
    assert got.startswith(texts[0] + "\n\n" + texts[1] + "\n\n" + "Dev?")
    assert texts[0].endswith(f"Answer: {'ABCD'[q0.answer]}.")


def test_a_v_question_in_the_shot_pool_is_refused(
    pretrained_tiny, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Leak injection: a V question among the shots fails before anything is scored."""
    ds = load_dataset(pretrained_tiny["world"])
    v_q = ds.splits["split_0"][3]
    pool = shot_pool(ds, "split_0", seed=0)
    sc = scoring_for(ds)
    # recorded as a T split, or reworded so only its subject gives it away: refused either way
    with pytest.raises(ProvenanceError, match="split_0"):
        shot_fold(ds, "split_0", [*pool[:2], ("split_1", v_q)], sc)
    disguised = MCQ(f"In which year: {v_q.extra['subject']}?", v_q.choices, v_q.answer)
    with pytest.raises(ProvenanceError, match="subject"):
        shot_fold(ds, "split_0", [("split_1", disguised), *pool[:2]], sc)
    # end to end: the attack's own pool with a V question in it
    import rtteval.attacks.icl as icl

    real = icl.shot_pool
    monkeypatch.setattr(
        icl, "shot_pool", lambda d, v, seed: [("split_1", d.splits[v][0]), *real(d, v, seed)]
    )
    model, tok = load_model(pretrained_tiny["original"], device="cpu")
    attack = get_attack("icl")
    with pytest.raises(ProvenanceError):
        attack.run(
            ICLConfig(shots=[1]).resolved(0), AttackContext(model, tok, ds, folds=["split_0"])
        )


@pytest.mark.parametrize(
    ("attack", "extra", "expect"),
    [
        ("icl", ["--shots", "0,3"], "--shots: "),
        ("icl", ["--shots", "3,3"], "shots has duplicates"),
        ("icl", ["--shots", "three"], "--shots: expected a comma-separated list of whole numbers"),
        ("rtt", ["--shots", "3"], "attack 'rtt' has no setting 'shots'"),
    ],
)
def test_icl_cli_options_are_checked_before_anything_runs(
    tmp_path: Path, cli, pretrained_tiny, attack: str, extra: list[str], expect: str
) -> None:
    r = cli(*cli_args(pretrained_tiny, attack), *extra, "--out", tmp_path / "o")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert expect in r.stderr and not (tmp_path / "o").exists()


def test_icl_from_the_cli(tmp_path: Path, cli, pretrained_tiny) -> None:
    res = run_cli(cli, tmp_path, pretrained_tiny, "icl")
    (s,) = res["summary"]
    assert (s["dataset"], s["attack"], s["method"]) == ("tiny [icl]", "icl", "never")
    ds = load_dataset(pretrained_tiny["world"])
    t_ids = {question_id(q) for n in ds.split_names if n != "split_1" for q in ds.splits[n]}
    for a in res["attacks"]:
        # k in the lr slot, one point each; the shots are T questions, the same for every arm
        assert a["config"]["lrs"] == [1.0, 3.0, 5.0, 10.0] and a["config"]["grid_axis"] == "shots"
        (f,) = a["folds"]
        assert [r["lr"] for r in f["runs"]] == a["config"]["lrs"]
        order = f["provenance"]["shot_order"]
        assert len(order) == 10 and set(order) <= t_ids and f["provenance"]["checked"]
    # the unlearned model here is the never-learned control: shots teach it no V fact
    (unl,) = [ModelAttack.from_dict(a) for a in res["attacks"] if a["role"] == "unlearned"]
    assert_at_chance(unl)


def test_icl_from_yaml_is_its_own_row_and_the_control_stays_at_chance(
    tmp_path: Path, cli, pretrained_tiny
) -> None:
    res = run_yaml(cli, tmp_path, pretrained_tiny, "icl", "{name: icl, shots: [2, 5]}")
    assert {(e["dataset"], e["attack"]) for e in res["summary"]} == {("w [icl]", "icl")}
    assert {a["role"] for a in res["attacks"]} == {"original", "control", "unlearned"}
    assert "`icl`: in-context shots" in res["_report_md"]
    assert '"+RTT" columns are after this attack at its best setting' in res["_report_md"]
    by_role = {
        a["role"]: ModelAttack.from_dict(a) for a in res["attacks"] if a["role"] != "unlearned"
    }
    assert by_role["original"].lrs == [2.0, 5.0]
    assert_at_chance(by_role["control"])
