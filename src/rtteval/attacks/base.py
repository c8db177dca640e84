"""The attack seam: the :class:`Attack` protocol, its config base and the registry.

An attack is a class registered with ``@register_attack("name")`` that
declares its own config type (a pydantic model, subclass of
:class:`AttackConfig`, with a ``name: Literal["name"]`` field) and a
``run(config, ctx)`` that attacks one model (``ctx``, an
:class:`AttackContext`) and returns a
:class:`~rtteval.attacks.records.ModelAttack`.  Everything around it is
shared, so a new attack is one file plus its import line in
``rtteval/attacks/__init__.py``:

* the arms (the unlearned model, the original = ceiling, the control =
  floor) are planned by the runner and passed in one at a time;
* folds and provenance are :mod:`rtteval.attacks.folds`;
* the results schema is :mod:`rtteval.attacks.records`, which the report,
  findings and the runner read;
* the fine-tuning loop over an lr x epoch grid is
  :func:`rtteval.attacks.relearn.relearn`.

A study's ``attacks:`` list is validated by :func:`attack_adapter`, a pydantic
union discriminated on ``name`` over the registered config types.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Protocol, Self, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from rtteval.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from rtteval.attacks.records import ModelAttack
    from rtteval.data.types import MCQ, Dataset
    from rtteval.scoring import ScoringConfig


class AttackConfig(BaseModel):
    """What every attack's config has besides its own settings.

    ``folds``: the V splits to measure (``None``: every forget split);
    ``controls``: also attack the original (ceiling) and the never-learned
    control (floor), which the report needs; ``eval_batch_size``: questions
    per scoring batch (not in job keys: it changes no number); ``precision``:
    the plan adds it to the job (absent when ``auto``) and ``run`` receives
    it in its config dict.
    """

    # as the study config's: `epochs: true` is not 1 epoch, no inf/nan anywhere
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    name: str
    folds: list[str] | None = Field(None, min_length=1)
    controls: bool = True
    eval_batch_size: int = Field(128, ge=1)
    #: Overrides the study's ``precision`` for this attack (``fp16``: the paper's released RTT).
    precision: Literal["auto", "fp32", "bf16", "bf16-pure", "fp16"] | None = None

    #: Whether ``datasets[].t_sizes`` repeats this attack with a smaller T.
    varies_t: ClassVar[bool] = False
    #: One line for the report: what the attack trains on.
    title: ClassVar[str] = ""
    #: False for an attack that changes no weight by training (``icl``, ``quantize``): its
    #: records have one point per setting, in the lr slot, at epoch 1 and no training loss.
    trains: ClassVar[bool] = True

    @classmethod
    def from_job(cls, config: dict[str, Any]) -> Self:
        """This attack's settings from a job's stored config (which also holds seed and name)."""
        return cls.model_validate(
            {k: v for k, v in config.items() if k in cls.model_fields and k != "name"}
        )

    def resolved(self, seed: int, train_splits: int | None = None) -> dict[str, Any]:
        """The attack's own settings as stored in job keys and results (``run`` takes them)."""
        d = self.model_dump(exclude={"name", "folds", "controls", "eval_batch_size", "precision"})
        d["seed"] = seed
        return d


@dataclass
class AttackContext:
    """What every attack's ``run`` is given besides its own settings: one arm and its data.

    One object, so that a new attack's signature is ``run(config, ctx)`` and
    a new shared input is one field here, not a keyword added to every
    attack and caller.  ``model`` is one arm (unlearned, original or
    control; the caller plans the arms and loads them one at a time);
    ``folds``: the V splits to measure (None: every forget split);
    ``retain_questions``: evaluated after every setting (None: none);
    ``retain_dataset``: a separate retain dataset, for attacks that train on
    retain text; ``label`` names the arm in records and progress.
    """

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    dataset: Dataset
    scoring: ScoringConfig | None = None
    folds: Sequence[str] | None = None
    retain_questions: Sequence[MCQ] | None = None
    retain_dataset: Dataset | None = None
    label: str = "model"
    progress: bool = False
    log: Callable[[str], None] | None = None

    def scoring_or_default(self) -> ScoringConfig:
        """``scoring``, or the dataset's own (likelihood for a world, letters otherwise)."""
        if self.scoring is not None:
            return self.scoring
        from rtteval.stages.pretrain import scoring_for

        return scoring_for(self.dataset, batch_size=128)

    def say(self, msg: str) -> None:
        if self.log is not None:
            self.log(msg)


class Attack(Protocol):
    """One attack: its config type and ``run``, which attacks one model and restores it."""

    name: ClassVar[str]
    config_type: ClassVar[type[AttackConfig]]

    def run(self, config: dict[str, Any], ctx: AttackContext) -> ModelAttack:
        """Attack ``ctx.model`` on ``ctx.folds`` with ``config`` (``resolved()``'s dict + precision)."""
        ...


ATTACKS: dict[str, type[Attack]] = {}


def register_attack(name: str) -> Callable[[type[Any]], type[Any]]:
    """Class decorator: make an attack available as ``get_attack(name)`` and in ``attacks:``."""

    def deco(cls: type[Any]) -> type[Any]:
        if name in ATTACKS and ATTACKS[name] is not cls:
            raise ValueError(f"attack {name!r} registered twice")
        field = cls.config_type.model_fields.get("name")
        if field is None or field.default != name:
            raise TypeError(f"{cls.__name__}.config_type needs name: Literal[{name!r}] = {name!r}")
        cls.name = name
        ATTACKS[name] = cls
        return cls

    return deco


def get_attack(name: str) -> Attack:
    if name not in ATTACKS:
        raise ConfigError(f"unknown attack {name!r}; known: {', '.join(sorted(ATTACKS))}")
    return ATTACKS[name]()


def attack_adapter() -> TypeAdapter[Any]:
    """The registered config types as one pydantic union discriminated on ``name``."""
    types = tuple(a.config_type for a in ATTACKS.values())
    if len(types) == 1:
        return TypeAdapter(types[0])
    return TypeAdapter(Annotated[Union[types], Field(discriminator="name")])  # noqa: UP007
