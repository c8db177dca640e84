"""The language-modelling loss every stage trains with (methods add their own on top)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from rtteval.training.batching import Batch

#: ``loss_fn(model, batch) -> (loss, numbers to log)``; the loss is ``[G]`` for an :class:`LrGrid`.
LossFn = Callable[[torch.nn.Module, Batch], "tuple[torch.Tensor, dict[str, float]]"]


def batch_logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Logits of a padded training batch (every loss goes through here)."""
    from rtteval.scoring import forward_logits

    return forward_logits(model, batch["input_ids"], batch["attention_mask"])


def nll_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token NLL over label positions, with mask-derived position ids.

    For an :class:`LrGrid` (logits ``[G, B, T, V]``) one mean per member, ``[G]``.
    """
    logits = batch_logits(model, batch)[..., :-1, :]
    labels = batch["labels"][:, 1:]
    if logits.dim() == 3:
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
        )
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        labels.repeat(len(logits), 1).reshape(-1),
        ignore_index=-100,
        reduction="none",
    )
    return nll.view(len(logits), -1).sum(1) / (labels != -100).sum()


def lm_loss_fn(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """Plain language-modelling loss (pretraining, RTT); per member for an :class:`LrGrid`."""
    loss = nll_loss(model, batch)
    return loss, {"nll": float(loss.detach().mean())}
