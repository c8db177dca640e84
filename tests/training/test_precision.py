"""Training precision: bf16 keeps every update, bf16-pure visibly does not (docs/performance.md)."""

from __future__ import annotations

import copy
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rtteval.data import load_dataset
from rtteval.errors import ConfigError
from rtteval.models import load_model
from rtteval.models.loading import is_checkpointing
from rtteval.training.batching import encode_texts, make_batches
from rtteval.training.config import TrainConfig
from rtteval.training.grid import LrGrid
from rtteval.training.loop import train
from rtteval.training.losses import lm_loss_fn
from rtteval.training.optim import KahanAdamW, Lion, carried_weights
from rtteval.training.precision import (
    LostUpdateWarning,
    lost_update_warnings,
    resolve_precision,
    rounding_step,
)

PAPER_LRS = [1e-7, 8e-7, 3.2e-6]


@pytest.fixture(scope="module")
def micro(pretrained_tiny: dict[str, Path]):
    """The pretrained micro model, its weights rounded to bf16 (the common start), and 12 batches."""
    model, tok = load_model(pretrained_tiny["original"], device="cpu")
    for p in model.parameters():
        p.data = p.data.bfloat16().float()
    ds = load_dataset(pretrained_tiny["world"])
    texts = [p.text for n in ds.splits for p in ds.corpus.get(n, [])]
    batches = make_batches(encode_texts(tok, texts), 4, tok.pad_token_id, seed=0)[:12]
    return model, batches


def _change(micro, precision: str, lr: float, **kw) -> tuple[torch.Tensor, list[str]]:
    """The accumulated weight change of 12 Lion steps (of the fp32 weights the run carries)."""
    start, batches = micro
    model = copy.deepcopy(start)
    w0 = torch.cat([p.detach().reshape(-1) for p in start.parameters()])
    got: dict[str, list[torch.Tensor]] = {}
    cfg = TrainConfig(
        lr=lr, optimizer="lion", grad_clip=None, eval_every_epochs=None, precision=precision, **kw
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LostUpdateWarning)
        res = train(
            model, lambda e: batches, lm_loss_fn, cfg,
            on_finish=lambda opt: got.setdefault("w", carried_weights(opt)),
        )  # fmt: skip
    assert res.steps == 12 and res.precision == resolve_precision(precision, "cpu")
    return torch.cat([w.reshape(-1) for w in got["w"]]) - w0, res.warnings


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _changed(d: torch.Tensor) -> float:
    return float((d != 0).float().mean())


@pytest.mark.parametrize("lr", PAPER_LRS)
def test_bf16_keeps_every_lion_update_and_bf16_pure_loses_them(micro, lr):
    fp32, w32 = _change(micro, "fp32", lr)
    bf16, w16 = _change(micro, "bf16", lr)
    pure, wpure = _change(micro, "bf16-pure", lr)
    # fp32 weights with bf16 compute: how far bf16 rounding in the forward/backward pass alone
    # moves Lion's sign decisions (docs/performance.md: ~7% on this model)
    compute, _ = _change(micro, "fp32", lr, autocast="bf16")
    assert _changed(fp32) > 0.5
    assert _changed(bf16) >= 0.9 * _changed(fp32)
    assert _rel(bf16, fp32) <= 1.25 * _rel(compute, fp32) + 0.01
    assert not w32 and not w16
    # bf16 rounding drops nearly every update of the plain bf16 weights, and says so
    assert _changed(pure) < 0.1 * _changed(fp32)
    assert _rel(pure, fp32) > 0.9
    assert wpure and "below half the rounding step" in wpure[0]


