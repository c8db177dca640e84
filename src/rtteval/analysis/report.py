"""results.json / results.csv / report.md / plots from RTT attacks.

:func:`build_results` turns :class:`~rtteval.attacks.records.ModelAttack` objects
(one per model and seed) into the results dict whose schema is documented
in ``docs/results-schema.md``; :func:`write_report` writes every artefact
from that dict alone, which is what makes ``rtteval report RUN_DIR``
possible: results.json carries the full per-epoch curves and per-question
correctness, so every number, table and plot can be regenerated without a
model.

Selection is *shared across folds*: an attacker picks one (learning rate,
epoch) for the whole attack — the one maximising V accuracy pooled over all
folds (optimistic, the paper's) or held-out-T accuracy pooled over all folds
(honest).  Picking per fold would let each 40-question fold keep its luckiest
grid point, which inflates even the never-learned control above chance.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rtteval.analysis.budget import budget_entry, budget_markdown, plot_budget
from rtteval.analysis.metrics import (
    N_BOOT,
    Arm,
    CurvePoint,
    chance_level,
    floor_recovery,
    hierarchical_bootstrap,
    percentile_ci,
    recovery,
    recovery_raw,
    rtt_intervals,
    select_honest,
    select_optimistic,
)
from rtteval.analysis.overview import FIGURE as OVERVIEW_FIGURE
from rtteval.analysis.overview import overview_markdown, plot_overview, with_overview
from rtteval.atomic import write_json_atomic, write_text_atomic
from rtteval.attacks.records import ModelAttack
from rtteval.errors import UserError

SCHEMA = "rtteval-results"
SCHEMA_VERSION = 1
RESULT_FILES = (
    "results.json",
    "results.csv",
    "results_folds.csv",
    "report.md",
    "fig_recovery.png",
    "fig_rtt_curves.png",
)

Selector = Callable[[Sequence[CurvePoint]], CurvePoint | None]
SELECTIONS: dict[str, Selector] = {"optimistic": select_optimistic, "honest": select_honest}


# --------------------------------------------------------------------------- building


def _as_list(x: ModelAttack | Sequence[ModelAttack] | None) -> list[ModelAttack]:
    if x is None:
        return []
    if isinstance(x, ModelAttack):
        return [x]
    return list(x)


def clean_json(o: Any) -> Any:
    """NaN/inf -> None (results.json must be strict JSON); numpy scalars -> Python."""
    if isinstance(o, dict):
        return {k: clean_json(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [clean_json(v) for v in o]
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def _ci(x: tuple[float, float] | None) -> list[float] | None:
    return None if x is None else [float(x[0]), float(x[1])]


def fold_index(attack: ModelAttack) -> np.ndarray:
    """Each V question's fold (position in ``attack.folds``), folds concatenated."""
    return np.concatenate([np.full(len(f.question_ids), i) for i, f in enumerate(attack.folds)])


class Picked:
    """One model group's (seeds') selected points: correctness [S, N], chosen (lr, epoch)s.

    ``arm`` holds every seed's whole grid (replicates kept apart) for the
    hierarchical bootstrap, which can redo the choice; seeds whose every
    run diverged have no chosen point and are left out of both.
    """

    def __init__(self, attacks: list[ModelAttack], rule: str):
        self.chosen: list[CurvePoint | None] = []
        rows, curves, idx = [], [], []
        for a in attacks:
            p = SELECTIONS[rule](a.curve_points())
            self.chosen.append(p)
            if p is not None:
                rows.append(a.correct_at(p.lr, p.epoch))
                # the choice redone inside the bootstrap sees only what selection may pick
                bad = a.diverged_lrs()
                grid = sorted(g for g in a.grid() if g[0] not in bad)
                curves.append(a.correct_grid(grid))
                idx.append(grid.index((p.lr, p.epoch)))
        self.attacks = attacks
        self.rule = rule
        self.correct = np.stack(rows) if rows else None
        self.arm = Arm(curves, fold_index(attacks[0]), idx) if rows else None
        retains = [
            a.retain_at(p.lr, p.epoch)
            for a, p in zip(attacks, self.chosen, strict=True)
            if p is not None
        ]
        retains = [r for r in retains if r is not None]
        self.retain = float(np.mean(retains)) if retains else None

    @property
    def ok(self) -> bool:
        return self.correct is not None

    def acc(self, sl: slice = slice(None)) -> float | None:
        return None if self.correct is None else float(self.correct[:, sl].mean())

    def fold_retain(self, fi: int) -> float | None:
        rs = []
        for a, p in zip(self.attacks, self.chosen, strict=True):
            for r in range(a.replicates if p is not None and p.epoch > 0 else 0):
                e = a.folds[fi].point(p.lr, p.epoch, r)  # type: ignore[union-attr]
                if e is not None and e.retain_acc is not None:
                    rs.append(e.retain_acc)
        return float(np.mean(rs)) if rs else None

    def chosen_dicts(self) -> list[dict[str, Any] | None]:
        return [None if p is None else {"lr": p.lr, "epoch": p.epoch} for p in self.chosen]


def _before(attacks: list[ModelAttack]) -> np.ndarray:
    return np.stack(
        [np.concatenate([np.asarray(f.before.v_correct, float) for f in a.folds]) for a in attacks]
    )


def before_ci(
    attacks: list[ModelAttack], n_boot: int, seed: int, sl: slice = slice(None)
) -> list[float] | None:
    """Hierarchical-bootstrap CI of V accuracy before RTT (seeds, folds, questions)."""
    x = _before(attacks)[:, sl]
    arm = Arm([row[None, None, :] for row in x], fold_index(attacks[0])[sl], [0] * len(x))
    return _ci(percentile_ci(hierarchical_bootstrap({"x": arm}, n_boot=n_boot, seed=seed)["x"]))


def _slice_arm(arm: Arm, sl: slice) -> Arm:
    return Arm([c[:, :, sl] for c in arm.curves], arm.fold_of[sl], arm.chosen)


