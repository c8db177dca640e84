"""Quantization: round-to-nearest weight quantization, then V measured with no training.

An unlearning update that is small compared with a weight's quantization
step can be rounded away: after 4-bit quantization, "forgotten" knowledge
came back from 21% to 83% in Zhang et al. (arXiv 2410.16454).  This attack
quantizes every linear layer's weight (symmetric round-to-nearest, int8 or
int4, one scale per output channel or per group of inputs), dequantizes it
in place and measures V, for each scheme.  The original (ceiling) shows
that quantization alone keeps the knowledge; the never-learned control
(floor) shows it adds none, so V stays at chance there.

Plain torch on CPU (or the model's device); the embeddings and the output
head are left as they are, as the common weight-only quantizers do.  The
model is restored from an in-memory snapshot after every scheme and at the
end.  The records are the shared ones: the scheme's 1-based position in
``schemes`` takes the grid's lr slot, at "epoch" 1 (docs/attacks.md);
epoch 0 ("before") is the unquantized model.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator

from rtteval.attacks.base import AttackConfig, AttackContext, register_attack

if TYPE_CHECKING:
    import torch

    from rtteval.attacks.records import ModelAttack

Scheme = Literal["int8-channel", "int8-group", "int4-channel", "int4-group"]

#: The group size of ``*-group`` schemes on models whose linear layers are wide enough.
DEFAULT_GROUP = 128


class QuantizeConfig(AttackConfig):
    """Quantization in a study's ``attacks:``: the schemes to try (each one grid point).

    ``group_size``: inputs per scale in the ``*-group`` schemes; ``None``:
    128, or a quarter of the narrowest quantized layer's input width when
    that is smaller (a tiny model's group must be smaller than a row, or
    group-wise would be per-channel).
    """

    name: Literal["quantize"] = "quantize"
    schemes: list[Scheme] = Field(
        ["int8-channel", "int8-group", "int4-channel", "int4-group"], min_length=1
    )
    group_size: int | None = Field(None, ge=1)

    trains: ClassVar[bool] = False
    title: ClassVar[str] = (
        "quantization: round-to-nearest int8/int4 weights (per channel, group-wise), no training"
    )

    @field_validator("schemes")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"schemes has duplicates: {v}")
        return v


def rtn(w: torch.Tensor, bits: int, group: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest of a 2-D weight: integers ``q`` and their ``scale``s.

    ``q`` has shape ``[out, n_groups, g]`` (inputs zero-padded to a multiple
    of ``g``; ``group=None``: one group per row), integer-valued floats in
    ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]``; ``scale`` is ``[out, n_groups, 1]``,
    the group's largest magnitude over that bound (1 for an all-zero group).
    Computed in fp32.
    """
    import torch
    import torch.nn.functional as F

    qmax = 2 ** (bits - 1) - 1
    w32 = w.detach().float()
    n_out, n_in = w32.shape
    g = n_in if group is None else min(group, n_in)
    x = F.pad(w32, (0, (-n_in) % g)).view(n_out, -1, g)
    scale = x.abs().amax(dim=-1, keepdim=True) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(x / scale), -qmax, qmax)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, n_in: int) -> torch.Tensor:
    """``q * scale`` back in the weight's ``[out, in]`` shape (padding dropped)."""
    return (q * scale).reshape(q.shape[0], -1)[:, :n_in]


def quantized_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """The linear layers quantized: all but the output head (embeddings are not linear)."""
    import torch

    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")
    ]


