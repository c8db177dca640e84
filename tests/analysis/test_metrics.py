"""Recovery arithmetic, selection rules and bootstrap CIs on synthetic inputs."""

import math

import numpy as np
import pytest

from rtteval.analysis.metrics import (
    Arm,
    CurvePoint,
    bootstrap_mean_ci,
    bootstrap_recovery_ci,
    chance_level,
    first_argmax,
    floor_recovery,
    hierarchical_bootstrap,
    percentile_ci,
    recovery,
    recovery_raw,
    rtt_intervals,
    select_honest,
    select_optimistic,
)


def test_chance_level_is_mean_of_one_over_k():
    assert chance_level([4] * 10) == 0.25
    assert chance_level([2, 4]) == pytest.approx(0.375)
    with pytest.raises(ValueError):
        chance_level([])


def test_recovery_is_chance_adjusted_and_raw_is_a_plain_ratio():
    # 88% "recovery" the paper's way can be much less above chance
    assert recovery_raw(0.8, 0.9) == pytest.approx(0.8 / 0.9)
    assert recovery(0.8, 0.9, 0.25) == pytest.approx((0.8 - 0.25) / (0.9 - 0.25))
    assert recovery(0.25, 0.9, 0.25) == 0.0  # back to chance only: nothing recovered
    assert recovery(0.9, 0.9, 0.25) == 1.0
    assert recovery(0.2, 0.9, 0.25) < 0  # below chance is allowed, not clipped
    # chance alone looks like 28% recovery in the raw ratio
    assert recovery_raw(0.25, 0.9) == pytest.approx(0.2778, abs=1e-4)
    # an original that RTT does not lift above chance tells us nothing
    assert math.isnan(recovery(0.5, 0.25, 0.25))
    assert math.isnan(recovery(0.5, 0.2, 0.25))
    assert math.isnan(recovery_raw(0.5, 0.0))


def _grid(v: dict[float, list[float]], h: dict[float, list[float]] | None = None):
    pts = []
    for lr, accs in v.items():
        for ep, acc in enumerate(accs):
            hold = None if h is None else h[lr][ep]
            pts.append(CurvePoint(lr, ep, acc, hold))
    return pts


def test_select_optimistic_takes_best_v_and_ignores_epoch_zero():
    pts = _grid({1e-4: [0.99, 0.3, 0.5, 0.6], 1e-3: [0.99, 0.7, 0.8, 0.75]})
    best = select_optimistic(pts)
    assert (best.lr, best.epoch, best.v_acc) == (1e-3, 2, 0.8)
    # epoch 0 (before RTT) is never a candidate, even when it is the highest
    assert best.v_acc < 0.99
    assert select_optimistic(pts, min_epoch=0).epoch == 0


def test_select_ties_go_to_smaller_lr_then_earlier_epoch():
    pts = _grid({3e-3: [0.2, 0.8, 0.8], 1e-3: [0.2, 0.6, 0.8, 0.8]})
    best = select_optimistic(pts)
    assert (best.lr, best.epoch) == (1e-3, 2)
    # order of the input does not matter
    assert select_optimistic(list(reversed(pts))) == best


def test_select_honest_uses_only_the_holdout():
    v = {1e-4: [0.3, 0.4, 0.9], 1e-3: [0.3, 0.6, 0.5]}
    h = {1e-4: [0.3, 0.5, 0.55], 1e-3: [0.3, 0.7, 0.6]}
    pts = _grid(v, h)
    honest = select_honest(pts)
    assert (honest.lr, honest.epoch) == (1e-3, 1)
    assert honest.v_acc == 0.6  # V at the honest choice, not V's best (0.9)
    assert select_optimistic(pts).v_acc == 0.9
    # no held-out slice -> no honest attacker
    assert select_honest(_grid(v)) is None
    assert select_optimistic([]) is None


def test_select_skips_nan_points():
    pts = [CurvePoint(1e-3, 1, float("nan"), float("nan")), CurvePoint(1e-3, 2, 0.4, 0.5)]
    assert select_optimistic(pts).epoch == 2
    assert select_honest(pts).epoch == 2