def _retain_before(attacks: list[ModelAttack]) -> float | None:
    rs = [a.retain_before for a in attacks if a.retain_before is not None]
    return float(np.mean(rs)) if rs else None


def _check_aligned(groups: Mapping[str, list[ModelAttack]]) -> tuple[list[str], list[int], bool]:
    """Fold names, fold sizes, and whether seeds are paired (the bootstrap pairs questions).

    Every attack must cover the same folds.  Either every attack scores the
    same V questions in the same order (seeds vary training only), or every
    role has the same number of seeds and the i-th attacks of all roles
    share their questions (one world per seed): then seeds are *paired*.
    """
    atts_all = [(name, a) for name, atts in groups.items() for a in atts]
    ref = atts_all[0][1]
    folds = [f.v for f in ref.folds]
    for name, a in atts_all:
        if [f.v for f in a.folds] != folds or [len(f.question_ids) for f in a.folds] != [
            len(f.question_ids) for f in ref.folds
        ]:
            raise ValueError(
                f"attack {name!r} ({a.label}) covers different folds than {ref.label}: "
                f"{[f.v for f in a.folds]} vs {folds}"
            )
    paired = False
    if any(a.question_ids != ref.question_ids for _, a in atts_all):
        n_seeds = {len(atts) for atts in groups.values()}
        first = next(iter(groups.values()))
        paired = len(n_seeds) == 1 and all(
            atts[i].question_ids == first[i].question_ids
            for atts in groups.values()
            for i in range(len(atts))
        )
        if not paired:
            bad = next(name for name, a in atts_all if a.question_ids != ref.question_ids)
            raise ValueError(
                f"attack {bad!r} scores different V questions than {ref.label}, and the seeds "
                "are not paired (same number of seeds per role, seed i on the same questions)"
            )
    return folds, [len(f.question_ids) for f in ref.folds], paired


def _rtt_numbers(
    o: Picked,
    u: Picked,
    c: Picked | None,
    chance: float,
    sl: slice,
    n_boot: int,
    seed: int,
    with_ci: bool,
    paired: bool = False,
) -> dict[str, Any]:
    """The after-RTT numbers of one selection rule over the questions in ``sl``.

    CIs come from :func:`rtteval.analysis.metrics.rtt_intervals`.  Over all folds the
    optimistic attacker's choice is redone inside every resample; on one
    fold (``sl`` a part) the choice is the summary's, held fixed.
    """
    out: dict[str, Any] = {
        "original_rtt": o.acc(sl),
        "unlearned_rtt": u.acc(sl),
        "control_rtt": c.acc(sl) if c is not None else None,
    }
    ur, orr, cr = out["unlearned_rtt"], out["original_rtt"], out["control_rtt"]
    both = ur is not None and orr is not None
    out["recovery"] = recovery(ur, orr, chance) if both else None
    out["recovery_raw"] = recovery_raw(ur, orr) if both else None
    out["recovery_floor"] = floor_recovery(ur, orr, cr) if both and cr is not None else None
    if with_ci:
        keys = ("original_rtt", "unlearned_rtt", "control_rtt", "recovery", "recovery_raw")
        out.update({f"{k}_ci": None for k in (*keys, "recovery_floor")})
        out["components"] = None
        if u.arm is not None and o.arm is not None:
            whole = sl == slice(None)
            ca = c.arm if c is not None else None
            arms = [_slice_arm(a, sl) if a is not None else None for a in (o.arm, u.arm, ca)]
            n_s = {a.n_seeds for a in arms if a is not None}
            cis = rtt_intervals(
                arms[0], arms[1], arms[2], chance, n_boot=n_boot, seed=seed,  # type: ignore[arg-type]
                select_inside=whole and u.rule == "optimistic",
                paired=paired and len(n_s) == 1, components=whole,
            )  # fmt: skip
            out.update({k: _ci(v) if k.endswith("_ci") else v for k, v in cis.items()})
            if not whole:
                out.pop("components")
        if c is None or c.arm is None:
            out.pop("recovery_floor_ci", None)
    return out


@dataclass
class _Shared:
    """What every method's rows share: the original and control arms, the folds, chance, rules."""

    ds_name: str
    row_info: dict[str, Any]
    originals: list[ModelAttack]
    controls: list[ModelAttack]
    fold_names: list[str]
    fold_slices: list[slice]
    n_questions: int
    chance: float
    rules: list[str]
    #: rule -> {"original": Picked, "control": Picked or None}
    picked: dict[str, dict[str, Any]]
    o_before: np.ndarray
    c_before: np.ndarray | None
    n_boot: int
    seed: int
    paired: bool


def _method_numbers(sh: _Shared, atts: list[ModelAttack], mi: int) -> dict[str, Any]:
    """Per selection rule: the method's after-RTT numbers over all folds, and its :class:`Picked`."""
    per_rule = {}
    for rule in sh.rules:
        u = Picked(atts, rule)
        o, c = sh.picked[rule]["original"], sh.picked[rule]["control"]
        nums = _rtt_numbers(o, u, c, sh.chance, slice(None), sh.n_boot, sh.seed + mi, True,
                            sh.paired)  # fmt: skip
        nums["retain_original_rtt"] = o.retain
        nums["retain_unlearned_rtt"] = u.retain
        nums["retain_control_rtt"] = c.retain if c is not None else None
        nums["chosen"] = {
            "original_rtt": o.chosen_dicts(),
            "unlearned_rtt": u.chosen_dicts(),
            "control_rtt": c.chosen_dicts() if c is not None else None,
        }
        per_rule[rule] = (nums, u)
    return per_rule


