import math

import pytest
import torch

from rtteval.errors import ConfigError, DataError
from rtteval.scoring import ScoringConfig, evaluate_mcq
from rtteval.training.batching import encode_texts, make_batches, pad_batch
from rtteval.training.config import TrainConfig
from rtteval.training.loop import train
from rtteval.training.losses import lm_loss_fn
from rtteval.training.optim import Lion, lr_factor
from tests.helpers import toy_tokenizer_and_model


def test_pad_batch_masks_padding_in_labels():
    b = pad_batch([[1, 2, 3], [4]], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[1, 2, 3], [4, -100, -100]]
    b = pad_batch([[1, 2, 3]], pad_id=0, loss_masks=[[0, 0, 1]])
    assert b["labels"].tolist() == [[-100, -100, 3]]


def test_make_batches_covers_every_sequence_once_and_is_deterministic():
    seqs = [[i] * (1 + i % 7) for i in range(50)]
    a = make_batches(seqs, 8, 0, seed=3)
    b = make_batches(seqs, 8, 0, seed=3)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b, strict=True))
    firsts = sorted(int(x) for batch in a for x in batch["input_ids"][:, 0])
    assert firsts == list(range(50))
    # bucketing keeps padding small
    waste = sum(int((batch["attention_mask"] == 0).sum()) for batch in a)
    unbucketed = sum(
        int((batch["attention_mask"] == 0).sum())
        for batch in make_batches(seqs, 8, 0, seed=3, bucket=False)
    )
    assert waste < unbucketed


def test_lr_schedule_warmup_and_cosine():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.0)
    assert lr_factor(0, 110, cfg) == pytest.approx(0.1)
    assert lr_factor(9, 110, cfg) == pytest.approx(1.0)
    assert lr_factor(10, 110, cfg) == pytest.approx(1.0)
    assert lr_factor(60, 110, cfg) == pytest.approx(0.5)
    assert lr_factor(110, 110, cfg) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ConfigError):
        lr_factor(20, 100, TrainConfig(schedule="bogus", warmup_steps=0))  # type: ignore[arg-type]


def test_lion_step_is_sign_update():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99))
    p.grad = torch.tensor([0.5, -0.1, 0.0])
    opt.step()
    assert p.detach().tolist() == pytest.approx([0.9, -1.9, 3.0])


def test_encode_refuses_silent_truncation():
    _, texts, tok, _ = toy_tokenizer_and_model()
    ids = encode_texts(tok, texts[:2])
    assert ids[0][0] == tok.bos_token_id and ids[0][-1] == tok.eos_token_id
    with pytest.raises(DataError, match="over the model's maximum context of 3"):
        encode_texts(tok, ["a b c d e f g"], max_length=3)


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


# --------------------------------------------------------------------------- ensembles


def _grid_runs(optimizer: str, lrs: list[float], **cfg_kw):
    """Each lr trained alone and all of them as one LrGrid, on the same batches."""
    import copy

    from rtteval.training.grid import LrGrid

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
def test_ensemble_trains_each_lr_as_if_alone(optimizer):
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
def test_ensemble_member_that_diverges_is_frozen_and_the_others_go_on(optimizer, huge):
    lrs = [1e-3, huge, 3e-3] if optimizer == "adamw" else [1e-4, huge, 1e-3]
    alone, together, ens = _grid_runs(optimizer, lrs, grad_clip=1.0)
    assert alone[1][0].status == together[1].status == "diverged"
    assert together[1].message == alone[1][0].message  # "loss nan at step k"
    assert together[1].steps == alone[1][0].steps < 9 and not together[1].history
    assert together[1].losses == pytest.approx(alone[1][0].losses, rel=1e-4)
    for i in (0, 2):
        _assert_same_run(alone[i][0], together[i], alone[i][1], ens.members[i])


def test_ensemble_refuses_layers_without_a_grouped_version():
    from rtteval.training.grid import LrGrid, grid_unsupported

    _, _, _, model = toy_tokenizer_and_model()
    assert grid_unsupported(model) is None
    odd = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    assert "LayerNorm" in (grid_unsupported(odd) or "")
    with pytest.raises(ConfigError):
        LrGrid(odd, [1e-3, 1e-2])
