"""Linear probes per layer: is V's answer still linearly readable from the hidden states?

A diagnostic, not a recovery attack: a probe is trained, so it can read
what a model represents without the model using it, and a probe on a model
that never learned the facts can still beat chance on regularities of the
choices.  That is why the same three arms apply: the original is the
ceiling (what a probe reads when the facts are known) and the never-learned
control is the floor (what a probe reads from the choices alone); only
where the unlearned model's probe sits between the two says something.

Design (docs/attacks.md): the hidden state is read at the *answer
position* — the last token of the likelihood prompt (``likelihood_prompt``),
whose next-token scores rank the choices — at every layer (block outputs
1..L).  Each (question, choice) gets one feature vector: that state times
the choice's first answer token's output embedding, elementwise, so the
probe is scored choice by choice as likelihood scoring is (with all weights
1 its score is the choice's logit: the logit lens).  Per layer, a logistic
regression (binary: is this choice the correct one) is fitted on T's
questions — the other forget splits, minus any question whose text is also
a V question — with features standardized on T, an L2 penalty ``l2`` and
full-batch L-BFGS in float64 from zero weights (deterministic, no random
init).  On V, each question's choice with the highest probe score is its
answer, so accuracy and chance are those of the 4-way MCQ, as for every
other attack.

Provenance: the probe's training inputs are wrapped as a
:class:`~rtteval.attacks.folds.Fold` (T = the other splits) and checked with
:func:`~rtteval.attacks.folds.check_provenance` right before fitting.

Records: the layer number takes the grid's lr slot at "epoch" 1
(``grid_axis: layers``); epoch 0 ("before") is the model's own V accuracy
under its scoring.  The model's weights are never changed.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import Field

from rtteval.attacks.base import AttackConfig, AttackContext, register_attack

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch
    from transformers import PreTrainedTokenizerBase

    from rtteval.attacks.folds import Fold
    from rtteval.attacks.records import ModelAttack
    from rtteval.data.types import MCQ, Dataset
    from rtteval.scoring import ScoringConfig


class ProbeConfig(AttackConfig):
    """Linear probes in a study's ``attacks:`` (module docstring).

    ``layers``: block outputs to probe, 1..L (``None``: every layer);
    ``l2``: the penalty on the probe's weights (features are standardized);
    ``max_iter``: L-BFGS iterations.
    """

    name: Literal["probe"] = "probe"
    layers: list[Annotated[int, Field(ge=1)]] | None = Field(None, min_length=1)
    l2: float = Field(1e-2, ge=0)
    max_iter: int = Field(100, ge=1)

    trains: ClassVar[bool] = False
    #: A diagnostic: the overview shows it apart and never counts it as a method's worst case.
    diagnostic: ClassVar[bool] = True
    title: ClassVar[str] = (
        "linear probe per layer, trained on T, read on V — a diagnostic of what the hidden "
        "states still encode, not a recovery"
    )


def probe_inputs(
    tokenizer: PreTrainedTokenizerBase, questions: Sequence[MCQ], scoring: ScoringConfig
) -> tuple[list[list[int]], list[int]]:
    """Each question's prompt ids, and each (question, choice)'s first answer token (question-major).

    As likelihood scoring builds them: ``likelihood_prompt`` then " " + choice;
    the prompt's last position is the one whose next-token scores rank the choices.
    """
    from rtteval.scoring import continuation_ids

    prompts, tokens = [], []
    for q in questions:
        prompt = scoring.likelihood_prompt.format(question=q.question)
        ids = None
        for c in q.choices:
            ctx, cont = continuation_ids(tokenizer, prompt, " " + c)
            ids = ctx if ids is None else ids
            tokens.append(cont[0])
        prompts.append(ids or [])
    return prompts, tokens


def pair_features(h: torch.Tensor, unembed: torch.Tensor, n_choices: Sequence[int]) -> torch.Tensor:
    """``[layers, pairs, hidden]``: each question's answer-position state times each choice's unembedding.

    ``h``: ``[layers, questions, hidden]``; ``unembed``: ``[pairs, hidden]``.  With
    weights all 1 a linear probe on these sums to the choice's logit (the logit lens).
    """
    import torch

    index = torch.repeat_interleave(torch.arange(len(n_choices)), torch.tensor(list(n_choices)))
    return h[:, index] * unembed.unsqueeze(0)


def hidden_states(
    model: torch.nn.Module, seqs: Sequence[list[int]], pad_id: int, batch_size: int
) -> torch.Tensor:
    """``[layers, len(seqs), hidden]`` (float32, CPU): each block's output at each sequence's last position."""
    import torch

    device = next(model.parameters()).device
    parts = []
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            chunk = seqs[i : i + batch_size]
            n = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), n), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), n), dtype=torch.long)
            for j, s in enumerate(chunk):
                ids[j, : len(s)] = torch.tensor(s)
                mask[j, : len(s)] = 1
            out = model(
                input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True
            )
            last = (mask.sum(1) - 1).to(device)
            rows = torch.arange(len(chunk), device=device)
            hs = out.hidden_states[1:]  # [0] is the embeddings
            parts.append(torch.stack([h[rows, last].float().cpu() for h in hs]))
    return torch.cat(parts, dim=1)


def probe_features(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[MCQ],
    scoring: ScoringConfig,
) -> torch.Tensor:
    """``[layers, pairs, hidden]``: :func:`pair_features` of ``questions`` (module docstring)."""
    import torch

    from rtteval.errors import DataError

    prompts, tokens = probe_inputs(tokenizer, questions, scoring)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    h = hidden_states(model, prompts, pad, scoring.batch_size)
    out_emb = model.get_output_embeddings()
    if out_emb is None:
        raise DataError("the model has no output embedding to read the choices with")
    w = out_emb.weight.detach()
    unembed = w[torch.tensor(tokens, device=w.device)].float().cpu()
    return pair_features(h, unembed, [len(q.choices) for q in questions])


def fit_probe(
    x: torch.Tensor, y: torch.Tensor, l2: float, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logistic regression on standardized ``x`` (``[n, d]``) for 0/1 ``y``: (w, b, mean, std)."""
    import torch

    x = x.double()
    mean, std = x.mean(0), x.std(0, unbiased=False)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    z = (x - mean) / std
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")
    yd = y.double()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, yd)
        loss = loss + l2 * (w @ w)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach(), mean, std


