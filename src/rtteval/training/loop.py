"""The one training loop.

Pretraining, every unlearning method and the RTT attack all call
:func:`train`.  What differs between them is data and loss, so those are
arguments: ``batches(epoch)`` returns the epoch's batches (any nesting of
dicts of tensors) and ``loss_fn(model, batch)`` returns a scalar loss plus
numbers to log.  Everything else — optimizer, schedule, clipping, autocast,
evaluation, early stopping, divergence handling, progress — lives here once.
The batched learning-rate grid (:class:`~rtteval.training.grid.LrGrid`) runs
through the same loop: it brings its own parameter groups and update step.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import torch

from rtteval.errors import ConfigError
from rtteval.training.batching import Batch, count_tokens, make_batches, to_device
from rtteval.training.config import TrainConfig
from rtteval.training.grid import LrGrid
from rtteval.training.losses import LossFn, lm_loss_fn
from rtteval.training.optim import lr_factor, make_optimizer
from rtteval.training.precision import (
    PRECISIONS,
    LostUpdateWarning,
    autocast_for,
    cast_for_precision,
    cast_parameters,
    lost_update_warnings,
    resolve_precision,
)

#: benchmarks/gpu_rtt.py imports these from here; they go once it names their modules.
_BENCHMARK_IMPORTS = (make_batches, lm_loss_fn, cast_parameters)

#: ``diverged(loss)``: why this loss ends the run as diverged, or None to go on.
DivergenceHook = Callable[[float], "str | None"]


@dataclass
class TrainResult:
    """What happened: ``status`` is ``completed``, ``stopped_early`` or ``diverged``."""

    status: str
    steps: int
    epochs_run: int
    history: list[dict[str, Any]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    wall_time: float = 0.0
    tokens: int = 0
    message: str = ""
    #: The resolved precision (``fp32``, ``bf16``, ...) and its lost-update warnings.
    precision: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.wall_time if self.wall_time > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "steps": self.steps,
            "epochs_run": self.epochs_run,
            "history": self.history,
            "final_loss": self.losses[-1] if self.losses else None,
            "wall_time": self.wall_time,
            "tokens": self.tokens,
            "tokens_per_second": self.tokens_per_second,
            "message": self.message,
            "precision": self.precision,
            "warnings": self.warnings,
        }


def _gradient_checkpointing(model: torch.nn.Module, cfg: TrainConfig) -> bool:
    """Turn on Hugging Face gradient checkpointing if ``cfg`` asks and it is off; True if it did."""
    from rtteval.models.loading import is_checkpointing, set_checkpointing

    if not cfg.gradient_checkpointing or is_checkpointing(model):
        return False
    set_checkpointing(model, True)
    return True


def _trainable_params(
    model: torch.nn.Module, trainable: Callable[[str], bool] | None
) -> list[torch.Tensor]:
    """The parameters ``trainable`` selects (all by default); the others stop requiring grad."""
    params = []
    for n, p in model.named_parameters():
        keep = trainable(n) if trainable is not None else True
        p.requires_grad_(keep)
        if keep:
            params.append(p)
    if not params:
        raise ConfigError("no trainable parameters selected")
    return params


def _prepare(
    model: torch.nn.Module,
    cfg: TrainConfig,
    trainable: Callable[[str], bool] | None,
    device: torch.device,
) -> tuple[str, list[list[torch.Tensor]], list[float], list[torch.nn.Module]]:
    """The resolved precision; per member: its parameter group, lr and model to evaluate.

    A plain model is one member at ``cfg.lr``, cast to the precision's dtype first.
    """
    if isinstance(model, LrGrid):
        if trainable is not None:
            raise ConfigError("an LrGrid trains all parameters; trainable is not supported")
        precision = resolve_precision(cfg.precision, device)
        return precision, model.param_groups(precision), model.lrs, list(model.members)
    precision = cast_for_precision(model, cfg.precision)
    return precision, [_trainable_params(model, trainable)], [cfg.lr], [model]


def _total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """``max_steps``, capped by ``epochs`` passes when both are set; else ``epochs`` passes."""
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None and cfg.epochs:
        return min(total, cfg.epochs * steps_per_epoch)
    return total


def _update(
    opt: torch.optim.Optimizer,
    loss: torch.Tensor,
    params: list[torch.Tensor],
    grad_clip: float | None,
) -> None:
    """One optimizer step of a single model: backward, clip, step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()


