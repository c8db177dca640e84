"""NPO — Negative Preference Optimization (Zhang et al. 2024).

Loss: ``-(2/β)·mean log σ(-β·(log πθ(x) - log πref(x)))`` on forget prose,
``+ λ·NLL(retain text)``; ``πref`` is a frozen copy of the model before
unlearning and ``log π(x)`` the summed log-likelihood of a passage.  Unlike
GD the forget term saturates once a passage is much less likely than under
the reference, so NPO degrades more gracefully when run too long.
"""

from __future__ import annotations

import torch

from rtteval.methods import register
from rtteval.methods.base import (
    PAPER_ADAMW,
    PAPER_TRAIN,
    TINY_TRAIN,
    Method,
    Trainable,
    UnlearnContext,
    num,
)
from rtteval.methods.losses import npo_loss, sequence_logprobs
from rtteval.training.losses import LossFn, batch_logits, nll_loss


@register("npo")
class NPO(Method):
    corpus = "corpus"
    needs_reference = True
    hparam_names = ("beta", "retain_coef")
    hparam_types = {"beta": num(float, gt=0), "retain_coef": num(float, ge=0)}
    defaults = {
        "tiny": TINY_TRAIN | dict(lr=3e-3, beta=0.1, retain_coef=1.0),
        "paper": PAPER_TRAIN | PAPER_ADAMW | dict(lr=1e-5, beta=0.1, retain_coef=1.0),
    }
    grid = {
        "tiny": {"lr": [1e-3, 3e-3], "beta": [0.1, 0.5]},
        "paper": {"lr": [5e-6, 1e-5, 2e-5], "beta": [0.1, 0.5]},
    }

    def build(self, ctx: UnlearnContext) -> tuple[LossFn, Trainable]:
        if ctx.reference is None:
            raise ValueError("NPO needs a frozen reference model")
        beta, lam, ref = (
            float(ctx.hparams["beta"]),
            float(ctx.hparams["retain_coef"]),
            ctx.reference,
        )

        def loss_fn(model, batch):
            f = batch["forget"]
            logp, _ = sequence_logprobs(batch_logits(model, f), f["labels"])
            with torch.no_grad():
                ref_logp, _ = sequence_logprobs(batch_logits(ref, f), f["labels"])
            forget = npo_loss(logp, ref_logp, beta)
            retain = nll_loss(model, batch["retain"])
            logs = {"npo": float(forget.detach()), "retain_nll": float(retain.detach())}
            return forget + lam * retain, logs

        return loss_fn, None
