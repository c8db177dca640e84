"""Across attacks: recovery per method × attack, and each method's worst case.

A study that runs several attacks gets one summary row per (dataset,
attack, method) (``"<dataset> [<attack>]"``).  The question a reader brings
is the paper's Figure 1 asked of every attack at once: for each unlearning
method, does *any* attack bring the facts back?  So this module lines the
rows up by base dataset and method, one column per attack, and picks per
method the attack with the highest recovery.

The number is the floor-adjusted recovery when every compared attack of the
method has the never-learned control (the primary number, report.md's
header says why), else the chance-adjusted one for all of them, so a worst
case never compares two kinds of number.  A diagnostic attack (a config
type with ``diagnostic = True``: ``probe``) is shown, marked, but never a
worst case: a probe is trained, so what it reads is not what an attacker
gets out of the model.  Picking the maximum over attacks is itself
optimistic (the largest of several noisy estimates is biased upward, and
the CI shown is the chosen attack's alone); the report says so.

Everything is computed from ``results["summary"]``, so ``rtteval report``
regenerates it from results.json.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

FIGURE = "fig_attacks.png"
OPTIMISM_NOTE = (
    "Picking the maximum over attacks is itself optimistic: the largest of several noisy "
    "estimates is biased upward, and the interval shown is the chosen attack's own, which "
    "does not cover the choice among attacks."
)


def _diagnostic(attack: str) -> bool:
    from rtteval.attacks import ATTACKS

    cls = ATTACKS.get(attack)
    return bool(getattr(cls.config_type, "diagnostic", False)) if cls is not None else False


def _group(e: Mapping[str, Any]) -> str:
    """The base dataset a row belongs to (its regime too, when the facts were fine-tuned in)."""
    base = str(e.get("base_dataset") or e["dataset"])
    regime = e.get("regime") or "pretrained"
    return base if regime == "pretrained" else f"{base} ({regime})"


def build_overview(results: Mapping[str, Any]) -> dict[str, Any] | None:
    """The methods × attacks table and the worst case per method; None with fewer than 2 attacks.

    Per (dataset, method, attack) the row with the largest |T| is used (a
    ``t_sizes`` study also has rows with smaller T).
    """
    rows: dict[tuple[str, str, str], Mapping[str, Any]] = {}
    for e in results.get("summary", []):
        key = (_group(e), str(e["method"]), str(e.get("attack") or "rtt"))
        if key not in rows or (e.get("train_splits") or 0) > (rows[key].get("train_splits") or 0):
            rows[key] = e
    attacks = list(dict.fromkeys(k[2] for k in rows))
    if len(attacks) < 2:
        return None
    attacks.sort(key=lambda a: (_diagnostic(a), a != "rtt"))  # rtt first, diagnostics last
    cells, worst = [], []
    for ds, method in dict.fromkeys((k[0], k[1]) for k in rows):
        mine = {a: rows[(ds, method, a)] for a in attacks if (ds, method, a) in rows}
        attackers = [a for a in mine if not _diagnostic(a)]
        floor = bool(attackers) and all(
            mine[a].get("recovery_floor") is not None for a in attackers
        )
        metric = "recovery_floor" if floor else "recovery"
        for a, e in mine.items():
            m = metric if e.get(metric) is not None or a in attackers else "recovery"
            cells.append(
                {
                    "dataset": ds,
                    "method": method,
                    "attack": a,
                    "metric": m,
                    "recovery": e.get(m),
                    "ci": e.get(f"{m}_ci"),
                    "diagnostic": _diagnostic(a),
                    "chosen": (e.get("chosen") or {}).get("unlearned_rtt"),
                }
            )
        scored = [(mine[a][metric], a) for a in attackers if mine[a].get(metric) is not None]
        if scored:
            value, best = max(scored, key=lambda x: x[0])  # ties: the first in column order
            worst.append(
                {
                    "dataset": ds,
                    "method": method,
                    "attack": best,
                    "metric": metric,
                    "recovery": value,
                    "ci": mine[best].get(f"{metric}_ci"),
                    "compared": [a for _, a in scored],
                }
            )
    return {"attacks": attacks, "cells": cells, "worst_case": worst, "note": OPTIMISM_NOTE}


def with_overview(results: dict[str, Any]) -> dict[str, Any]:
    """``results`` with ``overview`` (re)computed from its summary, or without it (one attack)."""
    results.pop("overview", None)
    ov = build_overview(results)
    return results if ov is None else {**results, "overview": ov}


def _fmt(x: float | None, ci: Sequence[float | None] | None) -> str:
    if x is None:
        return "—"
    if ci and ci[0] is not None and ci[1] is not None:
        return f"{x:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"
    return f"{x:.2f}"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def overview_markdown(results: Mapping[str, Any]) -> list[str]:
    """report.md's section: Figure 1 across attacks, then the worst case per method."""
    ov = results.get("overview")
    if not ov:
        return []
    attacks = ov["attacks"]
    names = {"recovery_floor": "floor-adjusted", "recovery": "chance-adjusted"}
    heads = [f"{a} (diagnostic)" if _diagnostic(a) else a for a in attacks]
    by_cell = {(c["dataset"], c["method"], c["attack"]): c for c in ov["cells"]}
    pairs = list(dict.fromkeys((c["dataset"], c["method"]) for c in ov["cells"]))
    rows = [
        [ds, m]
        + [_fmt(c["recovery"], c["ci"]) if (c := by_cell.get((ds, m, a))) else "—" for a in attacks]
        for ds, m in pairs
    ]
    worst = [
        [w["dataset"], w["method"], f"`{w['attack']}`", _fmt(w["recovery"], w["ci"]),
         names[w["metric"]], ", ".join(w["compared"])]
        for w in ov["worst_case"]
    ]  # fmt: skip
    diag = [a for a in attacks if _diagnostic(a)]
    return [
        "## Across attacks — worst case per method",
        "",
        "The paper's Figure 1 asks, per method, whether retraining on T brings the unlearned "
        "facts back. Here the same question is put to every attack of the study: each cell is "
        "the method's recovery under that attack (optimistic selection, 95% CI), floor-adjusted "
        "where every attack of the method has the never-learned control, else chance-adjusted."
        + (
            f" {', '.join(f'`{a}`' for a in diag)} is a diagnostic, not a recovery: "
            "its probe is trained, so its column says what the hidden states still encode, "
            "and it is never a worst case."
            if diag
            else ""
        ),
        "",
        *_table(["dataset", "method", *heads], rows),
        "",
        f"![methods × attacks]({FIGURE})",
        "",
        "**Worst case per method**: the attack with the highest recovery. " + ov["note"],
        "",
        *_table(["dataset", "method", "worst attack", "recovery", "kind", "compared"], worst),
        "",
    ]