@pytest.mark.parametrize("optimizer", ["lion", "adamw"])
def test_compensated_update_matches_fp32_on_the_same_gradients(optimizer):
    """With the gradients fixed, the bf16 weights' carried change is fp32's (12 and 3000 steps).

    3000 same-sign steps at lr 1e-7 on weights of magnitude 0.02 is where a bf16
    Kahan residual (torch-optimi) stops absorbing the lr and loses most of the change.
    """
    gen = torch.Generator().manual_seed(0)
    w0 = (torch.randn(4096, generator=gen) * 0.02).bfloat16()
    w0[:64] = 1.0  # RMSNorm-like weights: the rounding step is 2^-7
    grads = torch.randn(12, 4096, generator=gen).bfloat16().float()  # the same in both dtypes
    for steps, lr in ((12, 3.2e-6), (12, 1e-7), (3000, 1e-7)):
        ref = torch.nn.Parameter(w0.float())
        low = torch.nn.Parameter(w0.clone())
        opt_ref = Lion([ref], lr=lr) if optimizer == "lion" else torch.optim.AdamW([ref], lr=lr)
        opt_low = (
            Lion([low], lr=lr, compensate=True) if optimizer == "lion" else KahanAdamW([low], lr=lr)
        )
        for s in range(steps):
            g = grads[s % 12] if steps == 12 else grads[0]
            ref.grad, low.grad = g.clone(), g.bfloat16()
            opt_ref.step()
            opt_low.step()
        d_ref = ref.detach() - w0.float()
        d_low = carried_weights(opt_low)[0] - w0.float()
        assert _rel(d_low, d_ref) < 0.02, (steps, lr)
    # and the long run's change has reached the bf16 weights themselves, not just the residual
    assert float((low.detach() != w0).float().mean()) > 0.9


def test_lost_update_warning_threshold():
    w = [torch.full((100,), 0.02)]
    half = rounding_step(0.02, torch.bfloat16) / 2
    assert half == pytest.approx(2.0**-6 * 2.0**-7 / 2)
    assert lost_update_warnings(w, [0.9 * half, 1.1 * half], "bf16-pure") == [
        lost_update_warnings(w, [0.9 * half], "bf16-pure")[0]
    ]
    assert lost_update_warnings(w, [1e-12], "bf16") == []  # compensated: nothing is lost
    assert lost_update_warnings(w, [1e-12], "fp32")  # fp32 has a rounding step too


def test_precision_names_and_ensemble_dtype(micro):
    with pytest.raises(ConfigError, match="unknown precision 'bf32'"):
        resolve_precision("bf32", "cpu")
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda") == "bf16"
    model, batches = micro
    ens = LrGrid(copy.deepcopy(model), [1e-4, 1e-3])  # fp32 weights
    with pytest.raises(ConfigError, match="cast_for_precision"):
        train(ens, lambda e: batches, lm_loss_fn, TrainConfig(precision="bf16"))


def _flat(model: torch.nn.Module) -> torch.Tensor:
    """``model``'s weights as fp32 in an LrGrid's flat layout (some matrices transposed)."""
    return LrGrid(copy.deepcopy(model).float(), [1.0])._flat[0].clone()


def test_ensemble_in_bf16_trains_each_lr_as_if_alone(micro):
    model, batches = micro
    lrs = [1e-7, 3.2e-6]
    cfg = TrainConfig(optimizer="lion", precision="bf16", grad_clip=None, eval_every_epochs=None)
    low = copy.deepcopy(model).bfloat16()
    start = _flat(low)
    carried: dict[str, list[torch.Tensor]] = {}
    together = train(LrGrid(low, lrs), lambda e: batches, lm_loss_fn, cfg,
                     on_finish=lambda o: carried.setdefault("w", carried_weights(o)))  # fmt: skip
    for g, lr in enumerate(lrs):
        alone = copy.deepcopy(low)
        got: dict[str, list[torch.Tensor]] = {}
        res = train(alone, lambda e: batches, lm_loss_fn, TrainConfig(**{**cfg.to_dict(), "lr": lr}),
                    on_finish=lambda o, _g=got: _g.setdefault("w", carried_weights(o)))  # fmt: skip
        assert together[g].precision == "bf16"
        assert together[g].losses == pytest.approx(res.losses, rel=2e-2)
        exact = copy.deepcopy(alone).float()
        for p, w in zip(exact.parameters(), got["w"], strict=True):
            p.data = w.view_as(p)
        d_alone = _flat(exact) - start
        d_ens = carried["w"][g] - start
        assert _changed(d_ens) >= 0.9 * _changed(d_alone) > 0.5
        assert _rel(d_ens, d_alone) < 0.05


