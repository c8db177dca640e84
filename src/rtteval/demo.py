"""The demo: the embedded default end to end, as a study run by the runner.

``rtteval demo`` (``make demo``) runs the study config shipped inside the
package (``rtteval/configs/demo.yaml``, also at ``configs/demo.yaml``):
world -> pretrain the original and the never-learned control -> unlearn with
GD, RIA and RMU -> RTT on every fold of every model -> report.  It is the
same code path as ``rtteval run``, so the demo is resumable: interrupt it
and run it again, and finished jobs are kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any


def demo_config_path() -> Path:
    """The packaged demo study config."""
    return Path(str(resources.files("rtteval") / "configs" / "demo.yaml"))


def run_demo(
    out_dir: str | Path,
    *,
    overrides: Sequence[str] = (),
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or resume) the demo study into ``out_dir``; returns its results.json content."""
    from rtteval.analysis.report import load_results
    from rtteval.config.study import load_config
    from rtteval.outputs import check_output
    from rtteval.runner.driver import run_study

    out = Path(out_dir).resolve()
    check_output(out, overwrite=False, kind="study", resumable=True)  # name --out, not the config
    loaded = load_config(demo_config_path(), [f"output_dir={out}", *overrides])
    summary = run_study(loaded, say=say)
    if summary.failed:
        from rtteval.errors import UserError

        raise UserError(
            f"{len(summary.failed)} demo job(s) failed; see {out}/logs and `rtteval status {out}`"
        )
    if summary.report is not None and not summary.report["result"]:
        from rtteval.errors import UserError

        raise UserError(
            f"the demo produced no result ({summary.report['why']}); see report.md", file=out
        )
    results = load_results(out)
    results.setdefault("meta", {})["demo_wall_time"] = summary.wall_time
    return results
