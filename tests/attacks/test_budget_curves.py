"""Budget curves: V every k optimizer steps, recorded beside the per-epoch evaluations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rtteval.attacks import AttackContext
from rtteval.attacks.records import ModelAttack
from rtteval.attacks.rtt import RTTConfig, attack_model
from rtteval.data import Dataset, load_dataset
from rtteval.models import build_tiny_model, snapshot_state, train_word_tokenizer
from rtteval.stages.pretrain import scoring_for, world_texts


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def world(tiny_world: Path) -> Dataset:
    return load_dataset(tiny_world)


def test_step_evaluations_form_a_curve_and_leave_the_epochs_alone(world: Dataset) -> None:
    tok = train_word_tokenizer(world_texts(world))
    model = build_tiny_model("micro", tok, seed=0)
    before = snapshot_state(model)
    base = dict(lrs=[1e-3, 3e-2], epochs=2, folds=["split_0"], batch_size=8, retain_eval="end")
    ret = world.retain["retain_eval"]
    plain = attack_model(model, tok, world, RTTConfig(**base), scoring_for(world),
                         retain_questions=ret)  # fmt: skip
    stepped = attack_model(model, tok, world, RTTConfig(**base, eval_every_steps=2),
                           scoring_for(world), retain_questions=ret)  # fmt: skip
    assert all(torch.equal(before[k], v) for k, v in snapshot_state(model).items())
    assert "eval_every_steps" not in plain.config and stepped.config["eval_every_steps"] == 2
    for p, s in zip(plain.folds[0].runs, stepped.folds[0].runs, strict=True):
        assert not p.curve and p.to_dict().get("curve") is None  # off: the record is as before
        # the extra evaluations change nothing the epochs record (retain only at the end)
        assert [e.to_dict() for e in p.epochs] == [e.to_dict() for e in s.epochs]
        assert [e.retain_acc is not None for e in s.epochs] == [False, True]
        spe = s.steps // 2
        steps = [c.step for c in s.curve]
        assert steps == sorted({*range(2, s.steps + 1, 2), spe, 2 * spe})  # every 2, and epoch ends
        for e in s.epochs:  # the epochs' evaluations are points of the curve
            (c,) = [c for c in s.curve if c.step == e.epoch * spe]
            assert c.v_correct == e.v_correct
        toks = [c.tokens for c in s.curve]
        assert toks == sorted(toks) and toks[0] > 0 and len(set(toks)) == len(toks)
    # the large lr moves V between epoch ends: the curve sees what the epochs miss
    big = stepped.folds[0].runs[1].curve
    assert len({tuple(c.v_correct) for c in big}) > 1
    back = ModelAttack.from_dict(json.loads(json.dumps(stepped.to_dict())))
    assert back.to_dict() == stepped.to_dict()


def test_retain_relearn_records_curves_too(world: Dataset) -> None:
    """eval_every_steps is declared once for every fine-tuning attack: retain-only gets it."""
    from rtteval.attacks.retain_relearn import RetainRelearn, RetainRelearnConfig

    tok = train_word_tokenizer(world_texts(world))
    model = build_tiny_model("micro", tok, seed=0)
    cfg = RetainRelearnConfig(lrs=[1e-3], epochs=1, batch_size=8, max_texts=24,
                              eval_every_steps=1, retain_eval="none").resolved(seed=0)  # fmt: skip
    a = RetainRelearn().run(cfg, AttackContext(model, tok, world, folds=["split_0"]))
    (run,) = a.folds[0].runs
    assert a.config["eval_every_steps"] == 1
    assert [c.step for c in run.curve] == list(range(1, run.steps + 1)) and run.steps == 3
