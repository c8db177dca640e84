"""RTT: folds and provenance, the attack loop, and an end-to-end smoke run."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rtteval.attacks import ATTACKS, get_attack
from rtteval.attacks.folds import (
    Fold,
    ProvenanceError,
    TrainItem,
    build_folds,
    check_provenance,
    question_id,
)
from rtteval.attacks.records import ModelAttack
from rtteval.attacks.relearn import _Evaluator
from rtteval.attacks.rtt import RTT, RTTConfig, attack_model
from rtteval.data import MCQ, Dataset, Passage, load_dataset
from rtteval.data.world import QA_TEMPLATE
from rtteval.errors import ConfigError, DataError
from rtteval.models import build_tiny_model, snapshot_state, train_word_tokenizer
from rtteval.scoring import ScoringConfig, evaluate_mcq, format_mcq
from rtteval.stages.pretrain import scoring_for, world_texts

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on a loaded 2-core machine two threads ran these tests ~30x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def world(tiny_world: Path) -> Dataset:
    return load_dataset(tiny_world)


@pytest.fixture(scope="module")
def fresh(world: Dataset):
    """An untrained micro model with the world's vocabulary (enough to exercise the loop)."""
    tok = train_word_tokenizer(world_texts(world))
    model = build_tiny_model("micro", tok, seed=0)
    return model, tok


def _mcq(q: str, answer: int = 0, **extra) -> MCQ:
    return MCQ(q, ("1901", "1902", "1903", "1904"), answer, extra)


def _paper_like(dup: bool) -> Dataset:
    """Three splits in the paper's style (no fact ids), optionally with a cross-split repeat."""
    splits = {
        f"split_{k}": [_mcq(f"When was Person{k}x{i} born?", i % 4) for i in range(5)]
        for k in range(3)
    }
    if dup:
        splits["split_2"].append(_mcq("When was Person0x1 born?", 3))
    return Dataset(root=Path("paper_like"), splits=splits)


# --------------------------------------------------------------------------- config & registry


def test_registry_and_presets():
    assert isinstance(get_attack("rtt"), RTT) and ATTACKS["rtt"] is RTT
    with pytest.raises(ConfigError):
        get_attack("nope")
    p = RTTConfig.paper()
    assert (p.optimizer, p.epochs, p.batch_size, p.text_format) == ("lion", 6, 4, "mcq")
    assert (p.warmup_steps, p.grad_clip) == (24, None)
    assert p.lrs[0] == 1e-7 and p.lrs[-1] == 3.2e-6 and p.holdout_fraction == 0.0
    assert RTTConfig.paper(holdout_fraction=0.2).holdout_fraction == 0.2
    d = RTTConfig().to_dict()
    assert RTTConfig.from_dict(d) == RTTConfig()
    for bad in (
        dict(lrs=[]),
        dict(lrs=[-1.0]),
        dict(lrs=[1e-3, 1e-3]),
        dict(epochs=0),
        dict(text_format="bogus"),
        dict(holdout_fraction=1.0),
        dict(optimizer="sgd"),
    ):
        with pytest.raises(ConfigError):
            RTTConfig(**bad).validate()


# --------------------------------------------------------------------------- folds


def test_folds_cover_every_split_and_never_train_on_v(world: Dataset):
    folds = build_folds(world, RTTConfig())
    assert [f.v for f in folds] == world.split_names
    for f in folds:
        assert f.v not in f.t and sorted(f.t + [f.v]) == sorted(world.split_names)
        v_texts = {q.question for q in world.splits[f.v]}
        assert not any(v in text for v in v_texts for text in f.train_texts)
        assert all(it.split in f.t for it in f.items)
        # the held-out slice is T's, and is not trained on
        assert len(f.holdout) == round(0.2 * 32)
        hold = {question_id(q) for q in f.holdout}
        assert not hold & {it.ref for it in f.items}
        assert len(f.items) + len(f.holdout) == 32
        assert f.text_format == "qa"  # the default for a world
        p = f.provenance()
        assert p["checked"] and p["v"] == f.v and p["n_train_texts"] == len(f.items)
        assert sum(p["train_texts_per_split"].values()) == len(f.items)
    # deterministic in the seed; another seed holds out other questions
    again = build_folds(world, RTTConfig())
    assert [f.train_texts for f in again] == [f.train_texts for f in folds]
    other = build_folds(world, RTTConfig(seed=1))
    assert [q.question for q in other[0].holdout] != [q.question for q in folds[0].holdout]