def plot_overview(results: Mapping[str, Any], path: Path) -> bool:
    """The methods × attacks heatmap (recovery and CI in each cell); False when there is none."""
    ov = results.get("overview")
    if not ov:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    attacks = ov["attacks"]
    pairs = list(dict.fromkeys((c["dataset"], c["method"]) for c in ov["cells"]))
    by_cell = {(c["dataset"], c["method"], c["attack"]): c for c in ov["cells"]}
    worst = {(w["dataset"], w["method"]): w["attack"] for w in ov["worst_case"]}
    grid = np.full((len(pairs), len(attacks)), np.nan)
    for i, (ds, m) in enumerate(pairs):
        for j, a in enumerate(attacks):
            c = by_cell.get((ds, m, a))
            if c is not None and c["recovery"] is not None:
                grid[i, j] = c["recovery"]
    fig, ax = plt.subplots(
        figsize=(1.7 * len(attacks) + 2.5, 0.75 * len(pairs) + 1.8), squeeze=True
    )
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="Reds", vmin=0.0, vmax=1.0, aspect="auto")
    for i, (ds, m) in enumerate(pairs):
        for j, a in enumerate(attacks):
            c = by_cell.get((ds, m, a))
            text = "—" if c is None else _fmt(c["recovery"], c["ci"]).replace(" [", "\n[")
            bold = worst.get((ds, m)) == a
            dark = c is not None and c["recovery"] is not None and c["recovery"] > 0.6
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="white" if dark else "black",
                    fontweight="bold" if bold else "normal")  # fmt: skip
            if c is not None and c["diagnostic"]:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="//",
                                           edgecolor="0.6", lw=0))  # fmt: skip
    ax.set_xticks(range(len(attacks)),
                  [f"{a}\n(diagnostic)" if _diagnostic(a) else a for a in attacks], fontsize=8)  # fmt: skip
    multi = len({ds for ds, _ in pairs}) > 1
    kind = {(w["dataset"], w["method"]): w["metric"] for w in ov["worst_case"]}
    ax.set_yticks(range(len(pairs)), [
        (f"{ds} / {m}" if multi else m)
        + ("\n(chance-adj.)" if kind.get((ds, m)) == "recovery" else "")
        for ds, m in pairs
    ])  # fmt: skip
    ax.set_title(
        "recovery per method × attack: floor-adjusted unless marked (bold: worst case; "
        "hatched: diagnostic)",
        fontsize=9,
    )
    fig.colorbar(im, ax=ax, fraction=0.04, label="recovery")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
