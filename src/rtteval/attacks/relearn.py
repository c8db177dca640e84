"""The fine-tuning loop every relearning attack shares: fold x lr grid, V measured every epoch.

An attack decides *what* is trained on (its :class:`~rtteval.attacks.folds.Fold`
items: T's facts for RTT, retain text for retain-only relearning); this
module decides *how*: for each fold and learning rate, the model's initial
weights are restored from an in-memory snapshot, it is fine-tuned with
:func:`rtteval.training.loop.train`, and V (the fold's held-out slice, and per
``retain_eval`` the retain questions) is evaluated after every epoch, and
with ``eval_every_steps`` V also every k optimizer steps (the budget curve,
:class:`~rtteval.attacks.records.StepEval`).  The caller gets its model back
unchanged, and the records of :mod:`rtteval.attacks.records`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from typing import Any, Protocol

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from rtteval.attacks.folds import Fold, TrainItem, question_id
from rtteval.attacks.records import EpochEval, FoldAttack, ModelAttack, RunResult, StepEval
from rtteval.data.types import MCQ, Dataset
from rtteval.errors import ConfigError
from rtteval.models import restore_state, snapshot_state
from rtteval.scoring import ScoringConfig, check_context, continuation_ids, evaluate_mcq
from rtteval.training.batching import count_tokens, encode_texts, make_batches
from rtteval.training.config import TrainConfig
from rtteval.training.grid import LrGrid, grid_unsupported
from rtteval.training.loop import TrainResult, train
from rtteval.training.losses import lm_loss_fn
from rtteval.training.precision import cast_for_precision, cast_parameters


class RelearnSettings(Protocol):
    """The grid and training settings :func:`relearn` reads from an attack's config."""

    lrs: list[float]
    epochs: int
    batch_size: int
    optimizer: str
    weight_decay: float
    grad_clip: float | None
    warmup_steps: int
    retain_eval: str
    seed: int
    precision: str
    replicates: int
    eval_every_steps: int | None


def scoring_to_dict(scoring: ScoringConfig) -> dict[str, Any]:
    d = {k: v for k, v in asdict(scoring).items() if k != "dev"}
    d["n_dev"] = len(scoring.dev)
    return d


def encode_items(
    tokenizer: PreTrainedTokenizerBase, items: Sequence[TrainItem]
) -> tuple[list[list[int]], list[list[int]] | None]:
    """Token ids (BOS ... EOS); loss masks only when some item has a no-loss prompt."""
    sources = [it.source for it in items]
    if not any(it.prompt is not None for it in items):
        return encode_texts(tokenizer, [it.text for it in items], sources=sources), None
    seqs, masks = [], []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for it in items:
        if it.prompt is None:
            ids = encode_texts(tokenizer, [it.text])[0]
            seqs.append(ids)
            masks.append([1] * len(ids))
            continue
        if not it.text.startswith(it.prompt):
            raise ValueError(f"prompt is not a prefix of its text: {it.text[:60]!r}")
        ctx, cont = continuation_ids(tokenizer, it.prompt, it.text[len(it.prompt) :])
        ids = ctx + cont + eos
        seqs.append(ids)
        masks.append([0] * len(ctx) + [1] * (len(cont) + len(eos)))
    check_context(tokenizer, [len(x) for x in seqs], sources, what="a training text")
    return seqs, masks