def resolve_group(model: torch.nn.Module, group_size: int | None) -> int:
    """``group_size``, or (``None``) 128 capped at a quarter of the narrowest layer's inputs."""
    if group_size is not None:
        return group_size
    widths = [m.in_features for _, m in quantized_layers(model)]
    return max(1, min([DEFAULT_GROUP, *(w // 4 for w in widths)]))


def quantize_model(model: torch.nn.Module, scheme: str, group: int) -> int:
    """Replace every quantized layer's weight by its round-to-nearest version, in place.

    Returns the number of layers quantized.
    """
    import torch

    bits = int(scheme[3])  # "int8-..." / "int4-..."
    g = group if scheme.endswith("-group") else None
    layers = quantized_layers(model)
    with torch.no_grad():
        for _, m in layers:
            q, scale = rtn(m.weight, bits, g)
            m.weight.copy_(dequantize(q, scale, m.weight.shape[1]).to(m.weight.dtype))
    return len(layers)


@register_attack("quantize")
class Quantize:
    """Round-to-nearest weight quantization, then V (this module's docstring)."""

    name: ClassVar[str] = "quantize"
    config_type: ClassVar[type[AttackConfig]] = QuantizeConfig

    def run(self, config: dict[str, Any], ctx: AttackContext) -> ModelAttack:
        from rtteval.attacks.folds import Fold, check_provenance, fold_names, question_id
        from rtteval.attacks.records import EpochEval, FoldAttack, ModelAttack, RunResult
        from rtteval.attacks.relearn import scoring_to_dict
        from rtteval.errors import DataError
        from rtteval.models import restore_state, snapshot_state
        from rtteval.scoring import evaluate_mcq

        t0 = time.perf_counter()
        model, tokenizer, dataset, label = ctx.model, ctx.tokenizer, ctx.dataset, ctx.label
        seed = int(config.get("seed", 0))
        cfg = QuantizeConfig.from_job(config)
        scoring = ctx.scoring_or_default()
        vs = fold_names(dataset, ctx.folds)
        if not quantized_layers(model):
            raise DataError(f"{label}: the model has no linear layer to quantize")
        group = resolve_group(model, cfg.group_size)
        retain_q = list(ctx.retain_questions or [])
        v_qs = {v: dataset.splits[v] for v in vs}

        def evaluate() -> tuple[dict[str, list[bool]], float | None]:
            v_c = {v: evaluate_mcq(model, tokenizer, qs, scoring).correct for v, qs in v_qs.items()}
            r = evaluate_mcq(model, tokenizer, retain_q, scoring).correct if retain_q else []
            return v_c, (sum(r) / len(r) if r else None)

        snapshot = snapshot_state(model)
        was_training = model.training
        model.eval()
        try:
            before, retain_before = evaluate()
            after: list[tuple[dict[str, list[bool]], float | None, float]] = []
            for scheme in cfg.schemes:
                ts = time.perf_counter()
                restore_state(model, snapshot)
                quantize_model(model, scheme, group)
                v_c, r_acc = evaluate()
                after.append((v_c, r_acc, time.perf_counter() - ts))
                accs = " ".join(f"{v}={sum(c) / len(c):.2f}" for v, c in v_c.items())
                ctx.say(f"quantize {label} {scheme}: V acc {accs}")
        finally:
            restore_state(model, snapshot)
            model.train(was_training)
        out = []
        for v in vs:
            fold = Fold(v, [], "quantize", [])  # trains on nothing; checked all the same
            check_provenance(fold, dataset)
            bc = before[v]
            runs = [
                RunResult(float(i + 1), "completed",
                          [EpochEval(1, sum(v_c[v]) / len(v_c[v]), v_c[v], retain_acc=r_acc)],
                          0, wall)
                for i, (v_c, r_acc, wall) in enumerate(after)
            ]  # fmt: skip
            out.append(
                FoldAttack(v, [], [question_id(q) for q in v_qs[v]],
                           [len(q.choices) for q in v_qs[v]],
                           EpochEval(0, sum(bc) / len(bc), bc), runs, fold.provenance())
            )  # fmt: skip
        record = {**cfg.resolved(seed), "folds": vs, "group_size": group, "grid_axis": "schemes",
                  "lrs": [float(i + 1) for i in range(len(cfg.schemes))], "epochs": 1}  # fmt: skip
        return ModelAttack(
            label=label, dataset=dataset.name, config=record, scoring=scoring_to_dict(scoring),
            folds=out, retain_before=retain_before, wall_time=time.perf_counter() - t0,
            meta={"n_retain": len(retain_q), "device": str(next(model.parameters()).device),
                  "precision": str(next(model.parameters()).dtype).removeprefix("torch."),
                  "n_quantized_layers": len(quantized_layers(model))},
        )  # fmt: skip