def _summary_entry(
    sh: _Shared, method: str, atts: list[ModelAttack], mi: int, per_rule: dict[str, Any]
) -> dict[str, Any]:
    """One summary row: the method's numbers before RTT, after it (optimistic) and honest."""
    u_before = _before(atts)
    opt = per_rule["optimistic"][0]
    return {
        "dataset": sh.ds_name,
        **sh.row_info,
        "method": method,
        "chance": sh.chance,
        "n_folds": len(sh.fold_names),
        "folds": sh.fold_names,
        "n_questions": sh.n_questions,
        "n_seeds": {
            "unlearned": len(atts),
            "original": len(sh.originals),
            "control": len(sh.controls),
        },
        "replicates": sh.originals[0].replicates,
        "selection": "optimistic",
        "original": float(sh.o_before.mean()),
        "original_ci": before_ci(sh.originals, sh.n_boot, sh.seed),
        "unlearned": float(u_before.mean()),
        "unlearned_ci": before_ci(atts, sh.n_boot, sh.seed + mi),
        "control": float(sh.c_before.mean()) if sh.c_before is not None else None,
        **{k: v for k, v in opt.items()},
        "retain_original": _retain_before(sh.originals),
        "retain_unlearned": _retain_before(atts),
        "retain_control": _retain_before(sh.controls) if sh.controls else None,
        "honest": per_rule["honest"][0] if "honest" in per_rule else None,
    }


def _fold_rows(
    sh: _Shared, method: str, atts: list[ModelAttack], mi: int, per_rule: dict[str, Any]
) -> list[dict[str, Any]]:
    """One row per fold V: the method's numbers on V's questions, at the summary's choice."""
    u_before = _before(atts)
    rows = []
    for fi, (v, sl) in enumerate(zip(sh.fold_names, sh.fold_slices, strict=True)):
        row: dict[str, Any] = {
            "dataset": sh.ds_name,
            **sh.row_info,
            "method": method,
            "fold": v,
            "t": list(atts[0].folds[fi].t),
            "n_questions": sl.stop - sl.start,
            "chance": chance_level(sh.originals[0].folds[fi].n_choices),
            "original": float(sh.o_before[:, sl].mean()),
            "unlearned": float(u_before[:, sl].mean()),
            "control": float(sh.c_before[:, sl].mean()) if sh.c_before is not None else None,
        }
        for rule in sh.rules:
            u = per_rule[rule][1]
            o, c = sh.picked[rule]["original"], sh.picked[rule]["control"]
            nums = _rtt_numbers(o, u, c, row["chance"], sl, sh.n_boot, sh.seed + mi, True,
                                sh.paired)  # fmt: skip
            nums["retain_original_rtt"] = o.fold_retain(fi)
            nums["retain_unlearned_rtt"] = u.fold_retain(fi)
            if rule == "optimistic":
                row.update(nums)
            else:
                row["honest"] = nums
        row.setdefault("honest", None)
        rows.append(row)
    return rows


def _attack_records(
    originals: list[ModelAttack],
    controls: list[ModelAttack],
    methods: Mapping[str, list[ModelAttack]],
    ds_name: str,
) -> list[dict[str, Any]]:
    """Every attack's full record (curves, per-question correctness), labelled with its role."""
    attacks = []
    for role, atts in (("original", originals), ("control", controls)):
        for i, a in enumerate(atts):
            attacks.append({"role": role, "method": None, "seed_index": i, **a.to_dict()})
    for m, atts in methods.items():
        for i, a in enumerate(atts):
            attacks.append({"role": "unlearned", "method": m, "seed_index": i, **a.to_dict()})
    return [{**a, "dataset": ds_name} for a in attacks]  # the label, not the data dir


def _shared(
    originals: list[ModelAttack],
    controls: list[ModelAttack],
    methods: Mapping[str, list[ModelAttack]],
    dataset: str | None,
    info: Mapping[str, Any] | None,
    n_boot: int,
    seed: int,
) -> _Shared:
    """Check the attacks cover the same folds; the arms and settings every method's rows share."""
    groups: dict[str, list[ModelAttack]] = {"original": originals}
    if controls:
        groups["control"] = controls
    for m, atts in methods.items():
        groups[f"unlearned:{m}"] = atts
    fold_names, fold_sizes, paired = _check_aligned(groups)
    ds_name = dataset or originals[0].dataset
    row_info = {
        "attack": (info or {}).get("attack") or "rtt",
        "base_dataset": (info or {}).get("base_dataset") or ds_name,
        "regime": (info or {}).get("regime") or "pretrained",
        "train_splits": len(originals[0].folds[0].t),
        "paired_seeds": paired,
    }
    offsets = np.cumsum([0, *fold_sizes])
    has_holdout = any(p.holdout_acc is not None for a in originals for p in a.curve_points())
    rules = ["optimistic"] + (["honest"] if has_holdout else [])
    return _Shared(
        ds_name=ds_name,
        row_info=row_info,
        originals=originals,
        controls=controls,
        fold_names=fold_names,
        fold_slices=[slice(int(offsets[i]), int(offsets[i + 1])) for i in range(len(fold_sizes))],
        n_questions=int(offsets[-1]),
        chance=chance_level(originals[0].n_choices),
        rules=rules,
        picked={
            rule: {
                "original": Picked(originals, rule),
                "control": Picked(controls, rule) if controls else None,
            }
            for rule in rules
        },
        o_before=_before(originals),
        c_before=_before(controls) if controls else None,
        n_boot=n_boot,
        seed=seed,
        paired=paired,
    )


def _optimistic_choices(picked: Mapping[str, Any], per_rule: Mapping[str, Any]) -> dict[str, Any]:
    """Every role's optimistic choice per seed: the learning rate its budget curve is read at."""
    o, c = picked["optimistic"]["original"], picked["optimistic"]["control"]
    return {"original": o.chosen, "unlearned": per_rule["optimistic"][1].chosen,
            "control": c.chosen if c is not None else []}  # fmt: skip


