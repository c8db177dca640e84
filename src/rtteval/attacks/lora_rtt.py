"""LoRA-RTT: RTT with LoRA adapters on a frozen base.

Full fine-tuning of an 8B model needs its gradients and optimizer state
beside the weights; the relearning attacks of the literature are mostly LoRA
(Łucki et al., arXiv 2409.18025; Che et al., arXiv 2502.05209).  This is
RTT's protocol unchanged — the same folds, provenance check, arms, lr x
epoch grid, selection and results schema (:mod:`rtteval.attacks.rtt`) — but
only LoRA adapters are trained; the base weights never move.

The adapters are peft's (``LoraConfig`` on the model in place), so what
:func:`attach_lora` builds is saved with ``save_pretrained`` and loaded with
``PeftModel.from_pretrained`` like any peft adapter.  Every (fold, lr) run
starts from the same adapter initialisation (seeded; B = 0, so the attacked
model starts as the model given) and the adapters are removed afterwards:
the caller gets its model back unchanged, with its ``requires_grad`` flags.
The learning rates train one adapter at a time (not as one batched model).

Defaults: ``rank`` 8, ``alpha`` 2 x rank, ``dropout`` 0, the attention and
MLP projections (peft's ``all-linear``: every linear layer but the output
head), and the lr grid 1e-3, 3e-3, 1e-2 (LoRA's effective step is smaller
than full fine-tuning's, so its lrs sit higher than RTT's), chosen for the
micro and tiny models.  ``paper: true`` starts from RTT's paper preset (6
epochs, batch 4, the MCQ loss, all of T) with the literature's LoRA: rank
128 and lrs around 2e-4 (Łucki et al.), alpha = 2 x rank (Che et al.'s
rank 16, alpha 32), AdamW, as those papers train.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import Field

from rtteval.attacks.base import AttackConfig, register_attack
from rtteval.attacks.rtt import RTTSpec

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

    from rtteval.attacks.records import ModelAttack
    from rtteval.data.types import MCQ, Dataset
    from rtteval.scoring import ScoringConfig

#: The adapter settings; everything else is RTT's.
LORA_FIELDS = ("rank", "alpha", "dropout", "target_modules")
#: peft's name for "every linear layer but the output head": the attention and MLP projections.
ALL_LINEAR = "all-linear"
TINY_DEFAULTS: dict[str, Any] = {"lrs": [1e-3, 3e-3, 1e-2]}
PAPER_DEFAULTS: dict[str, Any] = {"lrs": [1e-4, 2e-4, 4e-4], "optimizer": "adamw"}
PAPER_RANK = 128


class LoraRTTSpec(RTTSpec):
    """LoRA-RTT in a study's ``attacks:``: RTT's fields plus the adapter's (module docstring).

    ``rank`` (default 8; 128 with ``paper: true``), ``alpha`` (default 2 x
    rank), ``dropout`` (0), ``target_modules`` (module names; default the
    attention and MLP projections).  RTT's fields keep RTT's meaning;
    unset ``lrs`` (and with ``paper``, ``optimizer``) take LoRA's defaults.
    """

    name: Literal["lora_rtt"] = "lora_rtt"  # type: ignore[assignment]
    rank: int | None = Field(None, ge=1)
    alpha: float | None = Field(None, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[Annotated[str, Field(min_length=1)]] | None = Field(None, min_length=1)

    title: ClassVar[str] = (
        "LoRA-RTT: LoRA adapters fine-tuned on the other forget splits (T), measure V"
    )

    def lora(self) -> dict[str, Any]:
        """The resolved adapter settings (stored in job keys and results under ``lora``)."""
        rank = self.rank if self.rank is not None else (PAPER_RANK if self.paper else 8)
        return {
            "rank": rank,
            "alpha": self.alpha if self.alpha is not None else 2.0 * rank,
            "dropout": self.dropout,
            "target_modules": self.target_modules or ALL_LINEAR,
        }

    def resolved(self, seed: int, train_splits: int | None = None) -> dict[str, Any]:
        """RTT's resolved settings (with LoRA's lr defaults) plus ``lora``."""
        given = self.model_dump(exclude={"name", *LORA_FIELDS}, exclude_unset=True)
        for k, v in (PAPER_DEFAULTS if self.paper else TINY_DEFAULTS).items():
            given.setdefault(k, v)
        d = RTTSpec.model_validate(given).resolved(seed, train_splits)
        d["lora"] = self.lora()
        return d


def is_lora_param(name: str) -> bool:
    """The parameters LoRA-RTT trains: the adapters' A and B."""
    return "lora_" in name


def attach_lora(model: torch.nn.Module, lora: dict[str, Any], seed: int = 0) -> PeftModel:
    """Wrap ``model`` in place with a peft LoRA adapter per ``lora`` (``LoraRTTSpec.lora()``).

    The adapter's A is initialised from ``seed``; B is zero, so the wrapped
    model computes what ``model`` did.  ``peft_model.unload()`` removes it.
    """
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model

    from rtteval.errors import ConfigError

    cfg = LoraConfig(
        r=int(lora["rank"]),
        lora_alpha=float(lora["alpha"]),
        lora_dropout=float(lora["dropout"]),
        target_modules=lora["target_modules"],
        bias="none",
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with warnings.catch_warnings():  # peft reads a property transformers deprecates
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
            return get_peft_model(model, cfg)
    except ValueError as e:  # target modules not found in the model
        raise ConfigError(f"LoRA: {e}".splitlines()[0], field="target_modules") from None
    finally:
        torch.random.set_rng_state(state)


@register_attack("lora_rtt")
class LoraRTT:
    """RTT with LoRA adapters on a frozen base (this module's docstring)."""

    name: ClassVar[str] = "lora_rtt"
    config_type: ClassVar[type[AttackConfig]] = LoraRTTSpec

    def run(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        dataset: Dataset,
        config: dict[str, Any],
        scoring: ScoringConfig | None = None,
        *,
        folds: Sequence[str] | None = None,
        retain_questions: Sequence[MCQ] | None = None,
        retain_dataset: Dataset | None = None,
        label: str = "model",
        progress: bool = False,
        log: Callable[[str], None] | None = None,
    ) -> ModelAttack:
        """RTT's folds and grid on a LoRA-wrapped ``model``; the adapters are removed afterwards."""
        from rtteval.attacks.folds import build_folds, check_provenance, resolve_loss
        from rtteval.attacks.relearn import relearn
        from rtteval.attacks.rtt import RTTConfig
        from rtteval.pretrain import scoring_for

        cfg = RTTConfig.from_dict(config)
        if folds:
            cfg.folds = list(folds)
        cfg.validate()
        lora = dict(config["lora"])
        scoring = scoring or scoring_for(dataset, batch_size=128)
        fs = build_folds(dataset, cfg)
        record = {**cfg.to_dict(), "lora": lora, "folds": [f.v for f in fs]}
        record["loss"] = fs[0].loss if fs else resolve_loss(dataset, cfg)
        flags = [p.requires_grad for p in model.parameters()]
        peft_model = attach_lora(model, lora, seed=cfg.seed)
        try:
            for f in fs:  # right before training, on the very texts trained on
                check_provenance(f, dataset)
            return relearn(
                peft_model, tokenizer, dataset, fs, cfg, scoring, config=record,
                retain_questions=retain_questions, label=label, name="LoRA-RTT",
                progress=progress, log=log, trainable=is_lora_param,
            )  # fmt: skip
        finally:
            peft_model.unload()  # puts the original layers back into ``model``
            for p, flag in zip(model.parameters(), flags, strict=True):
                p.requires_grad_(flag)
