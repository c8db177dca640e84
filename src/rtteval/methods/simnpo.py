"""SimNPO — Simple NPO (Fan et al. 2024): reference-free, length-normalised NPO.

Loss: ``-(2/β)·mean log σ(-(β/|x|)·log πθ(x) - δ)`` on forget prose,
``+ λ·NLL(retain text)``.  Dividing by the passage length removes NPO's
bias toward long passages, and needing no reference model halves memory.
"""

from __future__ import annotations

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
from rtteval.methods.losses import sequence_logprobs, simnpo_loss
from rtteval.training.losses import LossFn, batch_logits, nll_loss


@register("simnpo")
class SimNPO(Method):
    corpus = "corpus"
    hparam_names = ("beta", "delta", "retain_coef")
    hparam_types = {
        "beta": num(float, gt=0),
        "delta": num(float, ge=0),
        "retain_coef": num(float, ge=0),
    }
    defaults = {
        "tiny": TINY_TRAIN | dict(lr=1e-3, beta=1.0, delta=0.0, retain_coef=1.0),
        "paper": PAPER_TRAIN | PAPER_ADAMW | dict(lr=1e-5, beta=2.5, delta=0.0, retain_coef=1.0),
    }
    grid = {
        "tiny": {"lr": [1e-3, 3e-3], "beta": [0.5, 1.0, 2.5]},
        "paper": {"lr": [5e-6, 1e-5, 2e-5], "beta": [2.5]},
    }

    def build(self, ctx: UnlearnContext) -> tuple[LossFn, Trainable]:
        beta, delta = float(ctx.hparams["beta"]), float(ctx.hparams["delta"])
        lam = float(ctx.hparams["retain_coef"])

        def loss_fn(model, batch):
            f = batch["forget"]
            logp, n = sequence_logprobs(batch_logits(model, f), f["labels"])
            forget = simnpo_loss(logp, n, beta, delta)
            retain = nll_loss(model, batch["retain"])
            logs = {"simnpo": float(forget.detach()), "retain_nll": float(retain.detach())}
            return forget + lam * retain, logs

        return loss_fn, None
