"""Optional experiment tracking (W&B, trackio): off by default, a no-op unless asked for.

The store is the source of truth; a tracker only mirrors finished jobs'
metrics for dashboards, from the driver (workers never talk to it, so a
cluster needs credentials on one machine only).
"""

from __future__ import annotations

from typing import Any

from rtteval.config.study import LoggingSpec
from rtteval.errors import ConfigError


def _flat(d: dict[str, Any], prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, int | float):
            out[f"{prefix}/{k}"] = float(v)
    return out


class Tracker:
    """Mirrors job metrics to W&B and/or trackio; does nothing when both are off."""

    def __init__(self, spec: LoggingSpec, study: str, config: dict[str, Any]) -> None:
        self.runs: list[Any] = []
        for name, on in (("wandb", spec.wandb), ("trackio", spec.trackio)):
            if not on:
                continue
            try:
                mod = __import__(name)
            except ImportError:
                raise ConfigError(
                    f"logging.{name} is true but {name} is not installed "
                    f"(pip install {'rtteval[wandb]' if name == 'wandb' else name})",
                    field=f"logging.{name}",
                ) from None
            kwargs: dict[str, Any] = {"project": spec.project, "name": study, "config": config}
            if name == "wandb" and spec.entity:
                kwargs["entity"] = spec.entity
            self.runs.append((mod, mod.init(**kwargs)))
        self._step = 0

    @property
    def enabled(self) -> bool:
        return bool(self.runs)

    def log_job(self, stage: str, name: str, status: str, metrics: dict[str, Any] | None) -> None:
        if not self.runs:
            return
        self._step += 1
        row = {f"{stage}/done": 1.0 if status == "done" else 0.0, **_flat(metrics or {}, stage)}
        for mod, _run in self.runs:
            mod.log(row, step=self._step)

    def finish(self) -> None:
        for mod, _run in self.runs:
            mod.finish()
        self.runs = []
