"""The paper's findings in miniature, from a study's results.json alone.

:func:`analyze` turns a results dict (``docs/results-schema.md``, possibly
several datasets merged by :func:`rtteval.analysis.report.merge_results`) into five
tables:

1. ``finding1`` — facts learned in **pretraining**: per method, before and
   after RTT, ceiling, floor and recovery, both selection rules.
2. ``finding2`` — facts learned in a later **fine-tuning** phase: the same
   table, and per method the difference in recovery between the regimes with
   a bootstrap CI and a verdict.
3. ``controls`` — is the never-learned control's Control+RTT at chance (the
   floor), and where is the ceiling Original+RTT.
4. ``train_size`` — recovery against how many splits T had.
5. ``steps`` — V accuracy and recovery against the number of RTT steps.

Each dataset of the results is described by its ``base_dataset`` (the world
its facts come from), ``regime`` (``pretrained`` / ``finetuned``) and
``train_splits`` (|T|).  :func:`~rtteval.analysis.report.build_results` records them
on every ``summary`` entry (the runner passes ``base_dataset`` and
``regime``); results written before it did fall back to
``regime="pretrained"``, ``base_dataset`` = the dataset label and |T| = the
length of the folds' ``t`` lists (``n_folds - 1`` for a full T).  Which
fields fell back is listed under ``datasets[].fallback``, so a reader knows
what was assumed.

Attack records are matched to their dataset by position (each dataset's
block starts with its originals), not by the record's ``dataset`` field,
which is the data directory's name and is the same for "world" and
"world-ft".

Only tables and facts are produced here: the verdicts are mechanical
functions of the CIs, never hard-coded conclusions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rtteval.analysis.metrics import (
    CI_LEVEL,
    N_BOOT,
    Arm,
    boot_means,
    bootstrap_mean_ci,
    bootstrap_recovery_ci,
    hierarchical_bootstrap,
    percentile_ci,
    recovery,
    select_optimistic,
)
from rtteval.analysis.report import Picked, clean_json, fmt, fmt_ci, load_results, md_table
from rtteval.atomic import write_json_atomic, write_text_atomic
from rtteval.attacks.records import ModelAttack

SCHEMA = "rtteval-findings"
SCHEMA_VERSION = 1
PRETRAINED, FINETUNED = "pretrained", "finetuned"
RULES = ("optimistic", "honest")
FINDINGS_FILES = (
    "findings.json",
    "findings.md",
    "fig_findings_recovery.png",
    "fig_findings_train_size.png",
    "fig_findings_steps.png",
)
VERDICT_LESS = "finetuned facts recover less (agrees with the paper)"
VERDICT_MORE = "finetuned facts recover more (disagrees with the paper)"
VERDICT_SAME = "no clear difference (CI of the difference includes 0)"
VERDICT_UNDEFINED = "undefined (recovery or its CI is missing in a regime)"
DIFF_CI_METHOD = (
    "hierarchical percentile bootstrap (seeds, then folds, then questions and RTT replicates); "
    "the optimistic attacker's (lr, epoch) is chosen again in every resample and scored on an "
    "independent draw, the honest one's is held fixed; within a regime questions are drawn "
    "jointly for Unlearned+RTT and Original+RTT and seeds per model (jointly when each seed is "
    "its own world); across regimes the draws are shared when both score the same facts "
    "(`resampling`: same questions / paired worlds), else independent"
)
_RULE_KEYS = (
    "original_rtt",
    "unlearned_rtt",
    "control_rtt",
    "recovery",
    "recovery_raw",
    "recovery_floor",
)


# --------------------------------------------------------------------------- datasets


@dataclass
class DatasetInfo:
    """What a dataset label stands for: its world, regime and |T|, and which of those were assumed."""

    dataset: str
    base_dataset: str
    regime: str
    train_splits: int
    n_splits: int
    chance: float
    fallback: list[str] = field(default_factory=list)

    @property
    def full(self) -> bool:
        """T had every split but V (the paper's setting)."""
        return self.train_splits >= self.n_splits - 1


@dataclass
class _Group:
    """One dataset's attacks by role, seeds in seed_index order."""

    original: list[ModelAttack] = field(default_factory=list)
    control: list[ModelAttack] = field(default_factory=list)
    methods: dict[str, list[ModelAttack]] = field(default_factory=dict)


def _attack_blocks(results: Mapping[str, Any]) -> list[list[dict[str, Any]]]:
    """Attack records cut into one block per build_results call.

    build_results lists a dataset's originals first and merge_results
    concatenates datasets, so a block starts wherever an ``original`` follows
    a non-original.  Records written since 2026-11-28 carry the summary label
    in ``dataset``; results.json files written before hold the data
    directory's name there ("world" and "world-ft" may both say "data"), so
    the blocks, not the field, are what works for both.
    """
    blocks: list[list[dict[str, Any]]] = []
    prev = None
    for rec in results.get("attacks", []):
        if rec.get("role") == "original" and prev != "original":
            blocks.append([])
        if blocks:
            blocks[-1].append(rec)
        prev = rec.get("role")
    return blocks


def _group_records(recs: Sequence[dict[str, Any]]) -> _Group:
    g = _Group()
    for rec in sorted(recs, key=lambda r: int(r.get("seed_index") or 0)):
        a = ModelAttack.from_dict(rec)
        if rec.get("role") == "original":
            g.original.append(a)
        elif rec.get("role") == "control":
            g.control.append(a)
        else:
            g.methods.setdefault(str(rec.get("method")), []).append(a)
    return g


def _records_by_dataset(results: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Attack records per summary dataset label (blocks in ``datasets`` order, else by record)."""
    labels = list(results.get("datasets") or [])
    blocks = _attack_blocks(results)
    if blocks and len(blocks) == len(labels) and len(set(labels)) == len(labels):
        return dict(zip(labels, blocks, strict=True))
    out: dict[str, list[dict[str, Any]]] = {}
    for rec in results.get("attacks", []):
        out.setdefault(str(rec.get("dataset")), []).append(rec)
    return out


def _fold_t_sizes(results: Mapping[str, Any], label: str) -> list[int]:
    return [len(f.get("t") or []) for f in results.get("folds", []) if f.get("dataset") == label]


def _first(*vals: Any) -> Any:
    return next((v for v in vals if v is not None), None)


def _info(e: Mapping[str, Any], rec: Mapping[str, Any], t_sizes: list[int]) -> DatasetInfo:
    """One label's info from its summary entry, else its first attack record, else assumed."""
    label = e["dataset"]
    n_folds = int(e.get("n_folds") or len(e.get("folds") or []) or 1)
    assumed = {
        "base_dataset": label,
        "regime": PRETRAINED,
        "train_splits": max(t_sizes) if t_sizes else n_folds - 1,
    }
    got = {k: _first(e.get(k), rec.get(k)) for k in assumed}
    return DatasetInfo(
        dataset=label,
        base_dataset=str(_first(got["base_dataset"], assumed["base_dataset"])),
        regime=str(_first(got["regime"], assumed["regime"])),
        train_splits=int(_first(got["train_splits"], assumed["train_splits"])),
        n_splits=max([n_folds, *(t + 1 for t in t_sizes)]),
        chance=float(e["chance"]),
        fallback=[k for k, v in got.items() if v is None],
    )


def dataset_infos(results: Mapping[str, Any]) -> dict[str, DatasetInfo]:
    """Every summary dataset label with its base dataset, regime and |T| (recorded or assumed).

    Whether T was full is judged against the number of forget splits of the
    label's world: the most any of its datasets shows (n_folds, or 1 + |T|).
    """
    recs = _records_by_dataset(results)
    infos: dict[str, DatasetInfo] = {}
    for e in results["summary"]:
        if e["dataset"] not in infos:
            rec = (recs.get(e["dataset"]) or [{}])[0]
            infos[e["dataset"]] = _info(e, rec, _fold_t_sizes(results, e["dataset"]))
    for info in infos.values():
        same = [i for i in infos.values() if i.base_dataset == info.base_dataset]
        info.n_splits = max(max(i.n_splits for i in same), info.train_splits + 1)
    return infos


# --------------------------------------------------------------------------- table rows


def _rule_block(block: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The after-RTT numbers of one selection rule, with CIs and chosen points."""
    if not block:
        return None
    out: dict[str, Any] = {}
    for k in _RULE_KEYS:
        out[k] = block.get(k)
        out[f"{k}_ci"] = block.get(f"{k}_ci")
    out["chosen"] = block.get("chosen")
    return out


def _rules_of(e: Mapping[str, Any]) -> dict[str, dict[str, Any] | None]:
    return {"optimistic": _rule_block(e), "honest": _rule_block(e.get("honest"))}


def _row(e: Mapping[str, Any], info: DatasetInfo) -> dict[str, Any]:
    """One (dataset, method) row: identity, before-RTT numbers and both rules."""
    seeds = e.get("n_seeds") or {}
    return {
        "dataset": e["dataset"],
        "base_dataset": info.base_dataset,
        "regime": info.regime,
        "train_splits": info.train_splits,
        "method": e["method"],
        "chance": e["chance"],
        "n_questions": e.get("n_questions"),
        "n_seeds": seeds.get("unlearned", 1),
        "n_seeds_by_role": seeds,
        "original": e.get("original"),
        "original_ci": e.get("original_ci"),
        "unlearned": e.get("unlearned"),
        "unlearned_ci": e.get("unlearned_ci"),
        "control": e.get("control"),
        **_rules_of(e),
    }


def _regime_rows(
    results: Mapping[str, Any], infos: Mapping[str, DatasetInfo], regime: str
) -> list[dict[str, Any]]:
    return [
        _row(e, infos[e["dataset"]])
        for e in results["summary"]
        if infos[e["dataset"]].regime == regime and infos[e["dataset"]].full
    ]


# --------------------------------------------------------------------------- finding 2


@dataclass
class RecoveryArm:
    """One regime's side of the comparison, at each seed's selected (lr, epoch).

    ``u``, ``o``: U+RTT and O+RTT correctness ``[seeds, questions]``;
    ``u_ids``, ``o_ids``: each row's question ids (``None`` when a diverged
    seed was dropped, so rows no longer line up with seeds).
    """

    u: np.ndarray
    o: np.ndarray
    chance: float
    u_ids: list[list[str]] | None = None
    o_ids: list[list[str]] | None = None
    u_arm: Arm | None = None
    o_arm: Arm | None = None
    select_inside: bool = False

    @property
    def paired(self) -> bool:
        """One world per seed: row i of u and o is the same world, so seeds are drawn jointly."""
        return _paired_rows(self.u_ids, self.o_ids)


def _paired_rows(*rows: list[list[str]] | None) -> bool:
    """Seed rows with different questions, row i the same questions in every group."""
    if any(r is None for r in rows) or len({len(r) for r in rows}) != 1:  # type: ignore[arg-type]
        return False
    flat = [ids for r in rows for ids in r]  # type: ignore[union-attr]
    if all(ids == flat[0] for ids in flat):
        return False
    return all(r[i] == rows[0][i] for r in rows for i in range(len(r)))  # type: ignore[index,arg-type]


def resampling(pt: RecoveryArm, ft: RecoveryArm) -> str:
    """How the two regimes can be resampled together.

    ``"same questions"``: every row of both regimes scores the same facts
    (one world), so question draws are shared and seeds drawn per model;
    ``"paired worlds"``: seed i of both regimes is the same world (the
    runner's ``vary_with_seed`` with ``world`` and ``world-ft``), so
    question and seed draws are both shared; ``"independent"`` otherwise.
    Sharing keeps the between-regime correlation (a hard fact is hard in
    both), so the difference's CI is not inflated by question sampling.
    """
    rows = [pt.u_ids, pt.o_ids, ft.u_ids, ft.o_ids]
    if any(r is None for r in rows):
        return "independent"
    flat = [ids for r in rows for ids in r]  # type: ignore[union-attr]
    if all(ids == flat[0] for ids in flat):
        return "same questions"
    return "paired worlds" if _paired_rows(*rows) else "independent"


def _boot_arm(
    arm: RecoveryArm, q_idx: np.ndarray, s_idx: np.ndarray | None, rng: np.random.Generator
) -> np.ndarray:
    """Bootstrap recoveries of one regime (questions shared by U and O, as the report does)."""
    if s_idx is None and arm.paired:
        s_idx = rng.integers(0, arm.u.shape[0], size=(q_idx.shape[0], arm.u.shape[0]))
    ub = boot_means(arm.u, q_idx, rng, True, s_idx)
    ob = boot_means(arm.o, q_idx, rng, True, s_idx)
    den = ob - arm.chance
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, (ub - arm.chance) / np.where(den > 0, den, 1.0), np.nan)


def recovery_difference_ci(
    pretrained: RecoveryArm,
    finetuned: RecoveryArm,
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
    level: float = CI_LEVEL,
) -> tuple[tuple[float, float], str]:
    """CI of recovery(finetuned) − recovery(pretrained), and the resampling used.

    Percentile bootstrap with the selected (lr, epoch) held fixed.  Within a
    regime it is the report's (questions drawn jointly for U and O; seeds
    per model, or jointly when each seed is its own world).  Across regimes
    the draws are shared when :func:`resampling` shows both score the same
    facts, and independent otherwise (an independent draw ignores the
    positive correlation between the regimes and so can only widen the CI).
    """
    mode = resampling(pretrained, finetuned)
    arms = [pretrained.u_arm, pretrained.o_arm, finetuned.u_arm, finetuned.o_arm]
    if all(a is not None for a in arms):
        return _hierarchical_difference(pretrained, finetuned, mode, n_boot, seed, level), mode
    rng = np.random.default_rng(seed)
    n_pt, n_ft = pretrained.u.shape[1], finetuned.u.shape[1]
    q_pt = rng.integers(0, n_pt, size=(n_boot, n_pt))
    q_ft = q_pt if mode != "independent" else rng.integers(0, n_ft, size=(n_boot, n_ft))
    s_idx = None
    if mode == "paired worlds":
        s_idx = rng.integers(0, pretrained.u.shape[0], size=(n_boot, pretrained.u.shape[0]))
    diff = _boot_arm(finetuned, q_ft, s_idx, rng) - _boot_arm(pretrained, q_pt, s_idx, rng)
    return percentile_ci(diff, level), mode


def _hierarchical_difference(
    pt: RecoveryArm, ft: RecoveryArm, mode: str, n_boot: int, seed: int, level: float
) -> tuple[float, float]:
    """The difference's CI from :func:`rtteval.analysis.metrics.hierarchical_bootstrap`.

    Shared draws put all four arms in one call (paired seeds for paired
    worlds); independent regimes get one call each.
    """

    def rec(b: Mapping[str, np.ndarray], k: str, chance: float) -> np.ndarray:
        den = b[f"o_{k}"] - chance
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(den > 0, (b[f"u_{k}"] - chance) / np.where(den > 0, den, 1.0), np.nan)

    arms: dict[str, Arm] = {}
    inside: dict[str, bool] = {}
    for k, r in (("pt", pt), ("ft", ft)):
        for role, arm in (("u", r.u_arm), ("o", r.o_arm)):
            assert arm is not None
            arms[f"{role}_{k}"], inside[f"{role}_{k}"] = arm, r.select_inside
    if mode != "independent" and np.array_equal(arms["u_pt"].fold_of, arms["u_ft"].fold_of):
        paired = mode == "paired worlds"
        b = hierarchical_bootstrap(
            arms, paired=paired, seed=seed, n_boot=n_boot, select_inside=inside
        )
    else:
        b = {}
        for i, (k, r) in enumerate((("pt", pt), ("ft", ft))):
            sub = {n: a for n, a in arms.items() if n.endswith(k)}
            paired = r.paired and len({a.n_seeds for a in sub.values()}) == 1
            ins = {n: inside[n] for n in sub}
            b |= hierarchical_bootstrap(
                sub, paired=paired, seed=seed + i, n_boot=n_boot, select_inside=ins
            )
    return percentile_ci(rec(b, "ft", ft.chance) - rec(b, "pt", pt.chance), level)


def verdict(diff_ci: Sequence[float | None] | None) -> str:
    """Mechanical: the sign of the CI of recovery(finetuned) − recovery(pretrained)."""
    if not diff_ci or any(x is None or not math.isfinite(x) for x in diff_ci):
        return VERDICT_UNDEFINED
    lo, hi = float(diff_ci[0]), float(diff_ci[1])  # type: ignore[arg-type]
    if hi < 0:
        return VERDICT_LESS
    if lo > 0:
        return VERDICT_MORE
    return VERDICT_SAME


def _row_ids(atts: Sequence[ModelAttack], correct: np.ndarray) -> list[list[str]] | None:
    """Question ids per row of ``correct``, if its rows are still one per attack (seed)."""
    return [a.question_ids for a in atts] if correct.shape[0] == len(atts) else None


def _picked_arm(g: _Group | None, method: str, rule: str, chance: float) -> RecoveryArm | None:
    """U+RTT and O+RTT at each seed's selected point, exactly as build_results picks them."""
    if g is None or not g.original or method not in g.methods:
        return None
    u, o = Picked(g.methods[method], rule), Picked(g.original, rule)
    if u.correct is None or o.correct is None:
        return None
    return RecoveryArm(
        u.correct,
        o.correct,
        chance,
        _row_ids(g.methods[method], u.correct),
        _row_ids(g.original, o.correct),
        u.arm,
        o.arm,
        rule == "optimistic",
    )


def _compare_rule(
    pt: dict[str, Any],
    ft: dict[str, Any],
    groups: Mapping[str, _Group],
    rule: str,
    n_boot: int,
    seed: int,
) -> dict[str, Any] | None:
    """One method's pretrained vs finetuned recovery under one rule, with the difference's CI."""
    bp, bf = pt.get(rule), ft.get(rule)
    if not bp or not bf:
        return None
    rp, rf = bp.get("recovery"), bf.get("recovery")
    diff = rf - rp if rp is not None and rf is not None else None
    ci: tuple[float, float] | None = None
    mode = None
    ap = _picked_arm(groups.get(pt["dataset"]), pt["method"], rule, pt["chance"])
    af = _picked_arm(groups.get(ft["dataset"]), ft["method"], rule, ft["chance"])
    if diff is not None and ap is not None and af is not None:
        ci, mode = recovery_difference_ci(ap, af, n_boot=n_boot, seed=seed)
    return {
        "pretrained": rp,
        "pretrained_ci": bp.get("recovery_ci"),
        "finetuned": rf,
        "finetuned_ci": bf.get("recovery_ci"),
        "difference": diff,
        "difference_ci": None if ci is None else list(ci),
        "verdict": verdict(ci),
        "resampling": mode,
    }


def _same_facts(a: _Group | None, b: _Group | None) -> bool:
    """Both datasets score the same questions, seed by seed (e.g. world and world-ft on one world)."""
    if a is None or b is None or not a.original or not b.original:
        return False
    qa = [x.question_ids for x in a.original]
    qb = [x.question_ids for x in b.original]
    return qa == qb or all(q == qa[0] for q in [*qa, *qb])


def _comparisons(
    pt_rows: list[dict[str, Any]],
    ft_rows: list[dict[str, Any]],
    groups: Mapping[str, _Group],
    n_boot: int,
    seed: int,
) -> list[dict[str, Any]]:
    """Pair each finetuned row with the pretrained rows of its method on the same facts.

    Same facts = the same ``base_dataset`` or the same question ids (the
    runner's "world" and "world-ft" are separate dataset entries on one
    world).  A method with no such pretrained row is compared with every
    pretrained row of that method (different facts, as the paper compares
    Years with Random Birthdays); ``same_facts`` records which it was.
    """
    out = []
    for i, ft in enumerate(ft_rows):
        cands = [r for r in pt_rows if r["method"] == ft["method"]]
        same = [
            r
            for r in cands
            if r["base_dataset"] == ft["base_dataset"]
            or _same_facts(groups.get(r["dataset"]), groups.get(ft["dataset"]))
        ]
        for pt in same or cands:
            out.append(
                {
                    "method": ft["method"],
                    "pretrained_dataset": pt["dataset"],
                    "finetuned_dataset": ft["dataset"],
                    "same_facts": bool(same),
                    **{
                        rule: _compare_rule(pt, ft, groups, rule, n_boot, seed + i)
                        for rule in RULES
                    },
                }
            )
    return out


# --------------------------------------------------------------------------- controls, |T|


def _floor(block: Mapping[str, Any] | None, chance: float) -> dict[str, Any] | None:
    """Control+RTT against chance, and the ceiling, under one rule."""
    if not block:
        return None
    c, ci = block.get("control_rtt"), block.get("control_rtt_ci")
    if c is None:
        where = "no control"
    elif not ci or ci[0] is None:
        where = "no CI"
    elif ci[0] > chance:
        where = "above chance"
    elif ci[1] < chance:
        where = "below chance"
    else:
        where = "at chance (CI includes chance)"
    return {
        "control_rtt": c,
        "control_rtt_ci": ci,
        "control_rtt_minus_chance": None if c is None else c - chance,
        "floor": where,
        "original_rtt": block.get("original_rtt"),
        "original_rtt_ci": block.get("original_rtt_ci"),
    }


def _controls(results: Mapping[str, Any], infos: Mapping[str, DatasetInfo]) -> dict[str, Any]:
    """One row per dataset (the control and original are shared by its methods)."""
    rows = []
    for label, info in infos.items():
        e = next(s for s in results["summary"] if s["dataset"] == label)
        rows.append(
            {
                "dataset": label,
                "base_dataset": info.base_dataset,
                "regime": info.regime,
                "train_splits": info.train_splits,
                "full_t": info.full,
                "chance": info.chance,
                "control": e.get("control"),
                "original": e.get("original"),
                "optimistic": _floor(e, info.chance),
                "honest": _floor(e.get("honest"), info.chance),
            }
        )
    return {"rows": rows}


def _train_size(results: Mapping[str, Any], infos: Mapping[str, DatasetInfo]) -> dict[str, Any]:
    """Recovery vs |T|: every (world, regime, method) row, sorted by |T|."""
    rows = [{**_row(e, infos[e["dataset"]]), "full_t": infos[e["dataset"]].full}
            for e in results["summary"]]  # fmt: skip
    rows.sort(key=lambda r: (r["base_dataset"], r["regime"] != PRETRAINED, r["regime"],
                             r["method"], r["train_splits"]))  # fmt: skip
    for r in rows:
        for k in ("original", "original_ci", "unlearned", "unlearned_ci", "n_seeds_by_role"):
            r.pop(k, None)
    return {"rows": rows}


# --------------------------------------------------------------------------- steps


def steps_per_epoch(attacks: Sequence[ModelAttack]) -> float | None:
    """Optimizer steps per RTT epoch: each run's ``steps`` over its epochs, averaged over runs.

    Folds may differ slightly (T's size varies), so this is the mean over
    every run with recorded steps; ``None`` when no run recorded any.
    """
    per = [
        r.steps / len(r.epochs)
        for a in attacks
        for f in a.folds
        for r in f.runs
        if r.steps > 0 and r.epochs
    ]
    return float(np.mean(per)) if per else None


def _best_at_epoch(
    attacks: Sequence[ModelAttack], epoch: int
) -> tuple[list[float | None], np.ndarray | None]:
    """Per seed: the lr with the best pooled V accuracy at exactly ``epoch``, and correctness there."""
    lrs: list[float | None] = []
    rows = []
    for a in attacks:
        p = select_optimistic([q for q in a.curve_points() if q.epoch == epoch])
        lrs.append(None if p is None else p.lr)
        if p is not None:
            rows.append(a.correct_at(p.lr, p.epoch))
    return lrs, (np.stack(rows) if rows else None)


def _roles(g: _Group) -> list[tuple[str, str | None, list[ModelAttack]]]:
    out: list[tuple[str, str | None, list[ModelAttack]]] = [("original", None, g.original)]
    if g.control:
        out.append(("control", None, g.control))
    out += [("unlearned", m, atts) for m, atts in g.methods.items()]
    return out


def _step_row(
    info: DatasetInfo,
    role: str,
    method: str | None,
    atts: Sequence[ModelAttack],
    epoch: int,
    o: np.ndarray | None,
    o_ids: list[list[str]] | None,
    boot: tuple[int, int],
) -> dict[str, Any]:
    """One role at one epoch: its best-lr V accuracy and, against the original there, recovery."""
    n_boot, seed = boot
    lrs, x = _best_at_epoch(atts, epoch)
    spe = steps_per_epoch(atts)
    row: dict[str, Any] = {
        "dataset": info.dataset, "base_dataset": info.base_dataset, "regime": info.regime,
        "role": role, "method": method, "label": method or role, "epoch": epoch,
        "steps_per_epoch": spe, "steps": None if spe is None else epoch * spe, "lrs": lrs,
        "n_seeds": len(atts), "chance": info.chance, "v_acc": None, "v_acc_ci": None,
        "recovery": None, "recovery_ci": None,
    }  # fmt: skip
    if x is None:
        return row
    row["v_acc"] = float(x.mean())
    row["v_acc_ci"] = list(bootstrap_mean_ci(x, n_boot=n_boot, seed=seed))
    if role != "original" and o is not None:
        row["recovery"] = recovery(float(x.mean()), float(o.mean()), info.chance)
        paired = _paired_rows(_row_ids(atts, x), o_ids)
        cis = bootstrap_recovery_ci(
            x, o, info.chance, n_boot=n_boot, seed=seed, paired_seeds=paired
        )
        row["recovery_ci"] = list(cis["recovery"])
    return row


def _steps_rows(info: DatasetInfo, g: _Group, n_boot: int, seed: int) -> list[dict[str, Any]]:
    """Every role's V accuracy (and recovery) at each epoch's best lr, for one dataset."""
    if not g.original:
        return []
    n_epochs = max(int(a.config.get("epochs", 0)) for a in g.original)
    rows = []
    for e in range(1, n_epochs + 1):
        _, o = _best_at_epoch(g.original, e)
        o_ids = None if o is None else _row_ids(g.original, o)
        for role, method, atts in _roles(g):
            rows.append(_step_row(info, role, method, atts, e, o, o_ids, (n_boot, seed + e)))
    return rows


# --------------------------------------------------------------------------- analyze


def analyze(
    results: Mapping[str, Any], *, n_boot: int | None = None, seed: int | None = None
) -> dict[str, Any]:
    """The five findings tables (see the module docstring) as a plain JSON-able dict.

    ``n_boot`` and ``seed`` default to the results' own bootstrap settings,
    so the new CIs (difference of recoveries, per-step numbers) are
    comparable with the report's.
    """
    # the findings are RTT's: rows of other attacks (retain-only relearning, ...) are not T's effect
    results = {**results, "summary": [e for e in results["summary"]
                                      if (e.get("attack") or "rtt") == "rtt"]}  # fmt: skip
    boot = (results.get("config") or {}).get("bootstrap") or {}
    n_boot = int(n_boot if n_boot is not None else boot.get("n_boot", N_BOOT))
    seed = int(seed if seed is not None else boot.get("seed", 0))
    infos = dataset_infos(results)
    recs = _records_by_dataset(results)
    groups = {label: _group_records(recs.get(label, [])) for label in infos}
    pt_rows = _regime_rows(results, infos, PRETRAINED)
    ft_rows = _regime_rows(results, infos, FINETUNED)
    steps = [
        r
        for i, (label, info) in enumerate(infos.items())
        if info.full
        for r in _steps_rows(info, groups[label], n_boot, seed + 100 * i)
    ]
    out = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "source": {
            "created": results.get("created"),
            "rtteval_version": results.get("rtteval_version"),
            "datasets": list(infos),
        },
        "bootstrap": {"n_boot": n_boot, "level": CI_LEVEL, "seed": seed},
        "datasets": [{**asdict(i), "full_t": i.full} for i in infos.values()],
        "finding1": {"regime": PRETRAINED, "rows": pt_rows},
        "finding2": {
            "regime": FINETUNED,
            "rows": ft_rows,
            "comparison": _comparisons(pt_rows, ft_rows, groups, n_boot, seed),
            "difference": "recovery(finetuned) - recovery(pretrained)",
            "ci_method": DIFF_CI_METHOD,
        },
        "controls": _controls(results, infos),
        "train_size": _train_size(results, infos),
        "steps": {
            "selection": "per seed, the lr with the best V accuracy pooled over folds at exactly "
            "this epoch (optimistic); recovery uses the original's accuracy at the same epoch",
            "rows": steps,
        },
    }
    return clean_json(out)


# --------------------------------------------------------------------------- markdown


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    """The report's table, with ``|`` escaped: labels such as "world |T|=1" would split cells."""
    esc = [[c.replace("|", "\\|") for c in r] for r in [headers, *rows]]
    return md_table(esc[0], esc[1:])


def _rules_present(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return [rule for rule in RULES if any(r.get(rule) for r in rows)]


def _name(r: Mapping[str, Any], multi: bool) -> str:
    """A method's name in a sentence, with its dataset when several datasets are in play."""
    m = r.get("method") or r.get("label") or "?"
    return f"{m} ({r['dataset']})" if multi else str(m)


def _ci_of(block: Mapping[str, Any] | None, key: str) -> str:
    if not block:
        return "—"
    return fmt_ci(block.get(key), block.get(f"{key}_ci"))


def _excludes_zero(ci: Sequence[float | None] | None) -> bool:
    return bool(ci) and ci[0] is not None and ci[1] is not None and (ci[0] > 0 or ci[1] < 0)  # type: ignore[index,operator]


def _regime_sentences(rows: Sequence[Mapping[str, Any]], regime: str) -> list[str]:
    """Range of recovery over methods, and how many CIs exclude 0, per rule."""
    if not rows:
        return [f"No dataset with regime '{regime}' and a full T in these results."]
    multi = len({r["dataset"] for r in rows}) > 1
    out = []
    for rule in _rules_present(rows):
        rec = [
            (r[rule]["recovery"], r)
            for r in rows
            if r.get(rule) and r[rule]["recovery"] is not None
        ]
        if not rec:
            out.append(f"{rule.capitalize()} attacker: recovery is undefined for every method.")
            continue
        lo, hi = min(rec, key=lambda x: x[0]), max(rec, key=lambda x: x[0])
        n_ex = sum(_excludes_zero(r[rule].get("recovery_ci")) for _, r in rec)
        span = (
            f"recovery is {lo[0]:.2f} ({_name(lo[1], multi)})"
            if len(rec) == 1
            else f"recovery ranges from {lo[0]:.2f} ({_name(lo[1], multi)}) "
            f"to {hi[0]:.2f} ({_name(hi[1], multi)})"
        )
        out.append(
            f"{rule.capitalize()} attacker: {span}; its 95% CI excludes 0 for {n_ex} of "
            f"{len(rec)} method(s)."
        )
    return out


def _regime_table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return ""
    body = []
    for r in rows:
        for rule in _rules_present(rows):
            b = r.get(rule)
            if not b:
                continue
            body.append(
                [
                    r["dataset"],
                    r["method"],
                    rule,
                    str(r["n_seeds"]),
                    fmt(r["chance"]),
                    fmt_ci(r["original"], r.get("original_ci")),
                    fmt_ci(r["unlearned"], r.get("unlearned_ci")),
                    _ci_of(b, "original_rtt"),
                    _ci_of(b, "unlearned_rtt"),
                    _ci_of(b, "control_rtt"),
                    _ci_of(b, "recovery"),
                    _ci_of(b, "recovery_floor"),
                ]
            )
    return _md_table(
        ["dataset", "method", "selection", "seeds", "chance", "Original", "Unlearned",
         "Original+RTT (ceiling)", "Unlearned+RTT", "Control+RTT (floor)", "recovery",
         "floor-adj. recovery"],
        body,
    )  # fmt: skip


def _comparison_md(comps: Sequence[Mapping[str, Any]]) -> list[str]:
    if not comps:
        return ["No method has both a pretrained and a finetuned dataset with a full T."]
    multi = len({c["method"] for c in comps}) < len(comps)
    body, says = [], []
    for c in comps:
        pair = f"{c['pretrained_dataset']} vs {c['finetuned_dataset']}"
        who = f"{c['method']} ({pair})" if multi else c["method"]
        for rule in RULES:
            b = c.get(rule)
            if not b:
                continue
            body.append(
                [c["method"], c["pretrained_dataset"], c["finetuned_dataset"],
                 "yes" if c["same_facts"] else "no", rule,
                 fmt_ci(b["pretrained"], b.get("pretrained_ci")),
                 fmt_ci(b["finetuned"], b.get("finetuned_ci")),
                 fmt_ci(b["difference"], b.get("difference_ci")), b["verdict"],
                 b.get("resampling") or "—"]
            )  # fmt: skip
            if b["difference"] is not None:
                says.append(
                    f"{who}, {rule}: recovery {fmt(b['pretrained'], 2)} pretrained vs "
                    f"{fmt(b['finetuned'], 2)} finetuned, difference "
                    f"{fmt_ci(b['difference'], b.get('difference_ci'))}: {b['verdict']}."
                )
    table = _md_table(
        ["method", "pretrained", "finetuned", "same facts", "selection", "recovery pretrained",
         "recovery finetuned", "difference (ft − pt)", "verdict", "resampling"],
        body,
    )  # fmt: skip
    return [table, "", *[f"- {s}" for s in says]]


def _controls_md(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    body, n_at, n_all, off = [], 0, 0, []
    for r in rows:
        for rule in RULES:
            b = r.get(rule)
            if not b:
                continue
            body.append(
                [r["dataset"], r["regime"], str(r["train_splits"]), rule, fmt(r["chance"]),
                 fmt(r.get("control")), _ci_of(b, "control_rtt"), b["floor"],
                 _ci_of(b, "original_rtt")]
            )  # fmt: skip
            if b["control_rtt"] is not None:
                n_all += 1
                n_at += b["floor"].startswith("at chance")
                if not b["floor"].startswith("at chance"):
                    off.append(f"{r['dataset']} ({rule}: {b['floor']})")
    table = _md_table(
        ["dataset", "regime", "|T|", "selection", "chance", "Control", "Control+RTT",
         "floor", "Original+RTT (ceiling)"],
        body,
    )  # fmt: skip
    if n_all == 0:
        say = "No never-learned control in these results: the floor is unmeasured."
    else:
        say = f"Control+RTT's 95% CI includes chance in {n_at} of {n_all} (dataset, rule) cases"
        say += f"; not in: {', '.join(off)}." if off else "."
    return [say, "", table]


def _train_size_md(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    body = []
    series: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        series.setdefault((r["base_dataset"], r["regime"], r["method"]), []).append(r)
        for rule in _rules_present(rows):
            b = r.get(rule)
            if b:
                body.append(
                    [r["base_dataset"], r["regime"], r["method"], str(r["train_splits"]), rule,
                     _ci_of(b, "unlearned_rtt"), _ci_of(b, "original_rtt"),
                     _ci_of(b, "control_rtt"), _ci_of(b, "recovery")]
                )  # fmt: skip
    says = []
    for (base, regime, method), rs in series.items():
        pts = [(r["train_splits"], r["optimistic"]["recovery"]) for r in rs if r.get("optimistic")]
        pts = [p for p in pts if p[1] is not None]
        if len({k for k, _ in pts}) < 2:
            continue
        seq = ", ".join(f"{v:.2f} at |T|={k}" for k, v in pts)
        says.append(f"{method} ({base}, {regime}), optimistic: recovery {seq}.")
    if not says:
        says = ["Only one size of T per method in these results: no recovery-vs-|T| curve."]
    table = _md_table(
        ["world", "regime", "method", "|T|", "selection", "Unlearned+RTT", "Original+RTT",
         "Control+RTT", "recovery"],
        body,
    )  # fmt: skip
    return [*[f"- {s}" for s in says], "", table]


def _steps_md(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    if not rows:
        return ["No attack curves in these results (results.json without `attacks`)."]
    out = []
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        rs = [r for r in rows if r["dataset"] == ds]
        last = max(r["epoch"] for r in rs)
        parts = []
        for label in dict.fromkeys(r["label"] for r in rs):
            first = next(r for r in rs if r["label"] == label and r["epoch"] == 1)
            end = next(r for r in rs if r["label"] == label and r["epoch"] == last)
            key = "v_acc" if first["role"] == "original" else "recovery"
            what = "V accuracy" if key == "v_acc" else "recovery"
            parts.append(f"{label} {what} {fmt(first[key], 2)} → {fmt(end[key], 2)}")
        out.append(f"**{ds}** ({rs[0]['regime']}), epoch 1 → {last}: " + "; ".join(parts) + ".")
        out.append("")
        out.append(
            _md_table(
                ["role", "epoch", "steps", "lr (per seed)", "V accuracy", "recovery"],
                [[r["label"], str(r["epoch"]), fmt(r["steps"], 0),
                  ", ".join("—" if x is None else f"{x:g}" for x in r["lrs"]),
                  fmt_ci(r["v_acc"], r.get("v_acc_ci")), fmt_ci(r["recovery"], r.get("recovery_ci"))]
                 for r in rs],
            )
        )  # fmt: skip
        out.append("")
    return out


def _datasets_md(infos: Sequence[Mapping[str, Any]]) -> str:
    return _md_table(
        ["dataset", "world", "regime", "|T|", "full T", "assumed (not recorded)"],
        [[i["dataset"], i["base_dataset"], i["regime"], str(i["train_splits"]),
          "yes" if i["full_t"] else "no", ", ".join(i["fallback"]) or "—"] for i in infos],
    )  # fmt: skip


def render_markdown(findings: Mapping[str, Any]) -> str:
    """findings.md: one section per finding, a generated factual summary, then its table."""
    f1, f2 = findings["finding1"], findings["finding2"]
    out = [
        "# RTT findings",
        "",
        "The paper's findings in miniature, computed from results.json. **Recovery** = "
        "(Unlearned+RTT − chance) / (Original+RTT − chance); **floor-adj. recovery** = "
        "(Unlearned+RTT − Control+RTT) / (Original+RTT − Control+RTT), the primary number where "
        "a control exists (the control measures what RTT teaches rather than reveals). "
        "Brackets: hierarchical bootstrap 95% CIs over seeds, folds and questions, the optimistic "
        "choice redone in every resample. *Optimistic*: (lr, epoch) chosen on V (the paper's "
        "attacker); *honest*: chosen on a held-out slice of T.",
        "",
        "## Datasets",
        "",
        _datasets_md(findings["datasets"]),
        "",
        "## Finding 1 — facts learned in pretraining",
        "",
        *[f"- {s}" for s in _regime_sentences(f1["rows"], PRETRAINED)],
        "",
        _regime_table(f1["rows"]),
        "",
        "## Finding 2 — facts learned in fine-tuning",
        "",
        *[f"- {s}" for s in _regime_sentences(f2["rows"], FINETUNED)],
        "",
        _regime_table(f2["rows"]),
        "",
        f"### Pretrained vs finetuned ({f2['difference']})",
        "",
        f"CI of the difference: {f2['ci_method']}.",
        "",
        *_comparison_md(f2["comparison"]),
        "",
        "## Controls: floor and ceiling",
        "",
        *_controls_md(findings["controls"]["rows"]),
        "",
        "## Recovery vs amount of retraining data (|T| splits)",
        "",
        *_train_size_md(findings["train_size"]["rows"]),
        "",
        "## Recovery vs RTT steps",
        "",
        f"Selection: {findings['steps']['selection']}.",
        "",
        *_steps_md(findings["steps"]["rows"]),
        "## Figures",
        "",
        "![recovery by regime](fig_findings_recovery.png)",
        "",
        "![recovery vs |T|](fig_findings_train_size.png)",
        "",
        "![V accuracy vs RTT steps](fig_findings_steps.png)",
        "",
    ]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out))  # an empty table leaves no gap


# --------------------------------------------------------------------------- plots


def _err(y: float, ci: Sequence[float | None] | None) -> tuple[float, float]:
    """Whisker lengths below and above ``y`` (0 where the CI is missing)."""
    if not ci or ci[0] is None or ci[1] is None:
        return 0.0, 0.0
    return max(0.0, y - ci[0]), max(0.0, ci[1] - y)


def _empty(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def _recovery_pairs(
    findings: Mapping[str, Any],
) -> list[tuple[str, dict[str, Any] | None, dict[str, Any] | None]]:
    """(x label, pretrained row, finetuned row): each comparison, then rows in none."""
    f1, f2 = findings["finding1"]["rows"], findings["finding2"]["rows"]

    def find(rows: list[dict[str, Any]], ds: str, m: str) -> dict[str, Any] | None:
        return next((r for r in rows if (r["dataset"], r["method"]) == (ds, m)), None)

    pairs = [
        (c["method"], find(f1, c["pretrained_dataset"], c["method"]),
         find(f2, c["finetuned_dataset"], c["method"]))
        for c in findings["finding2"]["comparison"]
    ]  # fmt: skip
    used = {id(r) for _, a, b in pairs for r in (a, b) if r is not None}
    pairs += [(r["method"], r, None) for r in f1 if id(r) not in used]
    pairs += [(r["method"], None, r) for r in f2 if id(r) not in used]
    if len({m for m, _, _ in pairs}) < len(pairs):  # a method twice: name its datasets
        pairs = [
            (f"{m}\n" + " vs ".join(r["dataset"] for r in (a, b) if r is not None), a, b)
            for m, a, b in pairs
        ]
    return pairs


def _plot_recovery(findings: Mapping[str, Any], axes: Sequence[Any], rules: list[str]) -> None:
    """Bars: recovery per method, pretrained and finetuned side by side, one panel per rule."""
    pairs = _recovery_pairs(findings)
    for ax, rule in zip(axes, rules, strict=True):
        if not pairs:
            _empty(ax, "no full-T dataset")
            continue
        for side, (regime, color, dx) in enumerate(
            ((PRETRAINED, "#4c72b0", -0.2), (FINETUNED, "#dd8452", 0.2))
        ):
            xs, ys, errs = [], [], []
            for i, pair in enumerate(pairs):
                b = (pair[1 + side] or {}).get(rule) or {}
                if b.get("recovery") is not None:
                    xs.append(i + dx)
                    ys.append(b["recovery"])
                    errs.append(_err(b["recovery"], b.get("recovery_ci")))
            if xs:
                ax.bar(xs, ys, 0.4, color=color, label=regime, yerr=np.array(errs).T,
                       capsize=3, error_kw={"lw": 0.8})  # fmt: skip
        ax.axhline(0, color="k", lw=0.8)
        ax.axhline(1, color="k", ls=":", lw=0.8)
        ax.set_xticks(range(len(pairs)), [label for label, _, _ in pairs])
        ax.set_ylabel("recovery (chance-adjusted)")
        ax.set_title(f"recovery by regime — {rule} selection", fontsize=10)
        ax.legend(fontsize=7)


def _plot_train_size(findings: Mapping[str, Any], axes: Sequence[Any], rules: list[str]) -> None:
    """Lines: recovery vs |T| per method (solid: pretrained, dashed: other regimes)."""
    rows = findings["train_size"]["rows"]
    series: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        series.setdefault((r["base_dataset"], r["regime"], r["method"]), []).append(r)
    multi = len({k[0] for k in series}) > 1
    for ax, rule in zip(axes, rules, strict=True):
        drawn = False
        for (base, regime, method), rs in series.items():
            pts = [(r["train_splits"], r[rule]) for r in rs if r.get(rule)]
            pts = [(k, b) for k, b in pts if b.get("recovery") is not None]
            if not pts:
                continue
            xs = [k for k, _ in pts]
            ys = [b["recovery"] for _, b in pts]
            err = np.array([_err(b["recovery"], b.get("recovery_ci")) for _, b in pts]).T
            name = f"{method} ({base}, {regime})" if multi else f"{method} ({regime})"
            ax.errorbar(xs, ys, yerr=err, marker="o", ms=4, capsize=3, label=name,
                        ls="-" if regime == PRETRAINED else "--")  # fmt: skip
            drawn = True
        if not drawn:
            _empty(ax, "no recovery numbers")
            continue
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel("|T| (splits RTT trains on)")
        ax.set_ylabel("recovery (chance-adjusted)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(f"recovery vs |T| — {rule} selection", fontsize=10)
        ax.legend(fontsize=7)


def _plot_steps(findings: Mapping[str, Any], axes: Sequence[Any], datasets: list[str]) -> None:
    """Lines: V accuracy (CI band) vs RTT steps per role, one panel per full-T dataset."""
    rows = findings["steps"]["rows"]
    for ax, ds in zip(axes, datasets, strict=True):
        rs = [r for r in rows if r["dataset"] == ds]
        use_steps = all(r["steps"] is not None for r in rs)
        for label in dict.fromkeys(r["label"] for r in rs):
            pts = [r for r in rs if r["label"] == label and r["v_acc"] is not None]
            xs = [r["steps"] if use_steps else r["epoch"] for r in pts]
            ax.plot(xs, [r["v_acc"] for r in pts], marker="o", ms=3, label=label)
            cis = [r["v_acc_ci"] or [r["v_acc"], r["v_acc"]] for r in pts]
            ax.fill_between(xs, [c[0] for c in cis], [c[1] for c in cis], alpha=0.15)
        ax.axhline(rs[0]["chance"], color="k", ls="--", lw=0.8, label="chance")
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("RTT steps" if use_steps else "RTT epoch")
        ax.set_ylabel("V accuracy (best lr at this point)")
        ax.set_title(f"{ds} ({rs[0]['regime']})", fontsize=10)
        ax.legend(fontsize=7)


def plot_findings(findings: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write the three findings figures (atomically: temp file, then rename) into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    all_rows = findings["finding1"]["rows"] + findings["finding2"]["rows"]
    rules = _rules_present(all_rows + findings["train_size"]["rows"]) or ["optimistic"]
    step_ds = list(dict.fromkeys(r["dataset"] for r in findings["steps"]["rows"]))
    n_keys = len(_recovery_pairs(findings))
    figs = (
        ("fig_findings_recovery.png", _plot_recovery, rules, (max(5.0, 1.2 * n_keys + 2), 4.0)),
        ("fig_findings_train_size.png", _plot_train_size, rules, (5.5, 4.0)),
        ("fig_findings_steps.png", _plot_steps, step_ds, (5.0, 4.0)),
    )
    paths = {}
    for name, draw, panels, (w, h) in figs:
        fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(w * max(1, len(panels)), h),
                                 squeeze=False)  # fmt: skip
        if panels:
            draw(findings, list(axes[0]), panels)
        else:
            _empty(axes[0][0], "no attack curves in results.json")
        fig.tight_layout()
        tmp = out / f".{name}.tmp.png"
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        tmp.replace(out / name)
        paths[name] = out / name
    return paths


# --------------------------------------------------------------------------- files


def write_findings(run_dir: str | Path, *, plots: bool = True) -> dict[str, Path]:
    """``rtteval findings RUN_DIR``: findings.json, findings.md and the figures from results.json.

    A missing or foreign results.json is a :class:`~rtteval.errors.UserError`
    (from :func:`rtteval.analysis.report.load_results`).
    """
    out = Path(run_dir)
    findings = analyze(load_results(out))
    paths = {
        "findings.json": write_json_atomic(out / "findings.json", findings),
        "findings.md": write_text_atomic(out / "findings.md", render_markdown(findings)),
    }
    if plots:
        paths.update(plot_findings(findings, out))
    return paths