def build_results(
    unlearned: Mapping[str, ModelAttack | Sequence[ModelAttack]],
    original: ModelAttack | Sequence[ModelAttack],
    control: ModelAttack | Sequence[ModelAttack] | None = None,
    *,
    dataset: str | None = None,
    config: Mapping[str, Any] | None = None,
    n_boot: int = N_BOOT,
    seed: int = 0,
    info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The results dict (``docs/results-schema.md``) for one dataset.

    ``unlearned`` maps a method name to its attack (or one attack per seed);
    ``original`` and ``control`` are the ceiling and floor attacks, shared by
    every method.  Several attacks for one role are seeds: accuracies are
    their mean, and CIs resample seeds as well as questions.  ``config`` is
    stored as given under ``config.run`` (e.g. the unlearning settings).
    Seeds may each have their own world (see :func:`_check_aligned`).
    ``info`` may set ``attack`` (the registered attack, default ``rtt``),
    ``base_dataset`` and ``regime`` ("pretrained" or
    "finetuned": when the facts were learned), copied into every summary
    and fold row with ``train_splits`` (|T|, read from the attacks).
    Use :func:`merge_results` to combine datasets.
    """
    originals, controls = _as_list(original), _as_list(control)
    if not originals:
        raise ValueError("build_results needs the original model's attack")
    methods = {m: _as_list(a) for m, a in unlearned.items()}
    for m, atts in methods.items():
        if not atts:
            raise ValueError(f"method {m!r} has no attack")
    sh = _shared(originals, controls, methods, dataset, info, n_boot, seed)

    summary: list[dict[str, Any]] = []
    fold_rows: list[dict[str, Any]] = []
    for mi, (method, atts) in enumerate(methods.items()):
        per_rule = _method_numbers(sh, atts, mi)
        entry = _summary_entry(sh, method, atts, mi, per_rule)
        budget = budget_entry(sh.row_info["attack"], sh.originals, atts, sh.controls,
                              _optimistic_choices(sh.picked, per_rule), sh.chance,
                              paired=sh.paired, n_boot=sh.n_boot, seed=sh.seed + mi)  # fmt: skip
        if budget is not None:
            entry["budget"] = budget
        summary.append(entry)
        fold_rows += _fold_rows(sh, method, atts, mi, per_rule)

    cfg = {
        "rtt": originals[0].config,
        "scoring": originals[0].scoring,
        "selection": {
            "scope": "shared across folds",
            "rules": sh.rules,
            "min_epoch": 1,
            "tie_break": "smaller lr, then earlier epoch",
        },
        "bootstrap": {"n_boot": n_boot, "level": 0.95, "seed": seed},
        "run": dict(config or {}),
    }
    from rtteval import __version__

    return clean_json(
        {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "rtteval_version": __version__,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "datasets": [sh.ds_name],
            "config": cfg,
            "summary": summary,
            "folds": fold_rows,
            "attacks": _attack_records(originals, controls, methods, sh.ds_name),
        }
    )


def merge_results(*results: Mapping[str, Any]) -> dict[str, Any]:
    """Combine per-dataset results dicts; ``config`` becomes ``{dataset: config}`` under ``per_dataset``."""
    if not results:
        raise ValueError("nothing to merge")
    out = dict(results[0])
    out["datasets"] = [d for r in results for d in r["datasets"]]
    out["summary"] = [s for r in results for s in r["summary"]]
    out["folds"] = [f for r in results for f in r["folds"]]
    out["attacks"] = [a for r in results for a in r["attacks"]]
    out["config"] = {
        **results[0]["config"],
        "per_dataset": {r["datasets"][0]: r["config"] for r in results},
    }
    return out


# --------------------------------------------------------------------------- loading


def load_results(run_dir: str | Path) -> dict[str, Any]:
    """Read and sanity-check ``RUN_DIR/results.json`` (a UserError if missing or foreign)."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise UserError("no results.json here (run `rtteval attack` first)", file=path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"invalid JSON: {e.msg}", file=path, line=e.lineno) from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read: {e}", file=path) from None
    if not isinstance(data, dict):
        raise UserError(
            f"not an rtteval results file (a JSON {type(data).__name__}, not a JSON object)",
            file=path,
        )
    if data.get("schema") != SCHEMA or not isinstance(data.get("summary"), list):
        raise UserError(f"not an rtteval results file (schema {data.get('schema')!r})", file=path)
    if int(data.get("schema_version", 0)) > SCHEMA_VERSION:
        raise UserError(
            f"results schema version {data['schema_version']} is newer than this rtteval "
            f"understands ({SCHEMA_VERSION})",
            file=path,
        )
    return data


def attacks_of(results: Mapping[str, Any]) -> list[tuple[dict[str, Any], ModelAttack]]:
    """(record without the attack body, ModelAttack) for every attack in a results dict."""
    out = []
    for rec in results.get("attacks", []):
        meta = {k: rec.get(k) for k in ("dataset", "role", "method", "seed_index")}
        out.append((meta, ModelAttack.from_dict(rec)))
    return out


# --------------------------------------------------------------------------- writing


def fmt(x: Any, digits: int = 3) -> str:
    """A number for a table: ``digits`` decimals, "—" for None."""
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def fmt_ci(x: Any, ci: Any) -> str:
    """A number and its CI, ``0.512 [0.41, 0.60]``; without a CI, as :func:`fmt`."""
    if x is None:
        return "—"
    if ci is None or ci[0] is None:
        return fmt(x)
    return f"{x:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """One CSV row: CIs -> _lo/_hi, nested dicts -> prefix_, chosen points -> 'lr@epoch'."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if k == "chosen" and isinstance(v, dict):
            for role, pts in v.items():
                out[f"{prefix}chosen_{role}"] = (
                    ";".join("" if p is None else f"{p['lr']:g}@{p['epoch']}" for p in pts)
                    if pts
                    else ""
                )
        elif k == "points":  # a budget curve: in results.json, not a CSV cell
            continue
        elif k.endswith("_ci"):
            lo, hi = (v or [None, None])[:2]
            out[f"{key}_lo"], out[f"{key}_hi"] = lo, hi
        elif isinstance(v, dict):
            if k == "n_seeds":
                out.update({f"{key}_{kk}": vv for kk, vv in v.items()})
            else:
                out.update(_flatten(v, f"{key}_"))
        elif isinstance(v, list):
            out[key] = ";".join(str(x) for x in v)
        elif v is None and k == "honest":
            continue
        else:
            out[key] = v
    return out


