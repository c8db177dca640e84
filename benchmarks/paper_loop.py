"""The paper's RTT fine-tuning loop, in its code shape (not its code): the baseline to beat.

What makes the released loop slow, reproduced deliberately:

* the model is reloaded from disk for every (fold, learning rate) run;
* every batch is tokenized on the fly, batch size 4, padded to the longest;
* Lion steps parameter by parameter in Python;
* after every epoch: a full evaluation of V *and* of the retain set, in small
  batches, plus sampling a few generations.

The math is the same as rtteval's RTT with ``optimizer="lion"``,
``batch_size=4``, no warmup, constant lr, so final accuracies agree within
noise (batch order differs: rtteval buckets by length).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rtteval.data.types import MCQ
from rtteval.scoring import ScoringConfig, evaluate_mcq


class PerParamLion(torch.optim.Optimizer):
    """Lion with a Python loop over parameters, as in the paper's code."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.99)) -> None:
        super().__init__(params, dict(lr=lr, betas=betas))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                update = (m * b1 + p.grad * (1 - b1)).sign_()
                p.add_(update, alpha=-group["lr"])
                m.mul_(b2).add_(p.grad, alpha=1 - b2)


def paper_rtt_run(
    model_dir: str | Path,
    train_texts: Sequence[str],
    v_questions: Sequence[MCQ],
    retain_questions: Sequence[MCQ],
    scoring: ScoringConfig,
    *,
    lr: float,
    epochs: int,
    batch_size: int = 4,
    seed: int = 0,
    n_samples: int = 3,
) -> list[float]:
    """One (fold, lr) run; returns V accuracy after each epoch."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))  # reload for every run
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    opt = PerParamLion(model.parameters(), lr=lr)
    eval_cfg = ScoringConfig(
        mode=scoring.mode,
        likelihood_prompt=scoring.likelihood_prompt,
        batch_size=4,
        letter_format=scoring.letter_format,
    )
    rng = random.Random(seed)
    curve = []
    for _ in range(epochs):
        model.train()
        data = list(train_texts)
        rng.shuffle(data)
        for i in range(0, len(data), batch_size):
            chunk = [t + tok.eos_token for t in data[i : i + batch_size]]
            enc = tok(chunk, padding="longest", return_tensors="pt")  # tokenized on the fly
            labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
            out = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels)
            out.loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
        curve.append(evaluate_mcq(model, tok, v_questions, eval_cfg).accuracy)
        evaluate_mcq(model, tok, retain_questions, eval_cfg)  # full retain eval every epoch
        with torch.no_grad():  # and a few sampled generations, as the paper logs
            for q in v_questions[:n_samples]:
                ids = tok(
                    scoring.likelihood_prompt.format(question=q.question), return_tensors="pt"
                )
                model.generate(
                    **ids, max_new_tokens=8, do_sample=True, pad_token_id=tok.pad_token_id
                )
    return curve