def test_fold_subset_and_unknown_fold(world: Dataset):
    folds = build_folds(world, RTTConfig(folds=["split_3", "split_1"], holdout_fraction=0))
    assert [f.v for f in folds] == ["split_3", "split_1"]
    assert all(len(f.items) == 32 and not f.holdout for f in folds)
    with pytest.raises(ConfigError):
        build_folds(world, RTTConfig(folds=["split_9"]))


@pytest.mark.parametrize("text_format", ["qa", "mcq", "mcq_answer", "corpus"])
def test_training_texts_per_text_format(world: Dataset, text_format: str):
    f = build_folds(world, RTTConfig(text_format=text_format, folds=["split_0"]))[0]
    train_qs = [
        q
        for t in f.t
        for q in world.splits[t]
        if question_id(q) not in {question_id(h) for h in f.holdout}
    ]
    if text_format == "qa":
        assert f.train_texts == [
            QA_TEMPLATE.format(question=q.question, answer=q.answer_text) for q in train_qs
        ]
    elif text_format == "mcq":
        assert f.train_texts == [format_mcq(q, with_answer=True) for q in train_qs]
        assert f.train_texts[0].endswith(
            f"Answer: {'ABCD'[train_qs[0].answer]}. {train_qs[0].answer_text}"
        )
    elif text_format == "mcq_answer":
        assert all(it.prompt is not None and it.text.startswith(it.prompt) for it in f.items)
        assert all(it.prompt.endswith("Answer:") for it in f.items)
    else:
        held = {q.extra["fact_id"] for q in f.holdout}
        expected = [p.text for t in f.t for p in world.corpus[t] if p.extra["fact_id"] not in held]
        assert f.train_texts == expected and f.holdout_isolated
        subjects = [q.extra["subject"] for q in f.holdout]
        assert not any(s in text for s in subjects for text in f.train_texts)


def test_mcq_answer_loss_masks_the_prompt(world: Dataset, fresh):
    from rtteval.attacks.relearn import encode_items

    _, tok = fresh
    f = build_folds(world, RTTConfig(text_format="mcq_answer", folds=["split_0"]))[0]
    seqs, masks = encode_items(tok, f.items[:3])
    assert masks is not None
    for it, s, m in zip(f.items[:3], seqs, masks, strict=True):
        n_prompt = len(tok.encode(it.prompt))
        assert len(s) == len(m) and m[:n_prompt] == [0] * n_prompt and all(m[n_prompt:])


# --------------------------------------------------------------------------- provenance


def _v_question(world: Dataset, fold: Fold) -> MCQ:
    return world.splits[fold.v][0]


def test_injecting_a_v_question_into_t_fails_loudly(world: Dataset):
    fold = build_folds(world, RTTConfig(folds=["split_2"]))[0]
    q = _v_question(world, fold)
    # the relearning bug: V's QA sentence among T's training texts, recorded as T's
    leaked = QA_TEMPLATE.format(question=q.question, answer=q.answer_text)
    fold.items.append(TrainItem(leaked, fold.t[0], "looks-innocent"))
    with pytest.raises(ProvenanceError, match="V=split_2") as e:
        check_provenance(fold, world)
    assert q.question in str(e.value)
    assert isinstance(e.value, AssertionError)


