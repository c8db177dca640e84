import math

import pytest
import torch

from rtteval.scoring import ScoringConfig, evaluate_mcq
from rtteval.training.batching import encode_texts, make_batches
from rtteval.training.config import TrainConfig
from rtteval.training.loop import train
from rtteval.training.losses import lm_loss_fn
from tests.helpers import toy_tokenizer_and_model


@pytest.mark.parametrize("optimizer", ["adamw", "lion"])
def test_training_learns_facts_well_above_chance(optimizer):
    torch.manual_seed(0)
    qs, texts, tok, model = toy_tokenizer_and_model("micro", n=24)
    scoring = ScoringConfig(mode="likelihood")
    before = evaluate_mcq(model, tok, qs, scoring).accuracy
    seqs = encode_texts(tok, texts)
    lr = 3e-3 if optimizer == "adamw" else 1e-3
    cfg = TrainConfig(lr=lr, epochs=60, optimizer=optimizer, seed=0, eval_every_epochs=10)
    res = train(
        model,
        lambda e: make_batches(seqs, 8, tok.pad_token_id, seed=e),
        lm_loss_fn,
        cfg,
        evaluate=lambda m: {"acc": evaluate_mcq(m, tok, qs, scoring).accuracy},
        stop=lambda row: row["acc"] >= 0.95,
    )
    after = evaluate_mcq(model, tok, qs, scoring).accuracy
    assert res.status in ("completed", "stopped_early")
    assert after >= 0.75, (before, after, res.history)
    assert after - before >= 0.4
    assert res.losses[-1] < res.losses[0]


def test_divergence_stops_cleanly():
    _, texts, tok, model = toy_tokenizer_and_model()
    seqs = encode_texts(tok, texts)

    def exploding(m, batch):
        loss, logs = lm_loss_fn(m, batch)
        return loss * float("nan"), logs

    res = train(
        model, lambda e: make_batches(seqs, 8, tok.pad_token_id), exploding, TrainConfig(epochs=2)
    )
    assert res.status == "diverged" and res.steps == 0
    assert all(p.requires_grad for p in model.parameters())
    res = train(
        model,
        lambda e: make_batches(seqs, 8, tok.pad_token_id),
        lm_loss_fn,
        TrainConfig(epochs=2, max_loss=0.001),
    )
    assert res.status == "diverged"
    assert not math.isnan(res.wall_time)


def test_divergence_hook_ends_the_run_with_its_reason():
    """``diverged(loss)`` sees each finite loss; its reason ends the run before that step."""
    _, texts, tok, model = toy_tokenizer_and_model()
    seqs = encode_texts(tok, texts)
    seen: list[float] = []

    def third_step(loss: float) -> str | None:
        seen.append(loss)
        return f"refused loss {loss:.3f}" if len(seen) == 3 else None

    res = train(
        model,
        lambda e: make_batches(seqs, 4, tok.pad_token_id, seed=e),
        lm_loss_fn,
        TrainConfig(epochs=5),
        diverged=third_step,
    )
    assert res.status == "diverged" and res.steps == 2  # the refused loss took no step
    assert res.message == f"refused loss {seen[2]:.3f}"
    assert res.losses == seen[:2]


def test_trainable_filter_freezes_other_parameters():
    _, texts, tok, model = toy_tokenizer_and_model()
    seqs = encode_texts(tok, texts)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(
        model,
        lambda e: make_batches(seqs, 8, tok.pad_token_id),
        lm_loss_fn,
        TrainConfig(epochs=1, lr=1e-2),
        trainable=lambda n: "layers.1.mlp.down_proj" in n,
    )
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"model.layers.1.mlp.down_proj.weight"}


def test_training_is_deterministic_by_seed():
    runs = []
    for _ in range(2):
        _, texts, tok, model = toy_tokenizer_and_model(seed=5)
        seqs = encode_texts(tok, texts)
        epochs = [make_batches(seqs, 8, tok.pad_token_id, seed=e) for e in range(2)]
        res = train(model, epochs.__getitem__, lm_loss_fn, TrainConfig(epochs=2, seed=5))
        runs.append((res.losses, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))