class _Progress:
    """A rich progress bar on stderr (stdout is for results), or nothing when ``title`` is None."""

    def __init__(self, title: str | None, total: int):
        self.bar = None
        if not title:
            return
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            transient=True,
            console=Console(stderr=True),
        )
        self.bar.start()
        self.task = self.bar.add_task(title, total=total, info="")

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1)

    def show(self, row: dict[str, Any]) -> None:
        """The first three float entries of an evaluation row."""
        if self.bar is not None:
            shown = {k: v for k, v in row.items() if isinstance(v, float)}
            info = " ".join(f"{k}={v:.3f}" for k, v in list(shown.items())[:3])
            self.bar.update(self.task, info=info)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class _Members:
    """The runs trained side by side (one for a plain model): results, and which still train."""

    def __init__(self, models: Sequence[torch.nn.Module], results: list[TrainResult]):
        self.models = list(models)
        self.results = results
        self.live = list(range(len(results)))

    def evaluate(
        self,
        epoch: float,
        evaluate: Callable[[torch.nn.Module], dict[str, Any]] | None,
        stop: Callable[[dict[str, Any]], bool] | None,
        on_eval: Callable[[dict[str, Any]], None] | None,
        train_mode: Callable[[], Any],
        bar: _Progress,
    ) -> None:
        """Evaluate every live member; those ``stop`` says are done leave ``live``."""
        if evaluate is None:
            return
        for i in list(self.live):
            row = {"step": self.results[i].steps, "epoch": epoch, **evaluate(self.models[i])}
            train_mode()
            self.results[i].history.append(row)
            if on_eval is not None:
                on_eval(row)
            bar.show(row)
            if stop is not None and stop(row):
                self.results[i].status = "stopped_early"
                self.live.remove(i)

    def check(self, values: list[float], cfg: TrainConfig, diverged: DivergenceHook | None) -> None:
        """Members whose loss is non-finite, above ``max_loss`` or refused by ``diverged`` leave."""
        for i in list(self.live):
            value, why = values[i], None
            if not math.isfinite(value) or (cfg.max_loss is not None and value > cfg.max_loss):
                why = f"loss {value} at step {self.results[i].steps}"
            elif diverged is not None:
                why = diverged(value)
            if why is not None:
                self.results[i].status = "diverged"
                self.results[i].message = why
                self.live.remove(i)

    def record(self, values: list[float], tokens: int) -> None:
        """A step done: each live member's step count, loss and tokens."""
        for i in self.live:
            self.results[i].steps += 1
            self.results[i].losses.append(values[i])
            self.results[i].tokens += tokens


@overload
def train(
    model: LrGrid,
    batches: Callable[[int], Sequence[Batch]],
    loss_fn: LossFn,
    cfg: TrainConfig,
    **kwargs: Any,
) -> list[TrainResult]: ...


@overload
def train(
    model: torch.nn.Module,
    batches: Callable[[int], Sequence[Batch]],
    loss_fn: LossFn,
    cfg: TrainConfig,
    **kwargs: Any,
) -> TrainResult: ...