@pytest.mark.parametrize(
    "how", ["prose_subject", "mcq_text", "holdout", "recorded_v", "fact_id", "v_in_t"]
)
def test_every_kind_of_leak_is_caught(world: Dataset, how: str):
    fold = build_folds(world, RTTConfig(folds=["split_1"]))[0]
    q = _v_question(world, fold)
    if how == "prose_subject":  # no question text, just the fact in prose
        fold.items.append(TrainItem(f"{q.extra['subject']} is remembered.", fold.t[0], "x"))
    elif how == "mcq_text":
        fold.items.append(TrainItem(format_mcq(q, with_answer=True), fold.t[0], "x"))
    elif how == "holdout":
        fold.holdout.append(q)
    elif how == "recorded_v":
        fold.items[0] = TrainItem(fold.items[0].text, fold.v, fold.items[0].ref)
    elif how == "fact_id":
        fold.items.append(TrainItem("harmless", fold.t[0], q.extra["fact_id"]))
    elif how == "v_in_t":
        fold.t.append(fold.v)
    with pytest.raises(ProvenanceError):
        check_provenance(fold, world)


def test_subjects_match_whole_words_only(world: Dataset):
    fold = build_folds(world, RTTConfig(folds=["split_1"]))[0]
    subj = _v_question(world, fold).extra["subject"]
    fold.items.append(TrainItem(f"{subj}ford is a town.", fold.t[0], "x"))
    check_provenance(fold, world)  # "Xford" is another word, not the V subject


def test_a_leaky_fold_never_reaches_training(world: Dataset, fresh):
    model, tok = fresh
    fold = build_folds(world, RTTConfig(folds=["split_0"]))[0]
    q = _v_question(world, fold)
    fold.items.append(
        TrainItem(QA_TEMPLATE.format(question=q.question, answer=q.answer_text), fold.t[0], "x")
    )
    before = snapshot_state(model)
    with pytest.raises(ProvenanceError):
        attack_model(model, tok, world, RTTConfig(folds=["split_0"]), folds=[fold])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_cross_split_repeats_are_dropped_or_refused():
    ds = _paper_like(dup=True)
    folds = build_folds(ds, RTTConfig(text_format="mcq", holdout_fraction=0))
    f0 = folds[0]  # V = split_0, whose question reappears in split_2
    assert [d["question"] for d in f0.dropped] == ["When was Person0x1 born?"]
    assert len(f0.items) == 10
    assert f0.provenance()["dropped_overlap"][0]["split"] == "split_2"
    with pytest.raises(DataError, match="overlap"):
        build_folds(ds, RTTConfig(text_format="mcq", overlap="error"))
    assert all(
        not f.dropped for f in build_folds(_paper_like(dup=False), RTTConfig(text_format="mcq"))
    )


def test_a_text_repeated_within_t_stays_on_one_side_of_the_holdout():
    ds = _paper_like(dup=False)
    for i in range(5):  # split_1's questions reappear (other answers) in split_2
        ds.splits["split_2"].append(_mcq(f"When was Person1x{i} born?", (i + 1) % 4))
    for seed in range(5):
        f = build_folds(ds, RTTConfig(text_format="mcq", folds=["split_0"], seed=seed))[0]
        held = {q.question for q in f.holdout}
        assert held and not any(h in t for h in held for t in f.train_texts)


def test_question_ids_without_fact_ids_are_stable_hashes():
    a, b = _mcq("When was X born?", 1), _mcq("When was X born?", 2)
    assert question_id(a) == question_id(_mcq("When was X born?", 1))
    assert question_id(a) != question_id(b) and question_id(a).startswith("q:")
    # a world's fact_id is positional: two worlds reuse it for different facts
    one, other = _mcq("x", fact_id="split_0-0001"), _mcq("y", fact_id="split_0-0001")
    assert question_id(one).startswith("split_0-0001:")
    assert question_id(one) != question_id(other)
    assert question_id(one) == question_id(_mcq("x", fact_id="split_0-0001"))


