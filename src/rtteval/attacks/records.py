"""The result records every attack returns and report, findings and the runner read.

One :class:`ModelAttack` per attacked model: per fold V (:class:`FoldAttack`)
the evaluation before any training and, per learning rate, a
:class:`RunResult` with one :class:`EpochEval` per epoch.  The schema is the
attack's, not RTT's: any attack that fine-tunes over an lr x epoch grid and
measures V after every epoch returns these (``docs/results-schema.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rtteval.analysis.metrics import CurvePoint

# --------------------------------------------------------------------------- results


def _bits(xs: Sequence[bool] | None) -> str | None:
    return None if xs is None else "".join("1" if x else "0" for x in xs)


def _unbits(s: str | None) -> list[bool] | None:
    return None if s is None else [c == "1" for c in s]


@dataclass
class EpochEval:
    """Accuracies after ``epoch`` epochs of the attack (0: before), with per-question correctness."""

    epoch: int
    v_acc: float
    v_correct: list[bool]
    holdout_acc: float | None = None
    holdout_correct: list[bool] | None = None
    retain_acc: float | None = None
    loss: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "v_acc": self.v_acc,
            "holdout_acc": self.holdout_acc,
            "retain_acc": self.retain_acc,
            "loss": self.loss,
            "v_correct": _bits(self.v_correct),
            "holdout_correct": _bits(self.holdout_correct),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EpochEval:
        return cls(
            epoch=int(d["epoch"]),
            v_acc=float(d["v_acc"]),
            v_correct=_unbits(d["v_correct"]) or [],
            holdout_acc=d.get("holdout_acc"),
            holdout_correct=_unbits(d.get("holdout_correct")),
            retain_acc=d.get("retain_acc"),
            loss=d.get("loss"),
        )


@dataclass
class StepEval:
    """V after ``step`` optimizer steps (``tokens`` trained on): one point of a budget curve.

    Recorded every ``eval_every_steps`` steps and at every epoch's end when
    that setting is on, so recovery can be read against the attacker's budget.
    """

    step: int
    tokens: int
    v_acc: float
    v_correct: list[bool]

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "v_acc": self.v_acc,
                "v_correct": _bits(self.v_correct)}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepEval:
        return cls(
            int(d["step"]), int(d["tokens"]), float(d["v_acc"]), _unbits(d["v_correct"]) or []
        )


@dataclass
class RunResult:
    """One (fold, learning rate, replicate) fine-tuning run: its curve, epoch 1 onwards."""

    lr: float
    status: str
    epochs: list[EpochEval]
    steps: int = 0
    wall_time: float = 0.0
    message: str = ""
    replicate: int = 0
    #: The budget curve (``eval_every_steps``); empty when V was evaluated per epoch only.
    curve: list[StepEval] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = {
            "lr": self.lr,
            "replicate": self.replicate,
            "status": self.status,
            "steps": self.steps,
            "wall_time": self.wall_time,
            "message": self.message,
            "epochs": [e.to_dict() for e in self.epochs],
        }
        if self.curve:  # absent without eval_every_steps: results stay as they were
            d["curve"] = [c.to_dict() for c in self.curve]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunResult:
        return cls(
            lr=float(d["lr"]),
            status=d["status"],
            epochs=[EpochEval.from_dict(e) for e in d["epochs"]],
            steps=int(d.get("steps", 0)),
            wall_time=float(d.get("wall_time", 0.0)),
            message=d.get("message", ""),
            replicate=int(d.get("replicate", 0)),
            curve=[StepEval.from_dict(c) for c in d.get("curve") or []],
        )


@dataclass
class FoldAttack:
    """Everything measured on one fold of one model."""

    v: str
    t: list[str]
    question_ids: list[str]
    n_choices: list[int]
    before: EpochEval
    runs: list[RunResult]
    provenance: dict[str, Any] = field(default_factory=dict)

    def point(self, lr: float, epoch: int, replicate: int = 0) -> EpochEval | None:
        if epoch == 0:
            return self.before
        for r in self.runs:
            if r.lr == lr and r.replicate == replicate:
                for e in r.epochs:
                    if e.epoch == epoch:
                        return e
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": self.v,
            "t": self.t,
            "question_ids": self.question_ids,
            "n_choices": self.n_choices,
            "before": self.before.to_dict(),
            "runs": [r.to_dict() for r in self.runs],
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FoldAttack:
        return cls(
            v=d["v"],
            t=list(d["t"]),
            question_ids=list(d["question_ids"]),
            n_choices=[int(k) for k in d["n_choices"]],
            before=EpochEval.from_dict(d["before"]),
            runs=[RunResult.from_dict(r) for r in d["runs"]],
            provenance=d.get("provenance", {}),
        )


@dataclass
class ModelAttack:
    """One attack on one model over every fold and learning rate: the raw material of the report."""

    label: str
    dataset: str
    config: dict[str, Any]
    scoring: dict[str, Any]
    folds: list[FoldAttack]
    retain_before: float | None = None
    wall_time: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def lrs(self) -> list[float]:
        return [float(x) for x in self.config["lrs"]]

    @property
    def replicates(self) -> int:
        return int(self.config.get("replicates", 1))

    @property
    def question_ids(self) -> list[str]:
        return [q for f in self.folds for q in f.question_ids]

    def _points(self, lr: float, epoch: int) -> list[list[EpochEval | None]]:
        """``[replicate][fold]`` evaluations at one grid point (epoch 0: the shared "before")."""
        reps = 1 if epoch == 0 else self.replicates
        return [[f.point(lr, epoch, r) for f in self.folds] for r in range(reps)]

    @property
    def n_choices(self) -> list[int]:
        return [k for f in self.folds for k in f.n_choices]

    def grid(self) -> list[tuple[float, int]]:
        """(lr, epoch) points, epoch >= 1, that every fold and replicate reached.

        Diverged runs end early.
        """
        out = []
        for lr in self.lrs:
            for ep in range(1, int(self.config["epochs"]) + 1):
                if all(e is not None for evs in self._points(lr, ep) for e in evs):
                    out.append((lr, ep))
        return out

    def diverged_lrs(self) -> set[float]:
        """Learning rates whose run diverged on some fold (selection shares an lr over folds)."""
        return {r.lr for f in self.folds for r in f.runs if r.status == "diverged"}

    def curve_points(self, *, include_before: bool = False) -> list[CurvePoint]:
        """Pooled over folds: V (and held-out) accuracy over all their questions at each point.

        Every epoch of a learning rate that diverged on any fold is marked
        ``diverged`` (epoch 0, the model before the attack, never is), which keeps it
        out of selection: the evaluations before the blow-up are of a run
        the attacker would have discarded.
        With replicates, each accuracy is their mean.
        """
        pts = []
        bad = self.diverged_lrs()
        keys = self.grid()
        if include_before:
            keys = [(lr, 0) for lr in self.lrs] + keys
        for lr, ep in keys:
            evs = [e for rep in self._points(lr, ep) for e in rep]
            v = self.correct_at(lr, ep)
            hs = [e.holdout_correct for e in evs if e is not None and e.holdout_correct]
            h = float(np.concatenate([np.asarray(x, float) for x in hs]).mean()) if hs else None
            rs = [e.retain_acc for e in evs if e is not None and e.retain_acc is not None]
            pts.append(
                CurvePoint(
                    lr, ep, float(v.mean()), h, float(np.mean(rs)) if rs else None,
                    diverged=ep > 0 and lr in bad,
                )
            )  # fmt: skip
        return pts

    def correct_at(self, lr: float, epoch: int) -> np.ndarray:
        """0/1 correctness on all V questions (folds concatenated) at one grid point.

        With replicates, the mean over them (a fraction per question).
        """
        return self.correct_grid([(lr, epoch)]).mean(axis=0)[0]

    def correct_grid(self, grid: Sequence[tuple[float, int]]) -> np.ndarray:
        """Correctness ``[replicates, len(grid), questions]`` (epoch 0 repeated per replicate)."""
        out = np.zeros((self.replicates, len(grid), len(self.question_ids)))
        for gi, (lr, epoch) in enumerate(grid):
            for ri in range(self.replicates):
                evs = [f.point(lr, epoch, 0 if epoch == 0 else ri) for f in self.folds]
                if any(e is None for e in evs):
                    raise KeyError(
                        f"{self.label}: no evaluation at lr={lr}, epoch={epoch}, replicate {ri} "
                        "in every fold"
                    )
                out[ri, gi] = np.concatenate([np.asarray(e.v_correct, float) for e in evs])  # type: ignore[union-attr]
        return out

    def retain_at(self, lr: float, epoch: int) -> float | None:
        if epoch == 0:
            return self.retain_before
        rs = [
            e.retain_acc
            for rep in self._points(lr, epoch)
            for e in rep
            if e is not None and e.retain_acc is not None
        ]
        return float(np.mean(rs)) if rs else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "dataset": self.dataset,
            "config": self.config,
            "scoring": self.scoring,
            "retain_before": self.retain_before,
            "wall_time": self.wall_time,
            "meta": self.meta,
            "folds": [f.to_dict() for f in self.folds],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelAttack:
        return cls(
            label=d["label"],
            dataset=d["dataset"],
            config=d["config"],
            scoring=d.get("scoring", {}),
            folds=[FoldAttack.from_dict(f) for f in d["folds"]],
            retain_before=d.get("retain_before"),
            wall_time=float(d.get("wall_time", 0.0)),
            meta=d.get("meta", {}),
        )
