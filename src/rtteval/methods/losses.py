"""Unlearning losses as pure functions of tensors.

Nothing here calls a model: each function takes logits, log-probabilities or
activations and returns a scalar, so each can be checked on a few
hand-computed numbers (``tests/methods/test_losses.py``).  The method files
(``gd.py``, ``npo.py``, ...) only run the forward passes and combine these.

Conventions: ``labels`` use -100 for positions that carry no loss (padding,
prompt); the token at position ``t`` is predicted by the logits at ``t-1``;
activation ``mask`` is 1 on real tokens and 0 on padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def sequence_logprobs(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed log-probability of the labelled tokens, and their count.

    ``logits`` is [B, T, V], ``labels`` [B, T].  Returns ``(logp [B], n_tokens [B])``.
    NPO compares whole-sequence likelihoods (not per-token means), and SimNPO
    divides by the length itself, so both need the sum and the count.
    """
    logits = logits[:, :-1, :].float()
    labels = labels[:, 1:]
    valid = labels != IGNORE
    safe = labels.masked_fill(~valid, 0)
    token_logp = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    token_logp = token_logp * valid
    return token_logp.sum(-1), valid.sum(-1)


def gradient_difference(
    forget_nll: torch.Tensor, retain_nll: torch.Tensor, retain_coef: float
) -> torch.Tensor:
    """GD: ascend the forget NLL, descend the retain NLL: ``-NLL_f + λ·NLL_r``.

    Unbounded below, which is why GD runs stop early (or diverge).
    """
    return -forget_nll + retain_coef * retain_nll


def relearn_with_retain(
    forget_nll: torch.Tensor, retain_nll: torch.Tensor, retain_coef: float
) -> torch.Tensor:
    """RIA / FWF: *descend* the NLL of wrong-fact text, plus ``λ·NLL_r``."""
    return forget_nll + retain_coef * retain_nll


def npo_loss(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO (Zhang et al. 2024): ``-(2/β)·mean log σ(-β·(log πθ - log πref))``.

    ``logp`` and ``ref_logp`` are per-sequence summed log-likelihoods of the
    forget text under the model and the frozen reference.  At the start
    (πθ = πref) the loss is ``(2/β)·log 2``; it saturates once the model's
    likelihood falls well below the reference, which is what keeps NPO from
    the runaway collapse of plain gradient ascent.
    """
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - ref_logp)).mean()


def simnpo_loss(
    logp: torch.Tensor, lengths: torch.Tensor, beta: float, delta: float
) -> torch.Tensor:
    """SimNPO (Fan et al. 2024): ``-(2/β)·mean log σ(-(β/|y|)·log πθ - δ)``.

    Reference-free: the length-normalised log-likelihood replaces NPO's
    log-ratio, and ``δ`` (the margin, γ in the paper) shifts the saturation point.
    """
    norm = logp / lengths.clamp(min=1).to(logp.dtype)
    return -(2.0 / beta) * F.logsigmoid(-beta * norm - delta).mean()


def masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the hidden dimension and the real (mask=1) tokens only.

    ``a`` is [B, T, D]; ``b`` broadcasts to it; ``mask`` is [B, T].  Padding
    tokens would otherwise pull the loss toward whatever the model does on pad
    positions, which depends on batch composition.
    """
    m = mask.to(a.dtype).unsqueeze(-1)
    sq = (a.float() - b.float()) ** 2 * m
    return sq.sum() / (m.sum() * a.shape[-1]).clamp(min=1)


def rmu_forget_loss(
    acts: torch.Tensor, control_vec: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """RMU forget term: MSE between layer-ℓ activations on forget text and ``c·u``."""
    return masked_mse(acts, control_vec.to(acts.dtype), mask)


def rmu_retain_loss(
    acts: torch.Tensor, frozen_acts: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """RMU retain term: MSE between activations and the frozen model's on retain text."""
    return masked_mse(acts, frozen_acts, mask)