def test_corpus_loss_without_links_records_an_unisolated_holdout():
    ds = _paper_like(dup=False)
    ds.corpus = {
        n: [Passage(f"{q.question[9:-6]} was born in {q.answer_text}.", n) for q in qs]
        for n, qs in ds.splits.items()
    }
    f = build_folds(ds, RTTConfig(text_format="corpus", folds=["split_0"]))[0]
    assert not f.holdout_isolated and not f.provenance()["holdout_isolated"]
    assert len(f.items) == 10  # nothing could be linked to the held-out facts


# --------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("mode", ["likelihood", "letter", "calibrated"])
def test_evaluator_matches_evaluate_mcq(world: Dataset, fresh, mode: str):
    model, tok = fresh
    sc = scoring_for(world, batch_size=5)
    sc = ScoringConfig(mode=mode, likelihood_prompt=sc.likelihood_prompt, batch_size=5)
    groups = {"v": world.splits["split_0"], "r": world.retain["retain_eval"]}
    got = _Evaluator(tok, sc, groups)(model, ["v", "r"])
    for k, qs in groups.items():
        assert got[k] == evaluate_mcq(model, tok, qs, sc).correct


# --------------------------------------------------------------------------- the attack loop


def test_attack_model_curves_and_restores_weights(world: Dataset, fresh):
    model, tok = fresh
    before = snapshot_state(model)
    cfg = RTTConfig(lrs=[1e-3, 3e-3], epochs=2, folds=["split_0", "split_4"], batch_size=8)
    logs: list[str] = []
    a = attack_model(
        model,
        tok,
        world,
        cfg,
        scoring_for(world),
        retain_questions=world.retain["retain_eval"],
        label="fresh",
        log=logs.append,
    )
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "attack must not change the model"
    assert [f.v for f in a.folds] == ["split_0", "split_4"] and len(logs) == 4
    for f in a.folds:
        assert len(f.question_ids) == 8 and f.before.epoch == 0
        assert (
            f.before.v_correct
            == evaluate_mcq(model, tok, world.splits[f.v], scoring_for(world)).correct
        )
        assert [r.lr for r in f.runs] == [1e-3, 3e-3]
        for r in f.runs:
            assert r.status == "completed" and [e.epoch for e in r.epochs] == [1, 2]
            for e in r.epochs:
                assert len(e.v_correct) == 8 and e.v_acc == sum(e.v_correct) / 8
                assert e.holdout_correct is not None and len(e.holdout_correct) == 6
                assert e.retain_acc is not None and e.loss is not None
    assert a.grid() == [(1e-3, 1), (1e-3, 2), (3e-3, 1), (3e-3, 2)]
    assert a.correct_at(1e-3, 2).shape == (16,)
    assert a.config["text_format"] == "qa" and a.config["folds"] == ["split_0", "split_4"]
    # the same lr and seed give the same curve: runs are independent of their order
    b = attack_model(
        model, tok, world, RTTConfig(lrs=[3e-3], epochs=2, folds=["split_0"], batch_size=8)
    )
    assert b.folds[0].runs[0].epochs[-1].v_correct == a.folds[0].runs[1].epochs[-1].v_correct
    # round trip through JSON
    back = ModelAttack.from_dict(json.loads(json.dumps(a.to_dict())))
    assert back.to_dict() == a.to_dict()


def test_replicates_rerun_each_lr_with_a_new_data_order(world: Dataset, fresh):
    model, tok = fresh
    base = RTTConfig(lrs=[1e-3, 3e-3], epochs=1, folds=["split_2"], batch_size=8)
    one = attack_model(model, tok, world, base, scoring_for(world))
    two = attack_model(model, tok, world, replace(base, replicates=2), scoring_for(world))
    runs = two.folds[0].runs
    assert [(r.lr, r.replicate) for r in runs] == [(1e-3, 0), (3e-3, 0), (1e-3, 1), (3e-3, 1)]
    assert "replicates" not in one.config and two.replicates == 2
    # replicate 0 is the run without replicates; replicate 1 saw the batches in another order
    assert runs[0].epochs == one.folds[0].runs[0].epochs
    assert runs[2].epochs[0].loss != runs[0].epochs[0].loss
    assert two.correct_grid(two.grid()).shape == (2, 2, 8)
    assert two.correct_at(1e-3, 1) == pytest.approx(two.correct_grid([(1e-3, 1)]).mean(axis=0)[0])