# --------------------------------------------------------------------------- RTT

#: Lion at 5e-5 moves a weight by less than half the bf16 rounding step above |w| 0.0156,
#: and the micro model's median |w| is ~0.035: bf16-pure loses most of these updates.
RTT_LR = 5e-5


@pytest.fixture(scope="module")
def unlearned(pretrained_tiny: dict[str, Path]):
    """The micro model after 20 steps of GD on every weight: forget accuracy ~0.45, recoverable."""
    from rtteval.stages.unlearn import UnlearnConfig, unlearn

    model, tok = load_model(pretrained_tiny["original"], device="cpu")
    ds = load_dataset(pretrained_tiny["world"])
    cfg = UnlearnConfig(method="gd", lr=3e-3, max_steps=20, eval_every_steps=20, train_only=[])
    unlearn(model, tok, ds, cfg, progress=False)
    return model, tok, ds


def _rtt_v_acc(unlearned, precision: str, monkeypatch=None, autocast: str = "auto"):
    """V accuracy before and after RTT, pooled over the folds, and the attack's meta."""
    import functools

    from rtteval.attacks import relearn, rtt

    model, tok, ds = unlearned
    if monkeypatch is not None:
        monkeypatch.setattr(
            relearn, "TrainConfig", functools.partial(TrainConfig, autocast=autocast)
        )
    cfg = rtt.RTTConfig(
        lrs=[RTT_LR], epochs=10, batch_size=4, optimizer="lion", holdout_fraction=0,
        retain_eval="none", precision=precision,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LostUpdateWarning)
        a = rtt.attack_model(model, tok, ds, cfg)
    if monkeypatch is not None:
        monkeypatch.undo()

    def pooled(xs):
        return sum(sum(x) for x in xs) / sum(len(x) for x in xs)

    before = pooled([f.before.v_correct for f in a.folds])
    after = pooled([f.runs[0].epochs[-1].v_correct for f in a.folds])
    return before, after, a.meta


def test_rtt_in_bf16_recovers_as_fp32_and_bf16_pure_does_not(unlearned, monkeypatch):
    start = [p.detach().clone() for p in unlearned[0].parameters()]
    b32, fp32, meta32 = _rtt_v_acc(unlearned, "fp32")
    _, rounded, _ = _rtt_v_acc(unlearned, "fp32", monkeypatch, autocast="bf16")
    b16, bf16, meta16 = _rtt_v_acc(unlearned, "bf16")
    _, pure, meta_pure = _rtt_v_acc(unlearned, "bf16-pure")
    n = len(unlearned[2].questions())
    assert all(torch.equal(a, b) for a, b in zip(start, unlearned[0].parameters(), strict=True))
    assert b32 == b16 and fp32 - b32 >= 0.075  # RTT recovers at this lr in fp32
    assert abs(bf16 - fp32) <= 0.08
    # fp32 weights with bf16 compute (the fp32 precision on a GPU) differ from CPU fp32 only in
    # float rounding.  Measured: that spread is 0 here (as are 1 vs 2 threads and a one-ulp
    # nudge of the start), bf16 is one question off (docs/performance.md); a question's
    # correctness is a threshold, so one flip is the finest difference there is.
    assert abs(bf16 - fp32) <= abs(rounded - fp32) + 1 / n + 1e-9
    assert fp32 - pure >= 0.075 and pure - b32 <= 0.05  # bf16-pure rounds the attack away
    assert (meta32["precision"], meta16["precision"]) == ("fp32", "bf16")
    assert not meta16["precision_warnings"]
    assert "lr 5e-05 is below half the rounding step" in meta_pure["precision_warnings"][0]


# --------------------------------------------------------------------------- checkpointing