def train(
    model: torch.nn.Module,
    batches: Callable[[int], Sequence[Batch]],
    loss_fn: LossFn,
    cfg: TrainConfig,
    *,
    evaluate: Callable[[torch.nn.Module], dict[str, Any]] | None = None,
    stop: Callable[[dict[str, Any]], bool] | None = None,
    trainable: Callable[[str], bool] | None = None,
    progress: str | None = None,
    on_eval: Callable[[dict[str, Any]], None] | None = None,
    on_finish: Callable[[torch.optim.Optimizer], None] | None = None,
    diverged: DivergenceHook | None = None,
) -> TrainResult | list[TrainResult]:
    """Train ``model`` in place.

    ``evaluate(model)`` runs every ``eval_every_steps`` steps and/or at the
    end of every ``eval_every_epochs`` epochs; its dict (plus step/epoch) is
    appended to the history and passed to ``stop``, which ends training
    early when it returns True.  A non-finite loss, one above ``max_loss``,
    or one for which the hook ``diverged(loss)`` returns a reason, ends the
    run with status ``diverged`` (the reason is the result's message)
    instead of raising, so one bad grid point never crashes a sweep.
    ``trainable(name)`` picks the parameters to update (RMU trains a few
    layers only).

    An :class:`LrGrid` trains its members side by side, member g at
    ``model.lrs[g]`` times the schedule (``cfg.lr`` is unused): ``loss_fn``
    returns one loss per member, and everything above — clipping by the
    member's own gradient norm, divergence, ``evaluate`` (called with
    ``model.members[g]``), ``stop`` — is per member.  A diverged or stopped
    member is frozen while the others go on.  One :class:`TrainResult` per
    member comes back; their ``wall_time`` is the shared run's.

    ``cfg.precision`` casts a plain model's parameters to its dtype first (an
    LrGrid must be built from a cast model).  An lr too small for that
    dtype (:func:`lost_update_warnings`) warns and is recorded in the result.
    ``on_finish(optimizer)`` runs when training ends (see :func:`carried_weights`).
    """
    grid = model if isinstance(model, LrGrid) else None
    device = next(model.parameters()).device
    torch.manual_seed(cfg.seed)
    precision, groups, lrs, models = _prepare(model, cfg, trainable, device)
    opt = make_optimizer([{"params": g} for g in groups], cfg, compensate=PRECISIONS[precision][1])
    lost = [lost_update_warnings(g, [lr], precision) for g, lr in zip(groups, lrs, strict=True)]
    for msg in {m for ms in lost for m in ms}:
        warnings.warn(msg, LostUpdateWarning, stacklevel=2)
    forward_model = grid.batched if grid is not None else model
    checkpointing = _gradient_checkpointing(forward_model, cfg)
    first = batches(0)
    steps_per_epoch = len(first)
    total = _total_steps(cfg, steps_per_epoch)
    runs = _Members(
        models,
        [
            TrainResult(status="completed", steps=0, epochs_run=0, precision=precision, warnings=w)
            for w in lost
        ],
    )
    step = 0
    t0 = time.perf_counter()
    bar = _Progress(progress, total)

    def run_eval(epoch: float) -> None:
        runs.evaluate(epoch, evaluate, stop, on_eval, model.train, bar)

    try:
        model.train()
        if cfg.eval_at_start:
            run_eval(0)
        epoch = 0
        while runs.live and epoch < max(cfg.epochs, 1) and step < total:
            for i in runs.live:
                runs.results[i].epochs_run = epoch + 1
            for batch in first if epoch == 0 else batches(epoch):
                for group, lr in zip(opt.param_groups, lrs, strict=True):
                    group["lr"] = lr * lr_factor(step, total, cfg)
                batch = to_device(batch, device)
                with autocast_for(cfg, device, precision):
                    loss, _ = loss_fn(model, batch)
                values = loss.detach().reshape(-1).tolist()
                runs.check(values, cfg, diverged)
                if not runs.live:
                    break
                if grid is None:
                    _update(opt, loss, groups[0], cfg.grad_clip)
                else:
                    grid.update(opt, loss, groups, runs.live, cfg.grad_clip)
                step += 1
                runs.record(values, count_tokens(batch))
                bar.advance()
                if cfg.eval_every_steps and step % cfg.eval_every_steps == 0:
                    run_eval(epoch + (step % steps_per_epoch) / steps_per_epoch)
                if not runs.live or step >= total:
                    break
            epoch += 1
            if runs.live and cfg.eval_every_epochs and epoch % cfg.eval_every_epochs == 0:
                run_eval(epoch)
        if on_finish is not None:
            on_finish(opt)
    finally:
        if checkpointing:
            from rtteval.models.loading import set_checkpointing

            set_checkpointing(forward_model, False)
        for p in model.parameters():
            p.requires_grad_(True)
        opt.zero_grad(set_to_none=True)
        for r in runs.results:
            r.wall_time = time.perf_counter() - t0
        bar.stop()
        model.eval()
    return runs.results if grid is not None else runs.results[0]