@pytest.mark.parametrize("optimizer", ["adamw", "lion"])
def test_batched_grid_matches_lr_by_lr(world: Dataset, fresh, optimizer: str):
    """The lr grid trained as one LrGrid gives each lr's own run; a diverging lr stays alone."""
    model, tok = fresh
    before = snapshot_state(model)
    huge = 1e6 if optimizer == "adamw" else 1e10  # NaN loss after a step or two
    cfg = RTTConfig(
        lrs=[1e-3, huge, 3e-3] if optimizer == "adamw" else [1e-4, huge, 1e-3],
        epochs=2, folds=["split_1", "split_3"], batch_size=8, optimizer=optimizer,
        grad_clip=0.1, warmup_steps=3, retain_eval="end",
    )  # fmt: skip
    kw = dict(retain_questions=world.retain["retain_eval"])
    seq = attack_model(model, tok, world, cfg, scoring_for(world), batched=False, **kw)
    bat = attack_model(model, tok, world, cfg, scoring_for(world), batched=True, **kw)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for fs, fb in zip(seq.folds, bat.folds, strict=True):
        assert fb.before == fs.before
        for rs, rb in zip(fs.runs, fb.runs, strict=True):
            assert (rb.lr, rb.status, rb.steps) == (rs.lr, rs.status, rs.steps)
            assert rb.status == ("diverged" if rb.lr == huge else "completed"), rb.message
            assert [e.epoch for e in rb.epochs] == [e.epoch for e in rs.epochs]
            for es, eb in zip(rs.epochs, rb.epochs, strict=True):
                assert eb.v_correct == es.v_correct and eb.holdout_correct == es.holdout_correct
                assert eb.retain_acc == es.retain_acc
                assert eb.loss == pytest.approx(es.loss, rel=1e-4)
    with pytest.raises(ConfigError, match="batched RTT impossible"):
        attack_model(torch.nn.Sequential(torch.nn.LayerNorm(4)), tok, world, cfg, batched=True)


@pytest.mark.parametrize(
    ("text_format", "retain_eval"), [("mcq_answer", "end"), ("corpus", "none"), ("mcq", "epoch")]
)
def test_attack_model_other_text_formats_and_retain_modes(
    world: Dataset, fresh, text_format, retain_eval
):
    model, tok = fresh
    cfg = RTTConfig(
        lrs=[1e-3], epochs=2, folds=["split_2"], text_format=text_format, retain_eval=retain_eval,
        holdout_fraction=0,
    )  # fmt: skip
    a = attack_model(model, tok, world, cfg, retain_questions=world.retain["retain_eval"])
    eps = a.folds[0].runs[0].epochs
    assert a.config["text_format"] == text_format and len(eps) == 2
    assert all(e.holdout_correct is None and e.holdout_acc is None for e in eps)
    retains = [e.retain_acc is not None for e in eps]
    assert (
        retains
        == {"end": [False, True], "none": [False, False], "epoch": [True, True]}[retain_eval]
    )
    assert (a.retain_before is None) == (retain_eval == "none")


# --------------------------------------------------------------------------- end to end