def _csv(rows: list[dict[str, Any]]) -> str:
    flat = [_flatten(r) for r in rows]
    cols: list[str] = []
    for r in flat:
        cols += [c for c in r if c not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in flat:
        w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in cols})
    return buf.getvalue()


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    """A markdown table; cells are used as given."""
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _chosen_str(pts: list[dict[str, Any] | None] | None) -> str:
    if not pts:
        return "—"
    return ", ".join("diverged" if p is None else f"lr {p['lr']:g}, ep {p['epoch']}" for p in pts)


def _divergence_md(results: Mapping[str, Any]) -> list[str]:
    """Which RTT runs and unlearning grid points diverged: they are recorded, never selected."""
    rows = []
    for rec in results.get("attacks", []):
        who = f"unlearned: {rec['method']}" if rec.get("role") == "unlearned" else rec.get("role")
        for f in rec["folds"]:
            for r in f["runs"]:
                if r.get("status") == "diverged":
                    rows.append(
                        [rec["dataset"], str(who), str(rec.get("seed_index", 0)), f["v"],
                         f"{r['lr']:g}", str(len(r.get("epochs", []))), r.get("message") or "-"]
                    )  # fmt: skip
    out = ["", "## Divergence", ""]
    if rows:
        out += [
            "An RTT learning rate that diverged on any fold is never selected, for any fold "
            "(the choice of lr is shared across folds); the epochs it completed before diverging "
            "stay in results.json.",
            "",
            md_table(
                ["dataset", "model", "seed", "V", "lr", "epochs before", "what happened"], rows
            ),
        ]
    else:
        out.append("No RTT run diverged.")
    unl = []
    sel = (results.get("config", {}).get("run") or {}).get("selection") or {}
    for label, seeds in sel.items():
        for e in seeds:
            for pt in e.get("diverged") or []:
                unl.append([label, str(e.get("seed")), json.dumps(pt.get("params")),
                            pt.get("message") or "-"])  # fmt: skip
    if unl:
        out += [
            "",
            "Unlearning grid points that diverged (never selected):",
            "",
            md_table(["method", "seed", "point", "what happened"], unl),
        ]
    return out


def _attacks_note(summary: Sequence[Mapping[str, Any]]) -> list[str]:
    """Which rows are another attack than RTT: their dataset label names it, this says what it is."""
    others = sorted({str(e.get("attack") or "rtt") for e in summary} - {"rtt"})
    if not others:
        return []
    from rtteval.attacks import ATTACKS

    out = [
        "**Attacks.** Rows without a bracket are RTT. Rows labelled `<dataset> [attack]` are:",
        "",
    ]
    for name in others:
        title = ATTACKS[name].config_type.title if name in ATTACKS else "(not installed)"
        trains = ATTACKS[name].config_type.trains if name in ATTACKS else True
        after = "this attack's fine-tuning" if trains else "this attack at its best setting"
        out.append(f'- `{name}`: {title}; its "+RTT" columns are after {after}')
    return [*out, ""]


def _floor_sentences(summary: Sequence[Mapping[str, Any]]) -> list[str]:
    """Per dataset, in words: does the control's Control+RTT CI lie above chance?"""
    out = []
    for ds in dict.fromkeys(e["dataset"] for e in summary):
        e = next(x for x in summary if x["dataset"] == ds)
        c, ci, chance = e.get("control_rtt"), e.get("control_rtt_ci"), e["chance"]
        if c is None or not ci or ci[0] is None:
            continue
        where = f"Control+RTT on {ds} is {c:.3f} [{ci[0]:.2f}, {ci[1]:.2f}] (chance {chance:.3f}): "
        if ci[0] > chance:
            out.append(
                where + "its CI lies **above chance** — fine-tuning on T teaches part of V to a "
                "model that never knew it, so chance is too low a floor and the chance-adjusted "
                "recovery overstates what was hidden."
            )
        elif ci[1] < chance:
            out.append(where + "its CI lies below chance.")
        else:
            out.append(
                where + "its CI includes chance — no evidence that fine-tuning on T teaches V."
            )
        out.append("")
    return out


def _intro_md(results: Mapping[str, Any]) -> list[str]:
    """Title, what the numbers mean, the control's floor in words, what is missing, other attacks."""
    s = results["summary"]
    has_control = any(e.get("control_rtt") is not None for e in s)
    out = [
        "# RTT report",
        "",
        "Retraining on T (Deeb & Roger, arXiv 2410.08827): each forget split V is held out, the "
        "model is fine-tuned on the other forget splits T, and V accuracy is measured after "
        "every epoch for a grid of learning rates. If unlearning removed the facts, RTT cannot "
        "bring V back (the never-learned control shows the floor); if it only hid them, it does.",
        "",
        "**Recovery** = (Unlearned+RTT − chance) / (Original+RTT − chance); **floor-adj.** = "
        "(Unlearned+RTT − Control+RTT) / (Original+RTT − Control+RTT); **raw** = "
        "Unlearned+RTT / Original+RTT (the paper's kind of number). "
        + (
            "**The floor-adjusted recovery is the primary number**: the never-learned control "
            "measures what fine-tuning on T teaches a model that never knew V (format, priors, "
            "facts guessable from T), so only recovery above that floor is evidence that "
            "unlearning hid rather than removed the facts (the critique of Feng et al., "
            "arXiv 2506.00688). "
            if has_control
            else "Without a control, only the chance-adjusted recovery can be given. "
        )
        + "Brackets: 95% hierarchical bootstrap CIs — seeds (or worlds), then folds, then "
        "questions and RTT replicates; the optimistic attacker's (lr, epoch) is chosen again in "
        "every resample (and scored on an independent draw), so the interval carries the "
        "optimism of picking the best grid point; the honest attacker's choice is held fixed. "
        "Selection is shared across folds; epoch ≥ 1.",
        "",
        *_floor_sentences(s),
    ]
    run = results.get("config", {}).get("run") or {}
    if run.get("partial"):
        out += ["**Partial results.** Not included:", ""]
        out += [f"- {m}" for m in run.get("missing") or ["(not recorded)"]]
        out.append("")
    out += _attacks_note(s)
    return out