class _Evaluator:
    """Per-question correctness for named question groups.

    Groups requested together are scored in one batched pass (fewer, fuller
    batches), except under calibrated scoring, which subtracts a per-set mean
    and so must see each set alone.  Scoring itself is
    :func:`rtteval.scoring.evaluate_mcq` (with its one-pass-per-question path
    for single-token choices, which matters because RTT evaluates after every
    epoch of every run).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        scoring: ScoringConfig,
        groups: dict[str, Sequence[MCQ]],
    ):
        self.tokenizer = tokenizer
        self.scoring = scoring
        self.groups = {k: list(v) for k, v in groups.items()}

    def __call__(self, model: torch.nn.Module, names: Sequence[str]) -> dict[str, list[bool]]:
        names = [n for n in names if self.groups.get(n)]
        if not names:
            return {}
        if self.scoring.mode == "calibrated":
            return {
                n: evaluate_mcq(model, self.tokenizer, self.groups[n], self.scoring).correct
                for n in names
            }
        allq = [q for n in names for q in self.groups[n]]
        correct = evaluate_mcq(model, self.tokenizer, allq, self.scoring).correct
        out, i = {}, 0
        for n in names:
            k = len(self.groups[n])
            out[n] = correct[i : i + k]
            i += k
        return out


def _acc(xs: Sequence[bool] | None) -> float | None:
    return (sum(xs) / len(xs)) if xs else None


def _grid_for(
    model: torch.nn.Module, lrs: Sequence[float], batched: bool | None, name: str = "RTT"
) -> LrGrid | None:
    """The lr grid as one batched model, or None to train the lrs one by one.

    Automatic (``batched=None``): batched when there are several lrs, every
    layer of the model has a grouped version and, on a GPU, the G copies with
    gradients and optimizer state fit twice over in free memory.
    """
    if batched is False or (batched is None and len(lrs) < 2):
        return None
    reason = grid_unsupported(model)
    device = next(model.parameters()).device
    if reason is None and batched is None and device.type == "cuda":
        need = 5 * len(lrs) * sum(p.numel() * p.element_size() for p in model.parameters())
        if torch.cuda.mem_get_info(device)[0] < 2 * need:
            reason = f"{len(lrs)} copies need ~{need / 2**30:.1f} GiB"
    if reason is not None:
        if batched:
            raise ConfigError(f"batched {name} impossible: {reason}")
        return None
    return LrGrid(model, lrs)


def _run_result(
    lr: float,
    res: TrainResult,
    steps_per_epoch: int,
    rep: int = 0,
    tokens_at: Callable[[int], int] | None = None,
) -> RunResult:
    """One run's curve: an :class:`EpochEval` per evaluated epoch, with its mean training loss.

    Evaluations at an epoch's last step are that epoch's; with
    ``tokens_at`` (``eval_every_steps`` on) every evaluation is also a
    :class:`StepEval` of the budget curve.
    """
    by_step: dict[int, dict[str, Any]] = {}
    for row in res.history:  # an epoch's end may be evaluated twice: the same model, one row
        by_step[int(row["step"])] = row
    epochs, curve = [], []
    for step, row in sorted(by_step.items()):
        if tokens_at is not None:
            curve.append(StepEval(step, tokens_at(step), float(row["v_acc"]), list(row["_v"])))
        if step == 0 or step % steps_per_epoch:
            continue
        ep = step // steps_per_epoch
        ls = res.losses[(ep - 1) * steps_per_epoch : ep * steps_per_epoch]
        epochs.append(
            EpochEval(
                ep,
                float(row["v_acc"]),
                list(row["_v"]),
                row["holdout_acc"],
                None if row["_h"] is None else list(row["_h"]),
                row["retain_acc"],
                float(np.mean(ls)) if ls else None,
            )
        )
    return RunResult(lr, res.status, epochs, res.steps, res.wall_time, res.message, rep, curve)


def _token_counter(batches: Callable[[int], Sequence[Any]], spe: int) -> Callable[[int], int]:
    """Tokens trained on after ``step`` steps (the epochs' batches, as :func:`train` counts them)."""
    per_epoch: dict[int, list[int]] = {}

    def tokens_at(step: int) -> int:
        total, ep = 0, 0
        while step > 0:
            if ep not in per_epoch:
                per_epoch[ep] = [count_tokens(b) for b in batches(ep)]
            take = per_epoch[ep][: min(step, spe)]
            if not take:
                break
            total += sum(take)
            step -= len(take)
            ep += 1
        return total

    return tokens_at


def relearn(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    folds: Sequence[Fold],
    cfg: RelearnSettings,
    scoring: ScoringConfig,
    *,
    config: dict[str, Any],
    retain_questions: Sequence[MCQ] | None = None,
    label: str = "model",
    name: str = "RTT",
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    batched: bool | None = None,
    trainable: Callable[[str], bool] | None = None,
    make_ensemble: Callable[[torch.nn.Module, Sequence[float]], LrGrid | None] | None = None,
    after_run: Callable[[Fold, float, int, torch.nn.Module, int | None], None] | None = None,
) -> ModelAttack:
    """Fine-tune ``model`` on each fold's items for every lr in ``cfg.lrs``; the model is returned unchanged.

    For each fold: V (and the fold's held-out slice) is evaluated before any
    training; then, for each learning rate, the initial weights are restored
    from an in-memory snapshot and the model is fine-tuned on the fold's
    items for ``cfg.epochs`` epochs, evaluating V, the held-out slice and (per
    ``cfg.retain_eval``) the retain questions after every epoch.  Epoch
    batches are seeded by (seed, fold, epoch) and shared by all learning
    rates, so the grid differs only in lr.  ``cfg.replicates`` > 1 repeats
    every (fold, lr) run with another data order.  Provenance is the
    caller's to check, immediately before calling this.

    ``batched`` trains a fold's learning rates together as one
    :class:`rtteval.training.grid.LrGrid` (same numbers, up to float rounding; the
    runs then share one ``wall_time``): ``None`` decides automatically (see
    :func:`_grid_for`), ``False`` runs them one by one, ``True`` insists.
    ``config`` is stored as the record's config; ``name`` labels progress.
    ``trainable(name)`` picks the parameters to update (LoRA-RTT: the
    adapters only); the learning rates then run one by one unless
    ``make_ensemble(model, lrs)`` builds the batched model for them
    (LoRA-RTT's stacked adapters; its ``close()`` runs at the end; None: one by one).
    ``after_run(fold, lr, replicate, trained, g)`` sees every run's trained
    model once its last epoch is evaluated (LoRA-RTT saves the adapters):
    ``trained`` is the model itself, or the ensemble with ``g`` its member.
    """
    retain_q = list(retain_questions or [])
    say = log or (lambda _msg: None)
    t0 = time.perf_counter()
    was_training = model.training
    snapshot = snapshot_state(model)
    dtypes = [p.dtype for p in model.parameters()]
    precision = cast_for_precision(model, cfg.precision)  # undone below: model comes back as given
    ensemble = _pick_ensemble(model, cfg.lrs, batched, name, trainable, make_ensemble)
    run = _FoldRunner(
        model, tokenizer, dataset, cfg, scoring, retain_q, snapshot, ensemble,
        label=label, name=name, progress=progress, say=say, trainable=trainable,
        after_run=after_run,
    )  # fmt: skip
    fold_results: list[FoldAttack] = []
    try:
        model.eval()
        retain_before = None
        retain_ev = _Evaluator(tokenizer, scoring, {"r": retain_q})
        if retain_q and cfg.retain_eval != "none":
            retain_before = _acc(retain_ev(model, ["r"])["r"])
        for fi, fold in enumerate(folds):
            fold_results.append(run.fold(fi, fold, retain_before))
    finally:
        if ensemble is not None and hasattr(ensemble, "close"):
            ensemble.close()
        cast_parameters(model, dtypes)
        restore_state(model, snapshot)
        model.train(was_training)
    return ModelAttack(
        label=label,
        dataset=dataset.name,
        config=config,
        scoring=scoring_to_dict(scoring),
        folds=fold_results,
        retain_before=retain_before,
        wall_time=time.perf_counter() - t0,
        meta={
            "n_retain": len(retain_q),
            "device": str(next(model.parameters()).device),
            "precision": precision,
            "precision_warnings": sorted(run.warned),
        },
    )


def _pick_ensemble(
    model: torch.nn.Module,
    lrs: Sequence[float],
    batched: bool | None,
    name: str,
    trainable: Callable[[str], bool] | None,
    make_ensemble: Callable[[torch.nn.Module, Sequence[float]], LrGrid | None] | None,
) -> Any:
    """The batched model that trains every lr at once, or None to train them one by one.

    An attack that trains a subset of the parameters batches only through
    its own ``make_ensemble`` (LoRA-RTT's stacked adapters).
    """
    if make_ensemble is not None:
        wanted = batched or (batched is None and len(lrs) > 1)
        return make_ensemble(model, lrs) if wanted else None
    if trainable is not None and batched:
        raise ConfigError(f"batched {name} impossible: it trains a subset of the parameters")
    return None if trainable is not None else _grid_for(model, lrs, batched, name)


class _EvalClock:
    """Counts optimizer steps through the loss, so an evaluation knows where in an epoch it is.

    An evaluation at an epoch's end is the full one (V, held-out, retain), one
    in between V only; the loop may ask twice at an epoch's end, so answers
    are memoised per (model, step).
    """

    def __init__(self, ev: _Evaluator, cfg: RelearnSettings) -> None:
        self.ev = ev
        self.cfg = cfg
        self.start(1)

    def start(self, spe: int) -> None:
        """A new run whose epochs are ``spe`` optimizer steps long."""
        self.step, self.spe, self.memo = 0, spe, {}

    def loss(self, m: torch.nn.Module, batch: Any) -> torch.Tensor:
        self.step += 1
        return lm_loss_fn(m, batch)

    def evaluate(self, m: torch.nn.Module) -> dict[str, Any]:
        step, spe, cfg = self.step, self.spe, self.cfg
        if (id(m), step) in self.memo:
            return self.memo[id(m), step]
        if step % spe:
            names = ["v"]
        else:
            at_end = step == cfg.epochs * spe
            with_retain = cfg.retain_eval == "epoch" or (cfg.retain_eval == "end" and at_end)
            names = ["v", "h", "r"] if with_retain else ["v", "h"]
        res = self.ev(m, names)
        row = {
            "v_acc": _acc(res["v"]),
            "holdout_acc": _acc(res.get("h")),
            "retain_acc": _acc(res.get("r")),
            "_v": res["v"],
            "_h": res.get("h"),
        }
        self.memo[id(m), step] = row
        return row


class _FoldRunner:
    """The per-fold part of :func:`relearn`: measure V before, then train every (replicate, lr).

    Holds what all folds share (model, snapshot, batched grid, settings) so
    each step below takes only what varies per fold.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        dataset: Dataset,
        cfg: RelearnSettings,
        scoring: ScoringConfig,
        retain_q: list[MCQ],
        snapshot: Any,
        ensemble: Any,
        *,
        label: str,
        name: str,
        progress: bool,
        say: Callable[[str], None],
        trainable: Callable[[str], bool] | None,
        after_run: Callable[[Fold, float, int, torch.nn.Module, int | None], None] | None,
    ) -> None:
        self.model, self.tokenizer, self.dataset, self.cfg = model, tokenizer, dataset, cfg
        self.scoring, self.retain_q = scoring, retain_q
        self.snapshot, self.ensemble = snapshot, ensemble
        self.label, self.name, self.progress, self.say = label, name, progress, say
        self.trainable, self.after_run = trainable, after_run
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.warned: set[str] = set()

    def fold(self, fi: int, fold: Fold, retain_before: float | None) -> FoldAttack:
        """One fold's record: V before any training, then every run's curve."""
        model, cfg = self.model, self.cfg
        v_qs = self.dataset.splits[fold.v]
        seqs, masks = encode_items(self.tokenizer, fold.items)
        restore_state(model, self.snapshot)  # "before" is the model as given, not after a run
        ev = _Evaluator(
            self.tokenizer, self.scoring, {"v": v_qs, "h": fold.holdout, "r": self.retain_q}
        )
        groups0 = ev(model, ["v", "h"])
        before = EpochEval(
            0,
            _acc(groups0["v"]) or 0.0,
            groups0["v"],
            _acc(groups0.get("h")),
            groups0.get("h"),
            retain_before,
        )
        clock = _EvalClock(ev, cfg)
        batch_cache: dict[tuple[int, int], list] = {}
        runs = []
        # Replicates run one after another: the batched lr grid shares one batch order
        # across its members, so a replicate (a new order) cannot be a member.
        for rep in range(cfg.replicates):
            batches = self.epoch_batches(fi, rep, seqs, masks, batch_cache)
            runs.extend(self.replicate(fold, rep, batches, clock, before))
        return FoldAttack(
            v=fold.v,
            t=list(fold.t),
            question_ids=[question_id(q) for q in v_qs],
            n_choices=[len(q.choices) for q in v_qs],
            before=before,
            runs=runs,
            provenance=fold.provenance(),
        )

    def epoch_batches(
        self, fi: int, rep: int, seqs: Any, masks: Any, cache: dict[tuple[int, int], list]
    ) -> Callable[[int], list]:
        """Epoch batches of one replicate (replicate 0: the order without replicates).

        Seeded by (seed, fold, epoch, replicate) and cached, so every lr of
        the grid sees the same batches and differs only in lr.
        """
        cfg = self.cfg

        def batches(epoch: int) -> list:
            if (rep, epoch) not in cache:
                cache[rep, epoch] = make_batches(
                    seqs,
                    cfg.batch_size,
                    self.pad_id,
                    seed=cfg.seed * 1_000_003 + fi * 1009 + epoch + rep * 7_919_993,
                    loss_masks=masks,
                )
            return cache[rep, epoch]

        return batches

    def replicate(
        self,
        fold: Fold,
        rep: int,
        batches: Callable[[int], list],
        clock: _EvalClock,
        before: EpochEval,
    ) -> list[RunResult]:
        """Every lr of one replicate: together as the batched grid, or one by one from the snapshot."""
        model, cfg, name, progress = self.model, self.cfg, self.name, self.progress
        every = getattr(cfg, "eval_every_steps", None)
        tcfg = TrainConfig(
            lr=cfg.lrs[0],
            epochs=cfg.epochs,
            optimizer=cfg.optimizer,
            weight_decay=cfg.weight_decay,
            warmup_steps=cfg.warmup_steps,
            schedule="constant",
            grad_clip=cfg.grad_clip,
            seed=cfg.seed,
            eval_every_epochs=1,
            eval_every_steps=every,
            precision=cfg.precision,
        )
        what = f"{name} {self.label} V={fold.v}" + (f" r{rep}" if cfg.replicates > 1 else "")
        rcfg = replace(tcfg, seed=cfg.seed + rep * 7_919_993)
        spe = max(1, len(batches(0)))
        tokens_at = _token_counter(batches, spe) if every else None
        clock.start(spe)
        ensemble = self.ensemble
        if ensemble is not None:  # every lr at once; the model stays at the snapshot
            ensemble.reset_(model)
            bar = f"{what} lrs={','.join(f'{lr:g}' for lr in cfg.lrs)}"
            results = train(
                ensemble,
                batches,
                clock.loss,
                rcfg,
                evaluate=clock.evaluate,
                progress=bar if progress else None,
            )
            for g, lr in enumerate(cfg.lrs):
                if self.after_run is not None:
                    self.after_run(fold, lr, rep, ensemble, g)
        else:
            results = []
            for lr in cfg.lrs:
                restore_state(model, self.snapshot)
                clock.start(spe)
                results.append(
                    train(
                        model,
                        batches,
                        clock.loss,
                        replace(rcfg, lr=lr),
                        evaluate=clock.evaluate,
                        trainable=self.trainable,
                        progress=f"{what} lr={lr:g}" if progress else None,
                    )
                )
                if self.after_run is not None:
                    self.after_run(fold, lr, rep, model, None)
        runs = []
        for lr, res in zip(cfg.lrs, results, strict=True):
            self.warned.update(res.warnings)
            runs.append(_run_result(lr, res, spe, rep, tokens_at))
            curve = " ".join(f"{e.v_acc:.2f}" for e in runs[-1].epochs)
            self.say(f"{what} lr={lr:g}: V acc {before.v_acc:.2f} -> {curve}")
        return runs
