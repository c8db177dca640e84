"""Pure metric functions: chance, recovery, hyperparameter selection, bootstrap CIs.

Nothing here touches a model; everything takes plain numbers or 0/1
correctness arrays, so the arithmetic the headline numbers rest on is
testable on synthetic inputs.

Conventions
-----------
* Accuracies are fractions in [0, 1]; correctness arrays are 0/1, shaped
  ``[n_questions]`` or ``[n_seeds, n_questions]``.
* **Recovery** (chance-adjusted) is ``(U_rtt - chance) / (O_rtt - chance)``:
  1 means RTT brought the unlearned model as far above chance as it brings
  the original model, 0 means no further than chance.  The **raw ratio**
  ``U_rtt / O_rtt`` is the kind of number behind the paper's "recovers 88%
  of pre-unlearning accuracy"; it flatters methods because chance alone
  gives ``chance / O_rtt`` (about 0.25 for a 4-choice task), which is why
  the adjusted form is the primary metric here.  Both are ``nan`` when the
  denominator is not positive (an original model RTT does not lift above
  chance carries no information about recovery).
* **Selection.**  The paper's *optimistic* attacker reports the best V
  accuracy over the (learning rate, epoch) grid, i.e. chooses its
  hyperparameters on the very questions it is scored on.  The *honest*
  attacker chooses them on a slice of T held out from RTT training and is
  scored on V at that choice.  Ties are broken towards the smaller learning
  rate, then the earlier epoch (the least training that achieves the
  score), so the choice is deterministic and, among equals, the one least
  likely to have damaged the model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Default number of bootstrap resamples and CI level.
N_BOOT = 1000
CI_LEVEL = 0.95


# --------------------------------------------------------------------------- chance & recovery


def chance_level(n_choices: Iterable[int]) -> float:
    """Expected accuracy of uniform guessing: the mean of ``1/k`` over questions."""
    ks = [int(k) for k in n_choices]
    if not ks or min(ks) < 1:
        raise ValueError("chance_level needs at least one question with >= 1 choice")
    return float(np.mean([1.0 / k for k in ks]))


def recovery(unlearned_rtt: float, original_rtt: float, chance: float) -> float:
    """Chance-adjusted recovery ``(U_rtt - chance) / (O_rtt - chance)``; nan if O_rtt <= chance."""
    den = original_rtt - chance
    if not den > 0:
        return math.nan
    return (unlearned_rtt - chance) / den


def recovery_raw(unlearned_rtt: float, original_rtt: float) -> float:
    """Raw ratio ``U_rtt / O_rtt`` (the paper's kind of number); nan if O_rtt is 0."""
    if not original_rtt > 0:
        return math.nan
    return unlearned_rtt / original_rtt


# --------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class CurvePoint:
    """One grid point of an RTT sweep: V (and held-out-T) accuracy after ``epoch`` epochs at ``lr``."""

    lr: float
    epoch: int
    v_acc: float
    holdout_acc: float | None = None
    retain_acc: float | None = None
    diverged: bool = False


def _tie_key(p: CurvePoint) -> tuple[float, int]:
    return (p.lr, p.epoch)


def select_optimistic(points: Iterable[CurvePoint], *, min_epoch: int = 1) -> CurvePoint | None:
    """The paper's attacker: the point with the best V accuracy.

    Points before ``min_epoch`` are not candidates: epoch 0 is the model
    before RTT, and "the attack" means fine-tuning.  Nor are ``diverged``
    points: an attacker discards a learning rate whose training blew up.
    Ties go to the smaller learning rate, then the earlier epoch.  ``None``
    if there is no candidate.
    """
    cands = [p for p in points if p.epoch >= min_epoch and not p.diverged and _finite(p.v_acc)]
    if not cands:
        return None
    return min(cands, key=lambda p: (-p.v_acc, *_tie_key(p)))


def select_honest(points: Iterable[CurvePoint], *, min_epoch: int = 1) -> CurvePoint | None:
    """The honest attacker: the point with the best held-out-T accuracy (V never consulted).

    Same candidates and tie-break as :func:`select_optimistic`; ``None`` when
    no point has a held-out accuracy (``holdout_fraction = 0``).
    """
    cands = [
        p
        for p in points
        if p.epoch >= min_epoch
        and not p.diverged
        and p.holdout_acc is not None
        and _finite(p.holdout_acc)
    ]
    if not cands:
        return None
    return min(cands, key=lambda p: (-float(p.holdout_acc), *_tie_key(p)))  # type: ignore[arg-type]


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


# --------------------------------------------------------------------------- bootstrap


def _as_2d(x: np.ndarray | Sequence) -> np.ndarray:
    a = np.asarray(x, dtype=float)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[1] == 0:
        raise ValueError(f"expected [n_questions] or [n_seeds, n_questions], got shape {a.shape}")
    return a


def boot_means(
    a: np.ndarray,
    q_idx: np.ndarray,
    rng: np.random.Generator,
    resample_seeds: bool,
    s_idx: np.ndarray | None = None,
) -> np.ndarray:
    """Mean accuracy per resample: seeds drawn with replacement (if several), questions given.

    ``s_idx`` ([B, S]) supplies the seed draws, so that two models whose
    seeds are paired (seed i of both saw the same world) share them.
    """
    n_seeds = a.shape[0]
    if n_seeds > 1 and resample_seeds:
        if s_idx is None:
            s_idx = rng.integers(0, n_seeds, size=(q_idx.shape[0], n_seeds))
        # per resample b: mean over drawn seeds of mean over drawn questions
        per_seed_q = a[:, q_idx]  # [S, B, N]
        per_seed = per_seed_q.mean(axis=2)  # [S, B]
        return np.take_along_axis(per_seed.T, s_idx, axis=1).mean(axis=1)
    return a[:, q_idx].mean(axis=2).mean(axis=0)


def _percentile_ci(samples: np.ndarray, level: float) -> tuple[float, float]:
    s = samples[np.isfinite(samples)]
    if s.size == 0:
        return (math.nan, math.nan)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(s, [alpha, 1 - alpha])
    return (float(lo), float(hi))


def bootstrap_mean_ci(
    correct: np.ndarray | Sequence,
    *,
    n_boot: int = N_BOOT,
    level: float = CI_LEVEL,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile CI of mean accuracy, resampling questions (and seeds when several rows)."""
    a = _as_2d(correct)
    rng = np.random.default_rng(seed)
    q_idx = rng.integers(0, a.shape[1], size=(n_boot, a.shape[1]))
    return _percentile_ci(boot_means(a, q_idx, rng, True), level)


def bootstrap_recovery_ci(
    unlearned_rtt: np.ndarray | Sequence,
    original_rtt: np.ndarray | Sequence,
    chance: float,
    *,
    n_boot: int = N_BOOT,
    level: float = CI_LEVEL,
    seed: int = 0,
    paired_seeds: bool = False,
) -> dict[str, tuple[float, float]]:
    """CIs of recovery and raw ratio, resampling questions jointly for both models.

    The two correctness arrays must list the same questions in the same
    order (columns); each may have its own number of seed rows, and seeds are
    resampled independently per model (an unlearning seed has nothing to do
    with an original-model seed).  Resampling the same question indices for
    numerator and denominator keeps their correlation (a hard question is
    hard for both), which makes the interval honest rather than too wide.
    With ``paired_seeds`` (one world per seed: row i of both arrays is the
    same world's questions) the seed draws are shared too, so a resample
    never divides one world's unlearned accuracy by another world's ceiling.
    The selected hyperparameters are held fixed across resamples.
    """
    u, o = _as_2d(unlearned_rtt), _as_2d(original_rtt)
    if u.shape[1] != o.shape[1]:
        raise ValueError(f"question counts differ: {u.shape[1]} vs {o.shape[1]}")
    rng = np.random.default_rng(seed)
    q_idx = rng.integers(0, u.shape[1], size=(n_boot, u.shape[1]))
    s_idx = None
    if paired_seeds:
        if u.shape[0] != o.shape[0]:
            raise ValueError(f"paired seeds need equal seed counts: {u.shape[0]} vs {o.shape[0]}")
        s_idx = rng.integers(0, u.shape[0], size=(n_boot, u.shape[0]))
    ub = boot_means(u, q_idx, rng, True, s_idx)
    ob = boot_means(o, q_idx, rng, True, s_idx)
    with np.errstate(divide="ignore", invalid="ignore"):
        den = ob - chance
        rec = np.where(den > 0, (ub - chance) / np.where(den > 0, den, 1.0), np.nan)
        raw = np.where(ob > 0, ub / np.where(ob > 0, ob, 1.0), np.nan)
    return {"recovery": _percentile_ci(rec, level), "recovery_raw": _percentile_ci(raw, level)}


def floor_recovery(unlearned_rtt: float, original_rtt: float, control_rtt: float) -> float:
    """Floor-adjusted recovery ``(U_rtt - C_rtt) / (O_rtt - C_rtt)``; nan if O_rtt <= C_rtt.

    The never-learned control measures what RTT *teaches* (V guessed from T,
    format, priors) rather than reveals, so this is recovery above what
    fine-tuning gives a model that never knew the facts (Feng et al., arXiv
    2506.00688).
    """
    den = original_rtt - control_rtt
    if not den > 0:
        return math.nan
    return (unlearned_rtt - control_rtt) / den


# --------------------------------------------------------------------------- hierarchical bootstrap


@dataclass(frozen=True)
class Arm:
    """One role's RTT results as arrays, the input of :func:`hierarchical_bootstrap`.

    ``curves[s]`` is seed s's V correctness ``[replicates, grid points, questions]``
    (0/1, folds concatenated; grid points sorted by (lr, epoch) so that the
    first maximum is the tie-break's choice).  ``fold_of[n]`` is question n's
    fold.  ``chosen[s]`` is the grid index the attacker picked on all the
    data (optimistic on V, or honest on the held-out slice).
    """

    curves: Sequence[np.ndarray]
    fold_of: np.ndarray
    chosen: Sequence[int]

    @property
    def n_seeds(self) -> int:
        return len(self.curves)

    def point(self) -> float:
        """Mean over seeds of the chosen point's accuracy (replicates averaged)."""
        return float(
            np.mean([c[:, g].mean() for c, g in zip(self.curves, self.chosen, strict=True)])
        )

    def per_seed(self) -> list[float]:
        return [float(c[:, g].mean()) for c, g in zip(self.curves, self.chosen, strict=True)]


def first_argmax(acc: np.ndarray) -> np.ndarray:
    """Index of the first maximum along the last axis (ties: the earlier grid point)."""
    m = acc.max(axis=-1, keepdims=True)
    return np.argmax(acc >= m - 1e-12, axis=-1)


def _draw_weights(
    fold_of: np.ndarray, n_reps: int, n_boot: int, rng: np.random.Generator, resample: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Question weights ``[B, N]`` and replicate weights ``[B, F, R]`` of one seed slot.

    Hierarchical: folds are drawn with replacement, then, for every drawn
    copy of a fold, its questions with replacement (and its replicates).
    ``resample=False`` gives unit weights (the level held fixed).
    """
    n = fold_of.shape[0]
    folds = np.unique(fold_of)
    if not resample:
        return np.ones((n_boot, n)), np.ones((n_boot, folds.size, n_reps))
    fold_counts = rng.multinomial(folds.size, np.full(folds.size, 1 / folds.size), size=n_boot)
    w = np.zeros((n_boot, n))
    r = np.zeros((n_boot, folds.size, n_reps))
    for fi, f in enumerate(folds):
        idx = np.flatnonzero(fold_of == f)
        w[:, idx] = rng.multinomial(fold_counts[:, fi] * idx.size, np.full(idx.size, 1 / idx.size))
        r[:, fi, :] = rng.multinomial(fold_counts[:, fi] * n_reps, np.full(n_reps, 1 / n_reps))
    return w, r


def _slot_acc(curves: np.ndarray, fold_of: np.ndarray, w: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Resampled accuracy ``[B, G]`` of one seed's curves under weights (w, r)."""
    num = np.zeros((w.shape[0], curves.shape[1]))
    for fi, f in enumerate(np.unique(fold_of)):
        idx = np.flatnonzero(fold_of == f)
        # [B, R] x [R, G, n_f] x [B, n_f] -> [B, G]
        per_rep = np.einsum("bn,rgn->brg", w[:, idx], curves[:, :, idx])
        rw = r[:, fi, :] / np.maximum(r[:, fi, :].sum(axis=1, keepdims=True), 1)  # fractions
        num += np.einsum("br,brg->bg", rw, per_rep)
    return num / w.sum(axis=1, keepdims=True)


def hierarchical_bootstrap(
    arms: Mapping[str, Arm],
    *,
    select_inside: Mapping[str, bool] | bool = False,
    paired: bool = False,
    resample_seeds: bool = True,
    resample_questions: bool = True,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Resampled accuracy ``[n_boot]`` of every role: seeds, then folds, then questions (and replicates).

    One resample draws the seeds with replacement (shared by all roles when
    ``paired``: seed i of every role is the same world), then, per drawn
    seed slot, the folds and within them the questions and RTT replicates.
    Question draws are shared by every role, so numerator and denominator of
    a recovery see the same hard questions; with ``paired`` they are drawn
    per slot (each seed has its own questions), otherwise once.

    ``select_inside`` (per role or for all): the attacker's choice of grid
    point is *redone* in every resample, on one draw of the folds, questions
    and replicates, and the chosen point is scored on an independent draw.
    When one grid point clearly wins this is the fixed-selection interval;
    when the grid is noisy the picks vary, and the interval carries both
    the chance of another pick and the optimism of the best-of-grid score
    (scoring on the selection draw would reward that optimism again).
    Otherwise the choice stays fixed (``Arm.chosen``), as for the honest
    attacker, whose choice never looks at V.
    """
    rng = np.random.default_rng(seed)
    inside = {
        k: (select_inside if isinstance(select_inside, bool) else select_inside[k]) for k in arms
    }
    ref = next(iter(arms.values()))
    fold_of = ref.fold_of
    n_reps = max(c.shape[0] for a in arms.values() for c in a.curves)
    if any(c.shape[0] != n_reps for a in arms.values() for c in a.curves):
        raise ValueError("every attack must have the same number of replicates")
    if paired and len({a.n_seeds for a in arms.values()}) != 1:
        raise ValueError("paired seeds need the same number of seeds in every role")

    def seed_draw(n: int) -> np.ndarray:
        if resample_seeds and n > 1:
            return rng.integers(0, n, size=(n_boot, n))
        return np.broadcast_to(np.arange(n), (n_boot, n))

    n_slots = max(a.n_seeds for a in arms.values())
    shared_s = seed_draw(ref.n_seeds) if paired else None
    n_draws = n_slots if paired else 1
    score_w = [
        _draw_weights(fold_of, n_reps, n_boot, rng, resample_questions) for _ in range(n_draws)
    ]
    sel_w = [
        _draw_weights(fold_of, n_reps, n_boot, rng, resample_questions) for _ in range(n_draws)
    ]
    out: dict[str, np.ndarray] = {}
    rows = np.arange(n_boot)
    for name, arm in arms.items():
        s_idx = shared_s if shared_s is not None else seed_draw(arm.n_seeds)
        total = np.zeros(n_boot)
        for j in range(arm.n_seeds):
            wj = score_w[j if paired else 0]
            vals = np.zeros(n_boot)
            for s in np.unique(s_idx[:, j]):
                hit = s_idx[:, j] == s
                curves = arm.curves[s]
                acc = _slot_acc(curves, fold_of, wj[0][hit], wj[1][hit])
                if inside[name]:
                    sw = sel_w[j if paired else 0]
                    g = first_argmax(_slot_acc(curves, fold_of, sw[0][hit], sw[1][hit]))
                else:
                    g = np.full(int(hit.sum()), arm.chosen[s])
                vals[hit] = acc[rows[: int(hit.sum())], g]
            total += vals
        out[name] = total / arm.n_seeds
    return out


def percentile_ci(samples: np.ndarray, level: float = CI_LEVEL) -> tuple[float, float]:
    """Percentile interval of bootstrap samples (non-finite samples dropped)."""
    return _percentile_ci(np.asarray(samples, float), level)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _sd(x: np.ndarray) -> float | None:
    x = x[np.isfinite(x)]
    return float(x.std(ddof=1)) if x.size > 1 else None


def rtt_intervals(
    original: Arm,
    unlearned: Arm,
    control: Arm | None,
    chance: float,
    *,
    select_inside: bool,
    paired: bool = False,
    n_boot: int = N_BOOT,
    level: float = CI_LEVEL,
    seed: int = 0,
    components: bool = True,
) -> dict[str, Any]:
    """CIs of the after-RTT accuracies and recoveries, and the SD each level contributes.

    Returns ``{key}_ci`` for ``original_rtt``, ``unlearned_rtt``,
    ``control_rtt``, ``recovery`` (chance-adjusted), ``recovery_raw`` and
    ``recovery_floor`` (floor-adjusted, with a control), all from one
    hierarchical bootstrap (:func:`hierarchical_bootstrap`), and
    ``components``: the bootstrap SD of ``unlearned_rtt`` and of each
    recovery when only seeds are resampled (``sd_seeds``), only folds,
    questions and replicates (``sd_questions``), or both (``sd_total``);
    ``components=False`` skips those two extra bootstraps.
    """
    arms = {"original": original, "unlearned": unlearned}
    if control is not None:
        arms["control"] = control

    def stats(b: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        o, u = b["original"], b["unlearned"]
        st = {
            "original_rtt": o,
            "unlearned_rtt": u,
            "recovery": _ratio(u - chance, o - chance),
            "recovery_raw": _ratio(u, o),
        }
        if "control" in b:
            st["control_rtt"] = b["control"]
            st["recovery_floor"] = _ratio(u - b["control"], o - b["control"])
        return st

    kw = {"select_inside": select_inside, "paired": paired, "n_boot": n_boot, "seed": seed}
    full = stats(hierarchical_bootstrap(arms, **kw))
    out: dict[str, Any] = {f"{k}_ci": percentile_ci(v, level) for k, v in full.items()}
    if not components:
        return out
    only_s = stats(hierarchical_bootstrap(arms, resample_questions=False, **kw))
    only_q = stats(hierarchical_bootstrap(arms, resample_seeds=False, **kw))
    out["components"] = {
        k: {"sd_seeds": _sd(only_s[k]), "sd_questions": _sd(only_q[k]), "sd_total": _sd(full[k])}
        for k in ("unlearned_rtt", "recovery", "recovery_floor")
        if k in full
    }
    return out


def hierarchical_curves(
    arms: Mapping[str, Arm],
    *,
    paired: bool = False,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Resampled accuracy ``[n_boot, G]`` of every role at *every* grid point, none selected.

    The resampling of :func:`hierarchical_bootstrap` (seeds, then folds, then
    questions and replicates; question draws shared by the roles, seed draws
    too when ``paired``), for statistics of a whole curve (the budget
    summaries, :mod:`rtteval.analysis.budget`) rather than of one point.
    """
    rng = np.random.default_rng(seed)
    ref = next(iter(arms.values()))
    n_reps = max(c.shape[0] for a in arms.values() for c in a.curves)
    if any(c.shape[0] != n_reps for a in arms.values() for c in a.curves):
        raise ValueError("every attack must have the same number of replicates")
    if paired and len({a.n_seeds for a in arms.values()}) != 1:
        raise ValueError("paired seeds need the same number of seeds in every role")

    def seed_draw(n: int) -> np.ndarray:
        return rng.integers(0, n, size=(n_boot, n)) if n > 1 else np.zeros((n_boot, 1), int)

    shared_s = seed_draw(ref.n_seeds) if paired else None
    n_draws = ref.n_seeds if paired else 1
    draws = [_draw_weights(ref.fold_of, n_reps, n_boot, rng, True) for _ in range(n_draws)]
    out: dict[str, np.ndarray] = {}
    for name, arm in arms.items():
        s_idx = shared_s if shared_s is not None else seed_draw(arm.n_seeds)
        total = np.zeros((n_boot, arm.curves[0].shape[1]))
        for j in range(arm.n_seeds):
            w, r = draws[j if paired else 0]
            for s in np.unique(s_idx[:, j]):
                hit = s_idx[:, j] == s
                total[hit] += _slot_acc(arm.curves[s], arm.fold_of, w[hit], r[hit])
        out[name] = total / arm.n_seeds
    return out
