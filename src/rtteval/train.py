"""The one training loop.

Pretraining, every unlearning method and the RTT attack all call
:func:`train`.  What differs between them is data and loss, so those are
arguments: ``batches(epoch)`` returns the epoch's batches (any nesting of
dicts of tensors) and ``loss_fn(model, batch)`` returns a scalar loss plus
numbers to log.  Everything else — optimizer, schedule, clipping, autocast,
evaluation, early stopping, divergence handling, progress — lives here once.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from rtteval.errors import ConfigError

Batch = dict[str, Any]
LossFn = Callable[[torch.nn.Module, Batch], "tuple[torch.Tensor, dict[str, float]]"]


# --------------------------------------------------------------------------- optimizers


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023), the optimizer of the paper's code.

    The update is ``sign(beta1*m + (1-beta1)*g)``; it is applied to all
    parameters of a group with ``torch._foreach`` ops rather than one Python
    step per parameter.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ):
        if lr <= 0:
            raise ConfigError(f"Lion learning rate must be positive, got {lr}")
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            for p in params:
                if "exp_avg" not in self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p)
            avgs = [self.state[p]["exp_avg"] for p in params]
            b1, b2 = group["betas"]
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            update = torch._foreach_mul(avgs, b1)
            torch._foreach_add_(update, grads, alpha=1 - b1)
            torch._foreach_sign_(update)
            torch._foreach_add_(params, update, alpha=-group["lr"])
            torch._foreach_mul_(avgs, b2)
            torch._foreach_add_(avgs, grads, alpha=1 - b2)
        return loss


# --------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """Hyperparameters of one run; plain data so it is stored with results."""

    lr: float = 1e-3
    epochs: int = 1
    max_steps: int | None = None
    optimizer: Literal["adamw", "lion"] = "adamw"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    seed: int = 0
    eval_every_steps: int | None = None
    eval_every_epochs: int | None = 1
    eval_at_start: bool = False
    max_loss: float | None = None
    autocast: Literal["auto", "off", "bf16"] = "auto"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
        }


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "lion":
        return Lion(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    raise ConfigError(f"unknown optimizer {cfg.optimizer!r}; use adamw or lion")


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup, then constant / cosine / linear decay to ``min_lr_ratio``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "cosine":
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * (1 - progress)
    raise ConfigError(f"unknown schedule {cfg.schedule!r}; use constant, cosine or linear")


# --------------------------------------------------------------------------- batching


def encode_texts(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_length: int | None = None,
    add_eos: bool = True,
) -> list[list[int]]:
    """Token ids with BOS (from the tokenizer) and EOS appended; refuses silent truncation."""
    out = []
    limit = max_length or getattr(tokenizer, "model_max_length", None) or 10**9
    for t in texts:
        ids = tokenizer.encode(t, add_special_tokens=True)
        if add_eos and tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        if len(ids) > limit:
            raise ConfigError(
                f"a training text is {len(ids)} tokens, over max_length {limit}: {t[:60]!r}..."
            )
        out.append(ids)
    return out


def pad_batch(
    seqs: Sequence[Sequence[int]], pad_id: int, loss_masks: Sequence[Sequence[int]] | None = None
) -> Batch:
    """Right-padded batch; ``labels`` are -100 on padding and outside each loss mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        t = torch.tensor(s, dtype=torch.long)
        ids[i, : len(s)] = t
        mask[i, : len(s)] = 1
        if loss_masks is None:
            labels[i, : len(s)] = t
        else:
            m = torch.tensor(loss_masks[i], dtype=torch.bool)
            labels[i, : len(s)] = torch.where(m, t, torch.full_like(t, -100))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_batches(
    seqs: Sequence[Sequence[int]],
    batch_size: int,
    pad_id: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    bucket: bool = True,
    loss_masks: Sequence[Sequence[int]] | None = None,
) -> list[Batch]:
    """Shuffle, then group sequences of similar length so padding wastes little compute.

    Bucketing sorts within windows of 50 batches, then shuffles the batch
    order, so an epoch is still a random pass over the data.
    """
    order = list(range(len(seqs)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
    if bucket:
        window = batch_size * 50
        order = [
            i
            for w in range(0, len(order), window)
            for i in sorted(order[w : w + window], key=lambda j: len(seqs[j]))
        ]
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle and bucket:
        rng.shuffle(groups)
    return [
        pad_batch(
            [seqs[i] for i in g], pad_id, None if loss_masks is None else [loss_masks[i] for i in g]
        )
        for g in groups
    ]


def count_tokens(batch: Any) -> int:
    if isinstance(batch, dict):
        if "attention_mask" in batch and isinstance(batch["attention_mask"], torch.Tensor):
            return int(batch["attention_mask"].sum())
        return sum(count_tokens(v) for v in batch.values())
    return 0


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


# --------------------------------------------------------------------------- losses


def batch_logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Logits of a padded training batch (every loss goes through here)."""
    from rtteval.scoring import forward_logits

    return forward_logits(model, batch["input_ids"], batch["attention_mask"])


def nll_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token NLL over label positions, with mask-derived position ids."""
    logits = batch_logits(model, batch)[:, :-1, :]
    labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )


def lm_loss_fn(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """Plain language-modelling loss (pretraining, RTT)."""
    loss = nll_loss(model, batch)
    return loss, {"nll": float(loss.detach())}


# --------------------------------------------------------------------------- the loop


def _autocast(cfg: TrainConfig, device: torch.device):
    use = cfg.autocast == "bf16" or (cfg.autocast == "auto" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use)


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
) -> TrainResult:
    """Train ``model`` in place.

    ``evaluate(model)`` runs every ``eval_every_steps`` steps and/or at the
    end of every ``eval_every_epochs`` epochs; its dict (plus step/epoch) is
    appended to the history and passed to ``stop``, which ends training
    early when it returns True.  A non-finite loss, or one above
    ``max_loss``, ends the run with status ``diverged`` instead of raising,
    so one bad grid point never crashes a sweep.  ``trainable(name)`` picks
    the parameters to update (RMU trains a few layers only).
    """
    device = next(model.parameters()).device
    torch.manual_seed(cfg.seed)
    names_params = [(n, p) for n, p in model.named_parameters()]
    params = []
    for n, p in names_params:
        keep = trainable(n) if trainable is not None else True
        p.requires_grad_(keep)
        if keep:
            params.append(p)
    if not params:
        raise ConfigError("no trainable parameters selected")
    opt = make_optimizer(params, cfg)
    first = batches(0)
    steps_per_epoch = len(first)
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    total = (
        min(total, cfg.epochs * steps_per_epoch)
        if cfg.max_steps is not None and cfg.epochs
        else total
    )
    result = TrainResult(status="completed", steps=0, epochs_run=0)
    t0 = time.perf_counter()

    bar = None
    if progress:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            transient=True,
            console=Console(stderr=True),  # stdout is for results (JSON)
        )
        bar.start()
        task = bar.add_task(progress, total=total, info="")

    def run_eval(epoch: int) -> bool:
        if evaluate is None:
            return False
        row = {"step": result.steps, "epoch": epoch, **evaluate(model)}
        model.train()
        result.history.append(row)
        if on_eval is not None:
            on_eval(row)
        if bar is not None:
            shown = {k: v for k, v in row.items() if isinstance(v, float)}
            bar.update(task, info=" ".join(f"{k}={v:.3f}" for k, v in list(shown.items())[:3]))
        return bool(stop is not None and stop(row))

    try:
        model.train()
        if cfg.eval_at_start and run_eval(0):
            result.status = "stopped_early"
            return result
        epoch = 0
        done = False
        while not done and epoch < max(cfg.epochs, 1) and result.steps < total:
            epoch_batches = first if epoch == 0 else batches(epoch)
            for batch in epoch_batches:
                for g in opt.param_groups:
                    g["lr"] = cfg.lr * lr_factor(result.steps, total, cfg)
                batch = to_device(batch, device)
                with _autocast(cfg, device):
                    loss, logs = loss_fn(model, batch)
                value = float(loss.detach())
                if not math.isfinite(value) or (cfg.max_loss is not None and value > cfg.max_loss):
                    result.status = "diverged"
                    result.message = f"loss {value} at step {result.steps}"
                    done = True
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                result.steps += 1
                result.losses.append(value)
                result.tokens += count_tokens(batch)
                if bar is not None:
                    bar.update(task, advance=1)
                if (
                    cfg.eval_every_steps
                    and result.steps % cfg.eval_every_steps == 0
                    and run_eval(epoch + (result.steps % steps_per_epoch) / steps_per_epoch)
                ):
                    result.status = "stopped_early"
                    done = True
                    break
                if result.steps >= total:
                    break
            else:
                pass
            epoch += 1
            result.epochs_run = epoch
            if done:
                break
            if cfg.eval_every_epochs and epoch % cfg.eval_every_epochs == 0 and run_eval(epoch):
                result.status = "stopped_early"
                break
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
        opt.zero_grad(set_to_none=True)
        result.wall_time = time.perf_counter() - t0
        if bar is not None:
            bar.stop()
        model.eval()
    return result