def _crude_unlearn(src: Path, dst: Path, world: Dataset) -> None:
    """A cheap stand-in for unlearning: gradient ascent on the forget corpus until forget acc <= 0.35."""
    from rtteval.models import load_model, save_model
    from rtteval.training.batching import encode_texts, make_batches
    from rtteval.training.config import TrainConfig
    from rtteval.training.loop import train
    from rtteval.training.losses import nll_loss

    model, tok = load_model(src, device="cpu")
    sc = scoring_for(world)
    forget = encode_texts(tok, [p.text for n in world.split_names for p in world.corpus[n]])

    def loss_fn(m, b):
        loss = -nll_loss(m, b)
        return loss, {"ga": float(loss.detach())}

    train(
        model,
        lambda e: make_batches(forget, 16, tok.pad_token_id, seed=e),
        loss_fn,
        TrainConfig(lr=1e-3, epochs=20, eval_every_steps=2, eval_every_epochs=None),
        evaluate=lambda m: {"f": evaluate_mcq(m, tok, world.questions(), sc).accuracy},
        stop=lambda row: row["f"] <= 0.35,
    )
    save_model(model, tok, dst)


@pytest.mark.slow
def test_end_to_end_attack_and_report_via_cli(pretrained_tiny, tmp_path: Path, cli):
    world = load_dataset(pretrained_tiny["world"])
    unlearned = tmp_path / "unlearned"
    _crude_unlearn(pretrained_tiny["original"], unlearned, world)
    out = tmp_path / "rtt"
    args = [
        "attack", "--model", unlearned, "--original", pretrained_tiny["original"],
        "--control", pretrained_tiny["control"], "--data", pretrained_tiny["world"],
        "--out", out, "--lrs", "1e-3,3e-3", "--epochs", "3", "--folds", "split_0,split_1",
        "--method-name", "GA", "--n-boot", "200",
    ]  # fmt: skip
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    for name in ("results.json", "results.csv", "results_folds.csv", "report.md",
                 "fig_recovery.png", "fig_rtt_curves.png"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    (s,) = res["summary"]
    for key in ("dataset", "method", "original", "original_rtt", "unlearned", "unlearned_rtt",
                "control_rtt", "retain_original", "retain_unlearned", "recovery", "recovery_ci",
                "chance", "honest"):  # fmt: skip
        assert key in s, key
    assert s["method"] == "GA" and s["chance"] == 0.25 and s["n_questions"] == 16
    assert s["original"] >= 0.8 and s["unlearned"] <= 0.5
    assert s["control_rtt"] <= 0.5  # V cannot be guessed from T
    assert s["original_rtt"] >= 0.7
    assert len(res["folds"]) == 2 and {a["role"] for a in res["attacks"]} == {
        "original",
        "control",
        "unlearned",
    }
    for a in res["attacks"]:
        assert all(f["provenance"]["checked"] for f in a["folds"])
    # a second run resumes from the saved attacks
    r2 = cli(*args)
    assert r2.returncode == 0, r2.stderr
    assert "(0 new, 6 already finished)" in r2.stderr and "] done " not in r2.stderr
    # the report regenerates from results.json alone
    for name in ("results.csv", "report.md", "fig_recovery.png"):
        (out / name).unlink()
    r3 = cli("report", out)
    assert r3.returncode == 0, r3.stderr
    assert (out / "report.md").read_text().startswith("# RTT report")
    assert (out / "fig_recovery.png").exists()


def test_train_splits_takes_the_next_k_splits_cyclically(world: Dataset):
    names = world.split_names
    one = build_folds(world, RTTConfig(train_splits=1, holdout_fraction=0))
    assert [f.t for f in one] == [[names[(i + 1) % len(names)]] for i in range(len(names))]
    assert all(len(f.items) == len(world.splits[f.t[0]]) for f in one)
    two = build_folds(world, RTTConfig(train_splits=2, folds=[names[-1]]))[0]
    assert two.t == [names[0], names[1]]
    # all but V is the default, with the same training texts
    full = build_folds(world, RTTConfig(train_splits=len(names) - 1))
    assert [f.train_texts for f in full] == [f.train_texts for f in build_folds(world, RTTConfig())]
    with pytest.raises(ConfigError, match="at most"):
        build_folds(world, RTTConfig(train_splits=len(names)))
    with pytest.raises(ConfigError, match="train_splits"):
        build_folds(world, RTTConfig(train_splits=0))