def probe_correct(
    probe: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    x: torch.Tensor,
    questions: Sequence[MCQ],
) -> list[bool]:
    """Per question: is the choice with the highest probe score the correct one (ties: the first)?"""
    w, b, mean, std = probe
    scores = (((x.double() - mean) / std) @ w + b).tolist()
    out, i = [], 0
    for q in questions:
        s = scores[i : i + len(q.choices)]
        out.append(max(range(len(s)), key=s.__getitem__) == q.answer)
        i += len(q.choices)
    return out


def labels(questions: Sequence[MCQ]) -> list[int]:
    """1 for each question's correct choice, 0 for the others (question-major)."""
    return [int(j == q.answer) for q in questions for j in range(len(q.choices))]


def probe_pool(dataset: Dataset, v: str) -> list[tuple[str, MCQ]]:
    """T's questions: every forget split but V, minus any whose text is also a V question."""
    v_texts = {q.question for q in dataset.splits[v]}
    return [(s, q) for s in dataset.split_names if s != v for q in dataset.splits[s]
            if q.question not in v_texts]  # fmt: skip


def probe_fold(dataset: Dataset, v: str, scoring: ScoringConfig) -> tuple[Fold, list[MCQ]]:
    """The probe's training inputs (:func:`probe_pool`) as a provenance-checked :class:`Fold`."""
    from rtteval.attacks.folds import Fold, TrainItem, check_provenance, question_id

    pool = probe_pool(dataset, v)
    items = [
        TrainItem(
            scoring.likelihood_prompt.format(question=q.question) + " " + c, s, question_id(q),
            fact_id=None if q.extra.get("fact_id") is None else str(q.extra["fact_id"]),
            source=q.source,
        )
        for s, q in pool
        for c in q.choices
    ]  # fmt: skip
    fold = Fold(v, [s for s in dataset.split_names if s != v], "probe", items)
    check_provenance(fold, dataset)
    return fold, [q for _, q in pool]