def test_gradient_checkpointing_gives_the_same_training(micro, pretrained_tiny):
    """Recomputing activations changes memory, not numbers; also for a batched lr grid."""
    start, batches = micro
    cfg = TrainConfig(optimizer="lion", lr=1e-4, max_steps=4, eval_every_epochs=None)
    runs = []
    for ckpt in (False, True):
        model = copy.deepcopy(start)
        res = train(model, lambda e: batches, lm_loss_fn, replace(cfg, gradient_checkpointing=ckpt))
        assert not is_checkpointing(model)  # train() turns off what it turned on
        runs.append((res.losses, [p.detach().clone() for p in model.parameters()]))
    assert runs[1][0] == pytest.approx(runs[0][0], rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*[r[1] for r in runs], strict=True))
    # loaded with checkpointing on (the study's gradient_checkpointing), trained as an LrGrid
    losses = []
    for ckpt in (False, True):
        loaded, _ = load_model(
            pretrained_tiny["original"], device="cpu", gradient_checkpointing=ckpt
        )
        assert is_checkpointing(loaded) == ckpt
        ens = train(LrGrid(loaded, [1e-4, 2e-4]), lambda e: batches, lm_loss_fn, cfg)
        losses.append([x for r in ens for x in r.losses])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


# --------------------------------------------------------------------------- settings


STUDY = """\
name: t
output_dir: out
model: {tiny: {preset: micro}}
datasets: [{name: w, world: {preset: tiny, seed: 0}}]
methods: [{name: gd, grid: {lr: [1.0e-3]}}]
attacks: [{name: rtt, lrs: [1.0e-3], epochs: 1}]
"""


def _plan(tmp_path: Path, extra: str = "", attack: str | None = None):
    from rtteval.config.study import load_config
    from rtteval.runner.plan import build_plan

    path = tmp_path / "study.yaml"
    text = (
        STUDY
        if attack is None
        else STUDY.replace("attacks: [{name: rtt, lrs: [1.0e-3], epochs: 1}]", attack)
    )
    path.write_text(text + extra)
    return build_plan(load_config(path).config)


def test_study_precision_reaches_every_training_job(tmp_path: Path):
    """Declared once; the attack may differ; ``auto`` leaves job keys as they were."""
    auto = _plan(tmp_path)
    assert all("precision" not in p.job.config for p in auto.jobs)
    assert all("gradient_checkpointing" not in p.runtime for p in auto.jobs)
    plan = _plan(tmp_path, "precision: bf16\ngradient_checkpointing: true\n")
    by_stage: dict[str, set] = {}
    for p in plan.jobs:
        by_stage.setdefault(p.job.stage, set()).add(p.job.config.get("precision"))
    assert by_stage == {
        "world": {None}, "pretrain": {"bf16"}, "unlearn": {"bf16"}, "select": {None},
        "attack": {"bf16"},
    }  # fmt: skip
    assert all(p.runtime.get("gradient_checkpointing") for p in plan.jobs)
    # the paper's released RTT ran in fp16: the attack alone can say so
    fp16 = _plan(
        tmp_path,
        "precision: bf16\n",
        attack="attacks: [{name: rtt, lrs: [1.0e-3], epochs: 1, precision: fp16}]",
    )
    stages = {(p.job.stage, p.job.config.get("precision")) for p in fp16.jobs}
    assert ("attack", "fp16") in stages and ("unlearn", "bf16") in stages
    assert ("attack", "bf16") not in stages


def test_unknown_precision_is_one_line_exit_2(tmp_path: Path, cli, pretrained_tiny):
    path = tmp_path / "study.yaml"
    path.write_text(STUDY + "precision: bf32\n")
    r = cli("run", str(path), "--dry-run")
    assert r.returncode == 2 and "study.yaml:7: field 'precision'" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    w = pretrained_tiny
    r = cli("attack", "--model", w["original"], "--original", w["original"], "--data", w["world"],
            "--out", tmp_path / "a", "--precision", "half")  # fmt: skip
    assert r.returncode == 2 and "unknown precision 'half'" in r.stderr, r.stderr
    assert not (tmp_path / "a" / "results.json").exists()