def test_bootstrap_mean_ci_brackets_the_mean_and_is_seeded():
    rng = np.random.default_rng(0)
    x = rng.random(200) < 0.7
    lo, hi = bootstrap_mean_ci(x, seed=1)
    assert lo < x.mean() < hi
    assert 0.05 < hi - lo < 0.2  # ~ 2 * 1.96 * sqrt(.21/200) = 0.127
    assert bootstrap_mean_ci(x, seed=1) == (lo, hi)
    assert bootstrap_mean_ci(np.ones(30)) == (1.0, 1.0)


def test_bootstrap_mean_ci_covers_the_truth_about_95_percent():
    rng = np.random.default_rng(123)
    hits = 0
    n_sims = 200
    for s in range(n_sims):
        x = rng.random(150) < 0.4
        lo, hi = bootstrap_mean_ci(x, n_boot=400, seed=s)
        hits += lo <= 0.4 <= hi
    assert 0.88 <= hits / n_sims <= 0.99


def test_recovery_ci_resamples_questions_jointly():
    rng = np.random.default_rng(0)
    o = (rng.random(200) < 0.9).astype(float)
    # identical correctness: joint resampling keeps recovery exactly 1
    cis = bootstrap_recovery_ci(o, o, 0.25, seed=0)
    assert cis["recovery"] == (1.0, 1.0)
    assert cis["recovery_raw"] == (1.0, 1.0)
    u = o * (rng.random(200) < 0.8)
    point = recovery(u.mean(), o.mean(), 0.25)
    lo, hi = bootstrap_recovery_ci(u, o, 0.25, seed=0)["recovery"]
    assert lo < point < hi
    with pytest.raises(ValueError):
        bootstrap_recovery_ci(u[:10], o, 0.25)


def test_bootstrap_resamples_seeds_when_several():
    # two seeds that disagree completely: question resampling alone sees no spread
    u = np.stack([np.ones(50), np.zeros(50)])
    lo, hi = bootstrap_mean_ci(u, seed=0)
    assert lo == 0.0 and hi == 1.0
    # one seed row equals the 1-D case
    x = (np.arange(40) % 3 == 0).astype(float)
    assert bootstrap_mean_ci(x[None, :], seed=3) == bootstrap_mean_ci(x, seed=3)
    # recovery with 3 unlearning seeds against 1 original seed
    o = np.ones((1, 50))
    cis = bootstrap_recovery_ci(np.stack([np.ones(50)] * 3), o, 0.25, seed=0)
    assert cis["recovery"] == (1.0, 1.0)


def test_paired_seeds_never_divide_one_world_by_another():
    # world A: unlearned 0.9, ceiling 1.0; world B: unlearned 0.45, ceiling 0.5 (chance 0):
    # each world recovers 90%, which paired resampling keeps; independent draws mix worlds
    u = np.stack([np.r_[np.ones(90), np.zeros(10)], np.r_[np.ones(45), np.zeros(55)]])
    o = np.stack([np.ones(100), np.r_[np.ones(50), np.zeros(50)]])
    paired = bootstrap_recovery_ci(u, o, 0.0, seed=0, paired_seeds=True)["recovery_raw"]
    mixed = bootstrap_recovery_ci(u, o, 0.0, seed=0)["recovery_raw"]
    assert paired[0] <= 0.9 <= paired[1]
    assert paired[1] - paired[0] < 0.5 * (mixed[1] - mixed[0])
    with pytest.raises(ValueError, match="equal seed counts"):
        bootstrap_recovery_ci(u, o[:1], 0.0, paired_seeds=True)


# --------------------------------------------------------------------------- hierarchical bootstrap

FOLD_OF = np.repeat(np.arange(5), 40)  # 5 folds of 40 questions


def _arm(curves: list[np.ndarray]) -> Arm:
    """Seeds' [G, N] (or [R, G, N]) curves; the fixed choice is each seed's best grid point."""
    cs = [c if c.ndim == 3 else c[None] for c in curves]
    return Arm(cs, FOLD_OF, [int(first_argmax(c.mean(axis=(0, 2)))) for c in cs])


def _width(ci: tuple[float, float]) -> float:
    return ci[1] - ci[0]