@register_attack("probe")
class Probe:
    """A logistic-regression probe per layer, fitted on T, read on V (this module's docstring)."""

    name: ClassVar[str] = "probe"
    config_type: ClassVar[type[AttackConfig]] = ProbeConfig

    def run(self, config: dict[str, Any], ctx: AttackContext) -> ModelAttack:
        import torch

        from rtteval.attacks.folds import fold_names, question_id
        from rtteval.attacks.records import EpochEval, FoldAttack, ModelAttack, RunResult
        from rtteval.attacks.relearn import scoring_to_dict
        from rtteval.errors import ConfigError, DataError
        from rtteval.scoring import evaluate_mcq

        t0 = time.perf_counter()
        model, tok, dataset, label = ctx.model, ctx.tokenizer, ctx.dataset, ctx.label
        seed = int(config.get("seed", 0))
        cfg = ProbeConfig.from_job(config)
        scoring = ctx.scoring_or_default()
        vs = fold_names(dataset, ctx.folds)
        if len(dataset.split_names) < 2:
            raise DataError(f"a probe needs T: {dataset.name} has one forget split")
        retain_q = list(ctx.retain_questions or [])
        was_training = model.training
        model.eval()
        try:
            r = evaluate_mcq(model, tok, retain_q, scoring).correct if retain_q else []
            retain_before = sum(r) / len(r) if r else None
            needed = list(dataset.split_names)  # V and T: every forget split
            qs = {s: dataset.splits[s] for s in needed}
            allq = [q for s in needed for q in qs[s]]
            feats = probe_features(model, tok, allq, scoring)
            before = {v: evaluate_mcq(model, tok, qs[v], scoring).correct for v in vs}
        finally:
            model.train(was_training)
        n_layers = feats.shape[0]
        layers = cfg.layers or list(range(1, n_layers + 1))
        if max(layers) > n_layers:
            raise ConfigError(f"layers {layers}: the model has {n_layers}", field="layers")
        # rows of each question in feats (question-major, choices in order)
        start: dict[str, int] = {}
        offset = 0
        for s in needed:
            start[s] = offset
            offset += sum(len(q.choices) for q in qs[s])
        by_id = {}
        for s in needed:
            i = start[s]
            for q in qs[s]:
                by_id[id(q)] = list(range(i, i + len(q.choices)))
                i += len(q.choices)

        def rows(questions: Sequence[MCQ]) -> torch.Tensor:
            return torch.tensor([r for q in questions for r in by_id[id(q)]], dtype=torch.long)

        out = []
        for v in vs:
            fold, train_q = probe_fold(dataset, v, scoring)  # checked right before fitting
            tr, te = rows(train_q), rows(qs[v])
            y = torch.tensor(labels(train_q))
            runs = []
            for layer in layers:
                tl = time.perf_counter()
                probe = fit_probe(feats[layer - 1, tr], y, cfg.l2, cfg.max_iter)
                vc = probe_correct(probe, feats[layer - 1, te], qs[v])
                ee = EpochEval(1, sum(vc) / len(vc), vc, retain_acc=retain_before)
                runs.append(RunResult(float(layer), "completed", [ee], 0, time.perf_counter() - tl))
            ctx.say(f"probe {label} V={v}: " + " ".join(
                f"L{layer}={r.epochs[0].v_acc:.2f}" for layer, r in zip(layers, runs, strict=True)))  # fmt: skip
            bc = before[v]
            out.append(
                FoldAttack(v, list(fold.t), [question_id(q) for q in qs[v]],
                           [len(q.choices) for q in qs[v]], EpochEval(0, sum(bc) / len(bc), bc),
                           runs, fold.provenance())
            )  # fmt: skip
        record = {**cfg.resolved(seed), "folds": vs, "layers": layers, "grid_axis": "layers",
                  "lrs": [float(x) for x in layers], "epochs": 1}  # fmt: skip
        return ModelAttack(
            label=label, dataset=dataset.name, config=record, scoring=scoring_to_dict(scoring),
            folds=out, retain_before=retain_before, wall_time=time.perf_counter() - t0,
            meta={"n_retain": len(retain_q), "device": str(next(model.parameters()).device),
                  "precision": str(next(model.parameters()).dtype).removeprefix("torch."),
                  "n_layers": n_layers, "diagnostic": True},
        )  # fmt: skip
