"""A training run's hyperparameters: plain data, so it is stored with results."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from rtteval.config.study import Precision


@dataclass
class TrainConfig:
    """Hyperparameters of one run; plain data so it is stored with results."""

    lr: float = 1e-3
    epochs: int = 1
    max_steps: int | None = None
    optimizer: Literal["adamw", "lion"] = "adamw"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    #: AdamW's ε.  Tiny-model unlearning raises it (1e-4, docs/methods.md):
    #: a tied embedding's rows of tokens absent from a batch get only the
    #: softmax's tail gradient, which Adam's 1/√v would scale up to full steps.
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    seed: int = 0
    eval_every_steps: int | None = None
    eval_every_epochs: int | None = 1
    eval_at_start: bool = False
    max_loss: float | None = None
    #: Only for ``fp32`` weights (``precision: fp32``); other precisions compute in their dtype.
    autocast: Literal["auto", "off", "bf16"] = "auto"
    #: Weight dtype and update rule (:data:`PRECISIONS`); ``auto``: bf16 on a GPU, fp32 on CPU.
    precision: Precision = "auto"
    #: Recompute activations in the backward pass (Hugging Face models): less memory, ~1/3 slower.
    gradient_checkpointing: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
