"""The stages' settings as pydantic models: declared once, used by the stage, a study and the CLI.

Kept apart from the stages themselves so that the study config
(:mod:`rtteval.config.study`) can embed them without importing torch.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from rtteval.config.base import Precision, StrictModel

__all__ = ["FinetuneConfig", "PretrainConfig", "PretrainSettings"]


class PretrainSettings(StrictModel):
    """How a tiny model is pretrained (defaults measured on 2 CPU cores, see docs/).

    A study's ``model.tiny.pretrain`` is this model; :class:`PretrainConfig`
    adds what a study sets elsewhere (preset, seed, role, precision).
    """

    lr: float = Field(3e-3, gt=0)
    batch_size: int = Field(64, ge=1)
    max_epochs: int = Field(120, ge=1)
    warmup_steps: int = Field(30, ge=0)
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    weight_decay: float = Field(0.0, ge=0)
    target_accuracy: float = Field(0.97, gt=0, le=1)
    eval_every_epochs: int = Field(2, ge=1)
    anneal_epochs: int = Field(10, ge=0)


class PretrainConfig(PretrainSettings):
    """One pretraining run (``rtteval pretrain``; a study's pretrain job)."""

    model_preset: str = "tiny-1m"
    seed: int = Field(0, ge=0)
    exclude_forget: bool = False
    precision: Precision = "auto"


class FinetuneConfig(StrictModel):
    """Learning the forget facts in a later fine-tuning phase (the paper's Random Birthdays regime).

    The base model never saw the forget facts (the tiny never-learned
    control, or a hub model for facts it cannot know); this phase trains on
    their corpus (or, without one, on the questions written out with their
    answers), replaying the retain corpus at ``replay_ratio`` so that
    fine-tuning does not erase what pretraining taught.  It stops when every
    evaluated accuracy (forget, and held-out retain where the dataset has
    it) reaches ``target_accuracy`` (``None``: run all ``max_epochs``).
    ``loss``: ``corpus`` learns the facts from their prose (or, without
    any, from the answered questions); ``mcq_answer`` from the answered
    questions with loss on the answer only (the paper's LETTER_ANSWER).
    ``grad_clip``: ``None`` clips nothing.  Defaults are for the tiny
    models; :meth:`paper` is the paper's Random Birthdays fine-tuning.
    """

    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(32, ge=1)
    max_epochs: int = Field(80, ge=1)
    warmup_steps: int = Field(10, ge=0)
    replay_ratio: float = Field(0.5, ge=0)
    target_accuracy: float | None = Field(0.97, gt=0, le=1)
    eval_every_epochs: int = Field(2, ge=1)
    optimizer: Literal["adamw", "lion"] = "adamw"
    loss: Literal["corpus", "mcq_answer"] = "corpus"
    grad_clip: float | None = Field(1.0, gt=0)
    seed: int = Field(0, ge=0)
    precision: Precision = "auto"

    @classmethod
    def paper(cls, **overrides: Any) -> FinetuneConfig:
        """The paper's Random Birthdays fine-tuning (docs/paper-fidelity.md gives the sources).

        Lion at 1e-6, 6 epochs of batch 4 over every split's MCQs with the
        answer-only loss, warmup over 24 steps, no clipping, no replay.
        """
        base: dict[str, Any] = dict(
            lr=1e-6, batch_size=4, max_epochs=6, warmup_steps=24, replay_ratio=0.0,
            target_accuracy=None, eval_every_epochs=1, optimizer="lion", loss="mcq_answer",
            grad_clip=None,
        )  # fmt: skip
        base.update(overrides)
        return cls(**base)