def _summary_md(results: Mapping[str, Any]) -> list[str]:
    """The optimistic attacker's summary table, one row per (dataset, method)."""
    headers = [
        "dataset",
        "method",
        "chance",
        "Original",
        "Unlearned",
        "Original+RTT",
        "Unlearned+RTT",
        "Control+RTT",
        "recovery",
        "floor-adj.",
        "raw",
    ]
    rows = [
        [
            e["dataset"],
            e["method"],
            fmt(e["chance"]),
            fmt_ci(e["original"], e.get("original_ci")),
            fmt_ci(e["unlearned"], e.get("unlearned_ci")),
            fmt_ci(e["original_rtt"], e.get("original_rtt_ci")),
            fmt_ci(e["unlearned_rtt"], e.get("unlearned_rtt_ci")),
            fmt_ci(e["control_rtt"], e.get("control_rtt_ci")),
            fmt_ci(e["recovery"], e.get("recovery_ci")),
            fmt_ci(e.get("recovery_floor"), e.get("recovery_floor_ci")),
            fmt_ci(e["recovery_raw"], e.get("recovery_raw_ci")),
        ]
        for e in results["summary"]
    ]
    return [
        "## Summary — optimistic attacker (paper: best V accuracy over lr × epoch)",
        "",
        md_table(headers, rows),
    ]


def _uncertainty_md(results: Mapping[str, Any]) -> list[str]:
    """Bootstrap SDs from seeds alone, from questions alone, and both."""
    comp_rows = []
    for e in results["summary"]:
        for key, label in (
            ("unlearned_rtt", "Unlearned+RTT"),
            ("recovery", "recovery"),
            ("recovery_floor", "floor-adj."),
        ):
            c = (e.get("components") or {}).get(key)
            if c:
                comp_rows.append(
                    [
                        e["dataset"],
                        e["method"],
                        label,
                        str((e.get("n_seeds") or {}).get("unlearned", "—")),
                        fmt(c.get("sd_seeds")),
                        fmt(c.get("sd_questions")),
                        fmt(c.get("sd_total")),
                    ]
                )
    return [
        "",
        "## Where the uncertainty comes from (optimistic attacker)",
        "",
        "Bootstrap SD of each number when only the seeds are resampled (training noise: "
        "pretraining, unlearning and RTT, and with `vary_with_seed` the world), only the folds, "
        "questions and RTT replicates (which questions were asked; the attacker's choice "
        "redone), and both (the CI above).",
        "",
        md_table(
            ["dataset", "method", "number", "seeds", "SD seeds", "SD questions", "SD total"],
            comp_rows,
        ),
    ]


def _side_by_side_md(results: Mapping[str, Any]) -> list[str]:
    """Optimistic and honest attacker in one table, or why there is no honest one."""
    s = results["summary"]
    out = ["", "## Side by side: optimistic vs honest attacker", ""]
    if not any(e.get("honest") for e in s):
        out.append(
            "No held-out slice of T (holdout_fraction = 0, the paper's protocol): "
            "only the optimistic attacker is reported."
        )
        return out
    out.append(
        "The honest attacker picks (lr, epoch) on a slice of T held out from RTT training "
        "and is scored on V at that choice; V is never consulted."
    )
    out.append("")
    rows = []
    for e in s:
        h = e.get("honest") or {}
        rows.append(
            [
                e["dataset"],
                e["method"],
                f"{fmt(e['unlearned_rtt'])} / {fmt(h.get('unlearned_rtt'))}",
                f"{fmt(e['original_rtt'])} / {fmt(h.get('original_rtt'))}",
                f"{fmt(e['control_rtt'])} / {fmt(h.get('control_rtt'))}",
                f"{fmt_ci(e['recovery'], e.get('recovery_ci'))} / "
                f"{fmt_ci(h.get('recovery'), h.get('recovery_ci'))}",
                f"{fmt_ci(e.get('recovery_floor'), e.get('recovery_floor_ci'))} / "
                f"{fmt_ci(h.get('recovery_floor'), h.get('recovery_floor_ci'))}",
            ]
        )
    out.append(
        md_table(
            [
                "dataset",
                "method",
                "Unlearned+RTT (opt / honest)",
                "Original+RTT (opt / honest)",
                "Control+RTT (opt / honest)",
                "recovery (opt / honest)",
                "floor-adj. (opt / honest)",
            ],
            rows,
        )
    )
    return out


def _retain_md(results: Mapping[str, Any]) -> list[str]:
    """Retain accuracy of every arm before and after RTT."""
    rows = [
        [
            e["dataset"],
            e["method"],
            fmt(e.get("retain_original")),
            fmt(e.get("retain_unlearned")),
            fmt(e.get("retain_original_rtt")),
            fmt(e.get("retain_unlearned_rtt")),
            fmt(e.get("retain_control_rtt")),
        ]
        for e in results["summary"]
    ]
    headers = [
        "dataset",
        "method",
        "Original",
        "Unlearned",
        "Original+RTT",
        "Unlearned+RTT",
        "Control+RTT",
    ]
    return ["", "## Retain accuracy", "", md_table(headers, rows)]


def _chosen_md(results: Mapping[str, Any]) -> list[str]:
    """The (lr, epoch) each attacker chose, per arm."""
    rows = []
    for e in results["summary"]:
        for rule, block in (("optimistic", e), ("honest", e.get("honest"))):
            if not block:
                continue
            ch = block.get("chosen", {})
            rows.append(
                [
                    e["dataset"],
                    e["method"],
                    rule,
                    _chosen_str(ch.get("original_rtt")),
                    _chosen_str(ch.get("unlearned_rtt")),
                    _chosen_str(ch.get("control_rtt")),
                ]
            )
    return [
        "",
        "## Chosen hyperparameters",
        "",
        md_table(
            ["dataset", "method", "selection", "Original+RTT", "Unlearned+RTT", "Control+RTT"], rows
        ),
    ]


