"""The batched lr grid (rtteval.training.grid): each member trains as if alone."""

import copy

import pytest
import torch

from rtteval.errors import ConfigError
from rtteval.scoring import ScoringConfig, evaluate_mcq
from rtteval.training.batching import encode_texts, make_batches
from rtteval.training.config import TrainConfig
from rtteval.training.grid import LrGrid, grid_unsupported
from rtteval.training.loop import train
from rtteval.training.losses import lm_loss_fn
from tests.helpers import toy_tokenizer_and_model


def _grid_runs(optimizer: str, lrs: list[float], **cfg_kw):
    """Each lr trained alone and all of them as one LrGrid, on the same batches."""
    qs, texts, tok, model = toy_tokenizer_and_model("micro", n=24)
    seqs = encode_texts(tok, texts)
    epochs = [make_batches(seqs, 8, tok.pad_token_id, seed=e) for e in range(3)]
    scoring = ScoringConfig(mode="likelihood")

    def evaluate(m):
        return {"correct": evaluate_mcq(m, tok, qs, scoring).correct}

    cfg = TrainConfig(optimizer=optimizer, epochs=3, seed=0, **cfg_kw)
    alone = []
    for lr in lrs:
        m = copy.deepcopy(model)
        res = train(m, epochs.__getitem__, lm_loss_fn, TrainConfig(**{**cfg.to_dict(), "lr": lr}),
                    evaluate=evaluate)  # fmt: skip
        alone.append((res, m))
    ens = LrGrid(model, lrs)
    together = train(ens, epochs.__getitem__, lm_loss_fn, cfg, evaluate=evaluate)
    return alone, together, ens


def _assert_same_run(a, b, model_a, model_b):
    assert (a.status, a.steps, a.epochs_run) == (b.status, b.steps, b.epochs_run)
    assert b.losses == pytest.approx(a.losses, rel=1e-4)
    assert [h["correct"] for h in b.history] == [h["correct"] for h in a.history]
    assert [h["step"] for h in b.history] == [h["step"] for h in a.history]
    # Lion steps by sign(...): rounding can flip a near-zero argument, moving that one weight by
    # 2 lr, so a few elements in 10^5 may differ; everything else must agree
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
        off = (p - q).abs() > 1e-5 + 1e-3 * p.abs()
        assert off.float().mean() < 1e-3, (name, int(off.sum()))


@pytest.mark.parametrize("optimizer", ["adamw", "lion"])
def test_grid_trains_each_lr_as_if_alone(optimizer):
    # clipping at 0.05 is active on every step; warmup and weight decay are per member too
    lrs = [1e-3, 3e-3, 1e-2] if optimizer == "adamw" else [1e-4, 3e-4, 1e-3]
    alone, together, ens = _grid_runs(
        optimizer, lrs, grad_clip=0.05, warmup_steps=4, weight_decay=0.1
    )
    assert len(together) == len(lrs)
    for (a, m), b, member in zip(alone, together, ens.members, strict=True):
        assert a.status == "completed" and len(a.history) == 3
        _assert_same_run(a, b, m, member)
    # the members really differ (a shared lr or a shared clip would not show here otherwise)
    assert alone[0][0].losses[-1] != pytest.approx(alone[2][0].losses[-1], rel=1e-3)


# AdamW at 1e6 overflowed to nan on one CPU and stayed finite (a dead model at loss ln V) on
# another; at 1e9 the first step's attention logits overflow on any IEEE machine
@pytest.mark.parametrize(("optimizer", "huge"), [("adamw", 1e9), ("lion", 1e10)])
def test_grid_member_that_diverges_is_frozen_and_the_others_go_on(optimizer, huge):
    lrs = [1e-3, huge, 3e-3] if optimizer == "adamw" else [1e-4, huge, 1e-3]
    alone, together, ens = _grid_runs(optimizer, lrs, grad_clip=1.0)
    assert alone[1][0].status == together[1].status == "diverged"
    assert together[1].message == alone[1][0].message  # "loss nan at step k"
    assert together[1].steps == alone[1][0].steps < 9 and not together[1].history
    assert together[1].losses == pytest.approx(alone[1][0].losses, rel=1e-4)
    for i in (0, 2):
        _assert_same_run(alone[i][0], together[i], alone[i][1], ens.members[i])


def test_grid_refuses_layers_without_a_grouped_version():
    _, _, _, model = toy_tokenizer_and_model()
    assert grid_unsupported(model) is None
    odd = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    assert "LayerNorm" in (grid_unsupported(odd) or "")
    with pytest.raises(ConfigError):
        LrGrid(odd, [1e-3, 1e-2])
