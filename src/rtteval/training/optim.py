"""Optimizers and learning-rate schedules: Lion, AdamW for low-precision weights, warmup/decay."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from rtteval.errors import ConfigError
from rtteval.training.config import TrainConfig


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023), the optimizer of the paper's code.

    The update is ``sign(beta1*m + (1-beta1)*g)``; it is applied to all
    parameters of a group with ``torch._foreach`` ops rather than one Python
    step per parameter.  On the CPU the update lives in a buffer kept in the
    state: a fresh allocation of that size page-faults on every step (measured:
    the allocating multiply cost 5x the in-place ones).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        compensate: bool = False,
    ):
        if lr <= 0:
            raise ConfigError(f"Lion learning rate must be positive, got {lr}")
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))
        self.compensate = compensate

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if self.compensate:
                self._compensated_step(group, params)
                continue
            grads = [p.grad for p in params]
            for p in params:
                if "exp_avg" not in self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p)
            avgs = [self.state[p]["exp_avg"] for p in params]
            b1, b2 = group["betas"]
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            if params[0].device.type == "cpu":
                for p in params:
                    if "update" not in self.state[p]:
                        self.state[p]["update"] = torch.empty_like(p)
                update = [self.state[p]["update"] for p in params]
                for u, m in zip(update, avgs, strict=True):
                    torch.mul(m, b1, out=u)
            else:
                update = torch._foreach_mul(avgs, b1)
            torch._foreach_add_(update, grads, alpha=1 - b1)
            torch._foreach_sign_(update)
            torch._foreach_add_(params, update, alpha=-group["lr"])
            torch._foreach_mul_(avgs, b2)
            torch._foreach_add_(avgs, grads, alpha=1 - b2)
        return loss

    def _compensated_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """The same update, kept in fp32 (momentum and a Kahan residual) for low-precision weights.

        One parameter at a time, so the fp32 temporaries are one tensor's, not the model's.
        """
        b1, b2, lr, wd = *group["betas"], group["lr"], group["weight_decay"]
        for p in params:
            state = self.state[p]
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["comp"] = torch.zeros_like(p, dtype=torch.float32)
            m, g = state["exp_avg"], p.grad.float()
            update = torch.lerp(m, g, 1 - b1).sign_()
            m.lerp_(g, 1 - b2)
            del g
            _kahan_add_(p, state["comp"], update, lr, wd)


def _kahan_add_(
    p: torch.Tensor, comp: torch.Tensor, update: torch.Tensor, lr: float, wd: float
) -> None:
    """``p -= lr * (update + wd * p)`` without losing what rounding ``p`` drops.

    ``comp`` (fp32) holds the part of the fp32 result that ``p``'s dtype cannot
    represent, so ``p + comp`` is the weight fp32 training would have.  A
    bf16 residual (torch-optimi's Kahan summation) stops absorbing an lr
    below 1/256 of itself, so it too loses small updates over many steps
    (docs/performance.md).  ``update`` is consumed as scratch space.
    """
    exact = p.float().add_(comp)
    if wd:
        exact.mul_(1 - lr * wd)
    exact.add_(update, alpha=-lr)
    p.copy_(exact)
    comp.copy_(exact.sub_(p))


def carried_weights(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The fp32 weights an optimizer carries: each parameter plus its Kahan residual, if any.

    A compensated run's progress below the weights' rounding step lives in
    the residual until it adds up to a step; this is where to see it.
    """
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            comp = opt.state.get(p, {}).get("comp")
            out.append(p.detach().float() + (comp if comp is not None else 0.0))
    return out


class KahanAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, as ``torch.optim.AdamW``) for low-precision weights.

    Moments and the update are fp32 and applied with :func:`_kahan_add_`, so
    bf16 weights receive every update, however small next to their rounding step.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        if lr <= 0:
            raise ConfigError(f"AdamW learning rate must be positive, got {lr}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                    for k in ("exp_avg", "exp_avg_sq", "comp"):
                        state[k] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                t = state["step"]
                m, v, g = state["exp_avg"], state["exp_avg_sq"], p.grad.float()
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                update = v.div(1 - b2**t).sqrt_().add_(group["eps"])
                torch.div(m, update, out=update).div_(1 - b1**t)
                del g
                _kahan_add_(p, state["comp"], update, group["lr"], group["weight_decay"])
        return loss


def make_optimizer(
    params: list[Any], cfg: TrainConfig, *, compensate: bool = False
) -> torch.optim.Optimizer:
    """``params``: tensors, or param-group dicts (an LrGrid: one group per member).

    ``compensate``: keep every update of low-precision weights (precision ``bf16``).
    """
    if cfg.optimizer == "adamw":
        cls = KahanAdamW if compensate else torch.optim.AdamW
        return cls(
            params, lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "lion":
        return Lion(
            params,
            lr=cfg.lr,
            betas=(0.9, 0.99),
            weight_decay=cfg.weight_decay,
            compensate=compensate,
        )
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
