"""The base of every settings model: a stage's config, and the study config that embeds it.

strict: ``epochs: true`` is not 1 epoch and ``epochs: 1e23`` is not an int;
``extra="forbid"``: a typo'd key is an error, not a silently ignored setting;
no inf/nan anywhere (a learning rate of .inf passes every ``gt=0``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

#: Training precision of every stage (:data:`rtteval.training.precision.PRECISIONS`,
#: docs/performance.md).
Precision = Literal["auto", "fp32", "bf16", "bf16-pure", "fp16"]


class StrictModel(BaseModel):
    """Settings validated strictly, so a YAML key, a ``key=value`` and a flag mean one thing."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