def _per_fold_md(results: Mapping[str, Any]) -> list[str]:
    """One row per fold V (optimistic selection)."""
    rows = [
        [
            f["dataset"],
            f["method"],
            f["fold"],
            str(f["n_questions"]),
            fmt(f["original"]),
            fmt(f["unlearned"]),
            fmt(f["original_rtt"]),
            fmt(f["unlearned_rtt"]),
            fmt(f.get("control_rtt")),
            fmt_ci(f["recovery"], f.get("recovery_ci")),
        ]
        for f in results.get("folds", [])
    ]
    headers = [
        "dataset",
        "method",
        "V",
        "n",
        "Original",
        "Unlearned",
        "Original+RTT",
        "Unlearned+RTT",
        "Control+RTT",
        "recovery",
    ]
    return ["", "## Per fold (optimistic selection)", "", md_table(headers, rows)]


def _provenance_md(results: Mapping[str, Any]) -> list[str]:
    """What each fold trained on, and that no V fact was in it (one row per distinct fold)."""
    prow = []
    seen = set()
    for rec in results.get("attacks", []):
        for f in rec["folds"]:
            p = f.get("provenance", {})
            key = (
                rec["dataset"],
                p.get("v"),
                json.dumps(p.get("train_texts_per_split"), sort_keys=True),
            )
            if key in seen:
                continue
            seen.add(key)
            prow.append(
                [
                    rec["dataset"],
                    str(p.get("v")),
                    ", ".join(p.get("t", [])),
                    str(p.get("text_format", p.get("loss"))),  # "loss" in older results
                    str(p.get("n_train_texts")),
                    str(len(p.get("holdout_ids", []))),
                    "yes" if p.get("holdout_isolated", True) else "NO",
                    str(len(p.get("dropped_overlap", []))),
                    "yes" if p.get("checked") else "no",
                ]
            )
    headers = [
        "dataset",
        "V",
        "T",
        "text format",
        "train texts",
        "held out",
        "held-out isolated",
        "dropped (T∩V text)",
        "checked",
    ]
    return [
        "",
        "## Provenance",
        "",
        "Before every fold is trained on, `check_provenance` re-reads V from the dataset and "
        "asserts that no V question text, fact id or subject occurs in any training text or in "
        "the held-out slice; a violation aborts the run.",
        "",
        md_table(headers, prow),
    ]


def _figures_and_config_md(results: Mapping[str, Any]) -> list[str]:
    """The figures' links and the run's configuration as JSON."""
    return [
        "",
        "## Figures",
        "",
        "![recovery](fig_recovery.png)",
        "",
        "![RTT curves](fig_rtt_curves.png)",
        "",
        "## Configuration",
        "",
        "```json",
        json.dumps(results.get("config", {}), indent=2, ensure_ascii=False),
        "```",
        "",
    ]


def _budget_md(results: Mapping[str, Any]) -> list[str]:
    """How much attack it takes: analysis/budget.py's section."""
    return ["", *budget_markdown(results)]


#: report.md's sections in order; each takes the results dict and returns its lines.
REPORT_SECTIONS: tuple[Callable[[Mapping[str, Any]], list[str]], ...] = (
    _intro_md,
    overview_markdown,
    _summary_md,
    _uncertainty_md,
    _side_by_side_md,
    _retain_md,
    _chosen_md,
    _divergence_md,
    _per_fold_md,
    _provenance_md,
    _budget_md,
    _figures_and_config_md,
)


def render_markdown(results: Mapping[str, Any]) -> str:
    """report.md: summary tables (optimistic and honest side by side), folds, provenance, config."""
    return "\n".join(line for section in REPORT_SECTIONS for line in section(results))