def test_interval_widens_when_seeds_disagree():
    rng = np.random.default_rng(0)
    n = FOLD_OF.size
    agree = _arm([(rng.random((1, n)) < 0.6).astype(float) for _ in range(3)])
    disagree = _arm([(rng.random((1, n)) < p).astype(float) for p in (0.3, 0.6, 0.9)])
    assert agree.point() == pytest.approx(disagree.point(), abs=0.05)
    w_agree = _width(percentile_ci(hierarchical_bootstrap({"x": agree}, n_boot=400)["x"]))
    w_dis = _width(percentile_ci(hierarchical_bootstrap({"x": disagree}, n_boot=400)["x"]))
    assert w_dis > 1.5 * w_agree
    # the components say where it comes from
    o = _arm([np.ones((1, n))] * 3)
    comp = rtt_intervals(o, disagree, None, 0.25, select_inside=False, n_boot=300)["components"]
    assert comp["unlearned_rtt"]["sd_seeds"] > comp["unlearned_rtt"]["sd_questions"]
    comp = rtt_intervals(o, agree, None, 0.25, select_inside=False, n_boot=300)["components"]
    assert comp["unlearned_rtt"]["sd_seeds"] < comp["unlearned_rtt"]["sd_questions"]


def test_selection_inside_the_bootstrap_widens_a_noisy_grid_only():
    rng = np.random.default_rng(1)
    g, n = 15, FOLD_OF.size
    # every grid point is a coin flip: the best of 15 is optimism, not skill
    noisy = _arm([(rng.random((g, n)) < 0.5).astype(float) for _ in range(2)])
    fixed = percentile_ci(hierarchical_bootstrap({"x": noisy}, n_boot=600)["x"])
    inside = percentile_ci(
        hierarchical_bootstrap({"x": noisy}, select_inside=True, n_boot=600)["x"]
    )
    assert _width(inside) > _width(fixed)
    assert (
        inside[0] < fixed[0] - 0.01
    )  # extends towards the truth (0.5), below the best-of-grid score
    # one grid point clearly best: the choice never changes, nor does the interval
    clear = [
        np.vstack([rng.random((g - 1, n)) < 0.3, rng.random((1, n)) < 0.9]).astype(float)
        for _ in range(2)
    ]
    a = _arm(clear)
    fixed = percentile_ci(hierarchical_bootstrap({"x": a}, n_boot=300)["x"])
    inside = percentile_ci(hierarchical_bootstrap({"x": a}, select_inside=True, n_boot=300)["x"])
    assert inside == fixed


def test_replicates_are_averaged_and_their_disagreement_widens_the_interval():
    rng = np.random.default_rng(2)
    n = FOLD_OF.size
    same = (rng.random((1, n)) < 0.6).astype(float)
    stable = _arm([np.stack([same, same, same])])
    noisy = _arm([np.stack([(rng.random((1, n)) < p).astype(float) for p in (0.2, 0.6, 1.0)])])
    assert noisy.point() == pytest.approx(np.mean([c.mean() for c in noisy.curves[0]]))
    w_stable = _width(percentile_ci(hierarchical_bootstrap({"x": stable}, n_boot=400)["x"]))
    w_noisy = _width(percentile_ci(hierarchical_bootstrap({"x": noisy}, n_boot=400)["x"]))
    assert w_noisy > w_stable


def test_floor_recovery_is_zero_at_the_floor_and_one_at_the_ceiling():
    assert floor_recovery(0.4, 0.9, 0.4) == 0.0
    assert floor_recovery(0.9, 0.9, 0.4) == 1.0
    assert floor_recovery(0.65, 0.9, 0.4) == pytest.approx(0.5)
    assert math.isnan(floor_recovery(0.5, 0.4, 0.4))  # a ceiling no higher than the floor
    # and its interval brackets those values on correctness arrays
    rng = np.random.default_rng(3)
    n = FOLD_OF.size
    c = (rng.random((1, n)) < 0.4).astype(float)
    o = _arm([np.ones((1, n))] * 2)
    for u, want in ((c, 0.0), (np.ones((1, n)), 1.0)):
        r = rtt_intervals(o, _arm([u] * 2), _arm([c] * 2), 0.25, select_inside=True, n_boot=200)
        lo, hi = r["recovery_floor_ci"]
        assert lo <= want <= hi and hi - lo < 1e-9
