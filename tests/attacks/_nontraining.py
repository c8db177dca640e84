"""What the tests of the attacks that do not train share: the chance bound, the CLI and YAML runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

from rtteval.attacks.records import ModelAttack


def chance_bound(n_choices: list[int], z: float = 3.0) -> tuple[float, float]:
    """Mean chance over the questions and a z-sigma binomial half-width for their mean."""
    p = [1 / k for k in n_choices]
    mean = sum(p) / len(p)
    sd = math.sqrt(sum(x * (1 - x) for x in p)) / len(p)
    return mean, z * sd


def assert_at_chance(a: ModelAttack) -> None:
    """Every setting's V accuracy (pooled over folds) is within the binomial bound of chance."""
    mean, half = chance_bound(a.n_choices)
    for p in a.curve_points():
        assert abs(p.v_acc - mean) <= half, (p, mean, half)


STUDY = """\
name: {name}
output_dir: {out}
model:
  hf: {{path: {original}, control: {{path: {control}}}}}
datasets:
  - name: w
    path: {world}
methods:
  - {{name: gd, grid: {{lr: [1.0e-4]}}, fixed: {{max_steps: 2}}}}
selection: {{retain_threshold: 1.0}}
attacks:
{attacks}
executor: {{kind: sequential, threads_per_worker: 1}}
report: {{n_boot: 20, plots: {plots}}}
"""


def micro_study(
    name: str, out: Path, pretrained_tiny: dict[str, Path], attacks: list[str], plots: bool = False
) -> str:
    """A study YAML on the micro model: one GD point, then ``attacks`` (flow-style entries)."""
    paths = {k: str(v) for k, v in pretrained_tiny.items()}
    listed = "\n".join(f"  - {a}" for a in attacks)
    return STUDY.format(name=name, out=out, attacks=listed, plots=str(plots).lower(), **paths)


def run_yaml(cli, tmp_path: Path, pretrained_tiny: dict[str, Path], name: str, attack: str) -> dict:
    """Run a one-attack study on the micro model; results.json."""
    out = tmp_path / "out"
    p = tmp_path / f"{name}.yaml"
    p.write_text(micro_study(name, out, pretrained_tiny, [attack]))
    res = cli("run", p)
    assert res.returncode == 0, res.stderr
    results = json.loads((out / "results.json").read_text())
    results["_report_md"] = (out / "report.md").read_text()
    return results


def cli_args(pretrained_tiny: dict[str, Path], attack: str) -> list[str]:
    return [
        "attack", "--attack", attack, "--model", str(pretrained_tiny["control"]),
        "--original", str(pretrained_tiny["original"]), "--data", str(pretrained_tiny["world"]),
        "--folds", "split_1", "--n-boot", "20", "--method-name", "never",
    ]  # fmt: skip


def run_cli(
    cli, tmp_path: Path, pretrained_tiny: dict[str, Path], attack: str, *extra: str
) -> dict:
    """``rtteval attack --attack NAME`` on the micro model (unlearned = control); results.json."""
    out = tmp_path / attack
    r = cli(*cli_args(pretrained_tiny, attack), *extra, "--out", out)
    assert r.returncode == 0, r.stderr
    return json.loads((out / "results.json").read_text())