def _plot_recovery(results: Mapping[str, Any], path: Path) -> None:
    """Figure-1 style: grouped bars per method, CI whiskers, chance line; a column per selection."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["summary"]
    datasets = list(dict.fromkeys(e["dataset"] for e in s))
    rules = ["optimistic"] + (["honest"] if any(e.get("honest") for e in s) else [])
    bars = [
        ("original", "Original", "#9e9e9e"),
        ("original_rtt", "Original+RTT", "#4c72b0"),
        ("unlearned", "Unlearned", "#dd8452"),
        ("unlearned_rtt", "Unlearned+RTT", "#c44e52"),
        ("control_rtt", "Control+RTT", "#55a868"),
    ]
    fig, axes = plt.subplots(
        len(datasets),
        len(rules),
        figsize=(
            max(5.0, 1.6 * max(len([e for e in s if e["dataset"] == d]) for d in datasets) + 2.5)
            * len(rules),
            3.6 * len(datasets),
        ),
        squeeze=False,
    )
    width = 0.8 / len(bars)
    for di, ds in enumerate(datasets):
        entries = [e for e in s if e["dataset"] == ds]
        for ri, rule in enumerate(rules):
            ax = axes[di][ri]
            for bi, (key, label, color) in enumerate(bars):
                xs, ys, lo, hi = [], [], [], []
                for mi, e in enumerate(entries):
                    block = (
                        e
                        if rule == "optimistic" or key in ("original", "unlearned")
                        else (e.get("honest") or {})
                    )
                    y = block.get(key)
                    if y is None:
                        continue
                    ci = block.get(f"{key}_ci") or e.get(f"{key}_ci")
                    xs.append(mi + (bi - (len(bars) - 1) / 2) * width)
                    ys.append(y)
                    lo.append(y - ci[0] if ci and ci[0] is not None else 0.0)
                    hi.append(ci[1] - y if ci and ci[1] is not None else 0.0)
                if xs:
                    ax.bar(
                        xs,
                        ys,
                        width,
                        label=label,
                        color=color,
                        yerr=[np.maximum(lo, 0), np.maximum(hi, 0)],
                        capsize=2,
                        error_kw={"lw": 0.8},
                    )
            ax.axhline(entries[0]["chance"], color="k", ls="--", lw=1, label="chance")
            ax.set_xticks(range(len(entries)), [e["method"] for e in entries])
            ax.set_ylim(0, 1.05)
            ax.set_ylabel("V accuracy")
            ax.set_title(f"{ds} — {rule} selection")
            if di == 0 and ri == len(rules) - 1:
                ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_curves(results: Mapping[str, Any], path: Path) -> None:
    """V accuracy (pooled over folds) vs RTT epoch, one line per lr, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    atts = [(m, a) for m, a in attacks_of(results) if m.get("seed_index", 0) == 0]
    datasets = list(dict.fromkeys(m["dataset"] for m, _ in atts))
    per_ds = {d: [(m, a) for m, a in atts if m["dataset"] == d] for d in datasets}
    ncols = max((len(v) for v in per_ds.values()), default=1)
    fig, axes = plt.subplots(
        max(1, len(datasets)),
        ncols,
        figsize=(3.2 * ncols, 2.8 * max(1, len(datasets))),
        squeeze=False,
    )
    for di, ds in enumerate(datasets):
        chance = next((e["chance"] for e in results["summary"] if e["dataset"] == ds), None)
        for ci, (meta, a) in enumerate(per_ds[ds]):
            ax = axes[di][ci]
            pts = a.curve_points(include_before=True)
            for lr in a.lrs:
                line = sorted((p.epoch, p.v_acc) for p in pts if p.lr == lr)
                if line:
                    ax.plot(*zip(*line, strict=True), marker="o", ms=3, label=f"lr {lr:g}")
            best = select_optimistic(pts)
            if best is not None:
                ax.plot([best.epoch], [best.v_acc], "k*", ms=9, label="optimistic pick")
            honest = select_honest(pts)
            if honest is not None:
                ax.plot([honest.epoch], [honest.v_acc], "kx", ms=7, label="honest pick")
            if chance is not None:
                ax.axhline(chance, color="k", ls="--", lw=0.8)
            name = meta["role"] if meta["role"] != "unlearned" else f"{meta['method']} (unlearned)"
            ax.set_title(f"{ds}: {name}", fontsize=9)
            ax.set_ylim(0, 1.05)
            ax.set_xlabel("RTT epoch")
            if ci == 0:
                ax.set_ylabel("V accuracy")
            if di == 0 and ci == 0:
                ax.legend(fontsize=6)
        for ci in range(len(per_ds[ds]), ncols):
            axes[di][ci].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    run_dir: str | Path, results: Mapping[str, Any], *, plots: bool = True
) -> dict[str, Path]:
    """Write results.json (atomic), results.csv, results_folds.csv, report.md and the PNGs."""
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = with_overview(clean_json(dict(results)))
    paths = {
        "results.json": write_json_atomic(out / "results.json", results),
        "results.csv": write_text_atomic(out / "results.csv", _csv(results["summary"])),
        "results_folds.csv": write_text_atomic(
            out / "results_folds.csv", _csv(results.get("folds", []))
        ),
        "report.md": write_text_atomic(out / "report.md", render_markdown(results)),
    }
    if plots:
        for name, fn in (
            ("fig_recovery.png", _plot_recovery),
            ("fig_rtt_curves.png", _plot_curves),
        ):
            tmp = out / f".{name}.tmp.png"
            fn(results, tmp)
            tmp.replace(out / name)
            paths[name] = out / name
        paths.update({p.name: p for p in plot_budget(results, out)})
        if plot_overview(results, tmp := out / f".{OVERVIEW_FIGURE}.tmp.png"):
            tmp.replace(out / OVERVIEW_FIGURE)
            paths[OVERVIEW_FIGURE] = out / OVERVIEW_FIGURE
    return paths


def regenerate(run_dir: str | Path) -> dict[str, Path]:
    """``rtteval report RUN_DIR``: every artefact again, from results.json alone."""
    return write_report(run_dir, load_results(run_dir))


def summary_table(results: Mapping[str, Any]) -> Any:
    """A rich Table of the summary for the terminal."""
    from rich.table import Table

    has_honest = any(e.get("honest") for e in results["summary"])
    t = Table(title="RTT summary (V accuracy; recovery = chance-adjusted)")
    for c in (
        "dataset",
        "method",
        "orig",
        "unl",
        "orig+RTT",
        "unl+RTT",
        "ctrl+RTT",
        "recovery",
        "floor-adj.",
        "raw",
    ):
        t.add_column(c, justify="left" if c in ("dataset", "method") else "right")
    if has_honest:
        t.add_column("unl+RTT honest", justify="right")
        t.add_column("recovery honest", justify="right")
    for e in results["summary"]:
        rec = fmt(e["recovery"], 2)
        if e.get("recovery_ci") and e["recovery_ci"][0] is not None:
            rec += f" [{e['recovery_ci'][0]:.2f},{e['recovery_ci'][1]:.2f}]"
        row = [
            e["dataset"],
            e["method"],
            fmt(e["original"]),
            fmt(e["unlearned"]),
            fmt(e["original_rtt"]),
            fmt(e["unlearned_rtt"]),
            fmt(e["control_rtt"]),
            rec,
            fmt(e.get("recovery_floor"), 2)
            + (
                f" [{e['recovery_floor_ci'][0]:.2f},{e['recovery_floor_ci'][1]:.2f}]"
                if (e.get("recovery_floor_ci") or [None])[0] is not None
                else ""
            ),
            fmt(e["recovery_raw"], 2),
        ]
        if has_honest:
            h = e.get("honest") or {}
            row += [fmt(h.get("unlearned_rtt")), fmt(h.get("recovery"), 2)]
        t.add_row(*row)
    return t
