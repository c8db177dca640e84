"""Study configs: validation errors are one line with file:line and key, exit 2; shipped configs plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rtteval.config.study import load_config
from rtteval.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

GOOD = """\
name: t
output_dir: out
model:
  tiny:
    preset: micro
datasets:
  - name: w
    world: {preset: tiny, seed: 0}
methods:
  - name: gd
    grid:
      lr: [1.0e-3, 3.0e-3]
attacks:
  - name: rtt
    lrs: [1.0e-3]
    epochs: 1
"""


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "study.yaml"
    p.write_text(text)
    return p


def test_good_config_resolves_paths_and_overrides(tmp_path: Path, monkeypatch) -> None:
    p = _write(tmp_path, GOOD)
    monkeypatch.chdir(REPO)
    loaded = load_config(p, ["attacks.0.epochs=3", "seeds=[0, 1]", "methods.0.grid.lr=[0.01]"])
    cfg = loaded.config
    assert cfg.output_dir == str(tmp_path / "out")  # relative to the config file
    assert cfg.attacks[0].epochs == 3 and cfg.seeds == [0, 1]
    assert cfg.methods[0].grid == {"lr": [0.01]}
    over = load_config(p, ["output_dir=elsewhere"]).config
    assert over.output_dir == str(REPO / "elsewhere")  # command-line paths: relative to the CWD


@pytest.mark.parametrize(
    ("edit", "expect"),
    [
        (
            ("    preset: micro\n", "    preset: micro\n    colour: red\n"),
            r"study.yaml:6: field 'model.tiny.colour': unknown key; expected one of: preset, pretrain",
        ),
        (
            ("  epochs: 1\n", "  epochs: many\n"),
            r"study.yaml:16: field 'attacks.0.epochs': Input should be a valid integer",
        ),
        (
            ("    world: {preset: tiny, seed: 0}\n", "    path: no/such/dir\n"),
            r"study.yaml:7: field 'datasets.0': a tiny model is pretrained from scratch",
        ),
        (
            [
                ("  tiny:\n    preset: micro\n", "  hf: {id: some/model}\n"),
                ("    world: {preset: tiny, seed: 0}\n", "    path: no/such/dir\n"),
            ],
            r"study.yaml:7: field 'datasets.0.path': dataset directory does not exist",
        ),
        (
            ("  - name: gd\n", "  - name: frobnicate\n"),
            r"study.yaml:10: field 'methods.0.name': unknown unlearning method 'frobnicate'; known:",
        ),
        (
            ("      lr: [1.0e-3, 3.0e-3]\n", "      lr: []\n"),
            r"study.yaml:12: field 'methods.0.grid.lr': List should have at least 1 item",
        ),
        (
            ("      lr: [1.0e-3, 3.0e-3]\n", "      bogus: [1]\n"),
            r"study.yaml:10: field 'methods.0': Value error, grid: method 'gd' has no setting 'bogus'",
        ),
        (("  lrs: [1.0e-3]\n", "  lrs: [1.0e-3\n"), r"study.yaml:16: invalid YAML"),
        (
            ("methods:\n  - name: gd\n    grid:\n      lr: [1.0e-3, 3.0e-3]\n", ""),
            r"study.yaml: field 'methods': give at least one method (or 'unlearned' models",
        ),
        (
            ("methods:\n", "unlearned:\n  - {label: control, path: .}\nmethods:\n"),
            r"study.yaml:10: field 'unlearned.0.label': 'control' names another arm",
        ),
        (  # a union's member (int or "all") is not a key: the field is where the value is
            ("    epochs: 1\n", "    epochs: 1\n  - {name: unrelated_relearn, ks: [0]}\n"),
            r"study.yaml:17: field 'attacks.1.ks.0': Input should be greater than or equal to 1 "
            r"(got 0)",
        ),
        (
            (
                "    epochs: 1\n",
                "    epochs: 1\n  - {name: unrelated_relearn, corpus: no/such.jsonl}\n",
            ),
            r"study.yaml:17: field 'attacks.1.corpus': no/such.jsonl: no such file or directory",
        ),
        (
            ("methods:\n", "unlearned:\n  - {label: x, path: no/such/model}\nmethods:\n"),
            r"study.yaml:10: field 'unlearned.0.path': unlearned model directory does not exist",
        ),
    ],
)
def test_bad_configs_are_one_line_exit_2(tmp_path: Path, cli, edit, expect) -> None:
    import re

    text = GOOD
    for old, new in edit if isinstance(edit, list) else [edit]:
        assert old in text
        text = text.replace(old, new)
    res = cli("run", _write(tmp_path, text))
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    pattern = expect.replace("Value error, ", "")
    assert re.search(re.escape(pattern), lines[0]), lines[0]
    assert not (tmp_path / "out").exists()  # nothing was started


def test_bad_override_and_missing_file(tmp_path: Path, cli) -> None:
    p = _write(tmp_path, GOOD)
    res = cli("run", p, "attacks.0.epochs=zero")
    assert res.returncode == 2
    assert "override 'attacks.0.epochs=zero': field 'attacks.0.epochs'" in res.stderr
    res = cli("run", p, "executor.kind=slurm")
    assert res.returncode == 2 and "executor.kind" in res.stderr
    res = cli("run", tmp_path / "nope.yaml")
    assert res.returncode == 2 and "config file does not exist" in res.stderr
    res = cli("run", p, "noequals")
    assert res.returncode == 2 and "not key=value" in res.stderr


def test_semantic_checks(tmp_path: Path) -> None:
    text = GOOD.replace("    world: {preset: tiny, seed: 0}\n", f"    path: {tmp_path}\n")
    with pytest.raises(ConfigError, match="tiny model is pretrained from scratch"):
        load_config(_write(tmp_path, text))
    text = GOOD.replace("  - name: gd\n", "  - name: gd\n  - name: gd\n")
    with pytest.raises(ConfigError, match="two entries named"):
        load_config(_write(tmp_path, text))
    text = GOOD.replace("{preset: tiny, seed: 0}", "{preset: huge}")
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        load_config(_write(tmp_path, text))


def test_dry_run_missing_dataset_is_a_warning(tmp_path: Path, cli) -> None:
    text = GOOD.replace("  tiny:\n    preset: micro\n", "  hf: {id: some/model}\n").replace(
        "    world: {preset: tiny, seed: 0}\n", "    path: data/x\n    splits: [a, b]\n"
    )
    p = _write(tmp_path, text)
    res = cli("run", p, "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "warning:" in res.stderr and "dataset directory does not exist" in res.stderr
    last = json.loads(res.stdout.strip().splitlines()[-1])
    # original (2 folds) + gd: 2 unlearn, 1 select, 2 attacks
    assert last["jobs"] == 7 and last["by_stage"]["attack"] == 4
    assert cli("run", p).returncode == 2  # a real run refuses


SHIPPED = sorted((REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_configs_plan_without_loading_models(path: Path, cli, monkeypatch) -> None:
    import transformers

    def refuse(*a, **k):
        raise AssertionError("--dry-run must not load a model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    res = cli("run", path, "--dry-run")
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout.strip().splitlines()[-1])
    assert plan["dry_run"] and plan["jobs"] > 0
    assert plan["by_stage"]["attack"] >= 1 and plan["by_stage"]["unlearn"] >= 1
    if "paper" in path.parts:
        assert "paper" in path.parent.name
        assert "unlearn" in res.stdout and plan["jobs"] >= 40
    if path.stem == "years_llama3_8b":
        # original: 5 folds; 4 methods: 8 + 9 + 9 + 9 unlearn points, a select and 5 attacks each
        assert plan["by_stage"] == {"attack": 25, "unlearn": 35, "select": 4}
    if path.stem == "random_bd_llama3_8b":
        assert plan["by_stage"]["finetune"] == 1
        # original + control + 4 methods, on the 5 forget folds (split_5..9 are retain data)
        assert plan["by_stage"]["attack"] == 30


REGIMES = """\
name: r
output_dir: out
seeds: [0, 1]
model:
  tiny: {preset: micro}
datasets:
  - name: w
    world: {preset: tiny, seed: 5, vary_with_seed: true}
    t_sizes: [1, 2, 4]
  - name: w-ft
    world: {preset: tiny, seed: 5, vary_with_seed: true}
    finetune_first: true
methods:
  - name: gd
attacks: [{name: rtt, lrs: [1.0e-3], epochs: 1}]
"""


def test_plan_regimes_world_per_seed_and_t_sizes(tmp_path: Path) -> None:
    from rtteval.runner.plan import build_plan

    plan = build_plan(load_config(_write(tmp_path, REGIMES)).config)
    jobs = {p.job.name: p.job for p in plan.jobs}
    # one world per seed, shared by both regimes; so is the control
    worlds = [j for j in plan.jobs if j.job.stage == "world"]
    assert sorted(j.job.config["seed"] for j in worlds) == [5, 6]
    assert "pretrain control w-ft s0" not in jobs
    # the fine-tuned regime's original is the control, fine-tuned (tiny defaults)
    ft = jobs["finetune w-ft s0"]
    assert ft.config["model"] == "dep" and ft.config["finetune"]["lr"] == 1e-3
    assert jobs["pretrain control w s0"].key in ft.deps
    assert "pretrain original w-ft s0" not in jobs
    # |T| = 4 is the full T (5 splits): variants 1 and 2 only, for the pretrained regime
    labels = {(g.dataset, g.regime, g.train_splits) for g in plan.groups}
    assert labels == {("w", "pretrained", None), ("w |T|=1", "pretrained", 1),
                      ("w |T|=2", "pretrained", 2), ("w-ft", "finetuned", None)}  # fmt: skip
    assert jobs["attack gd w |T|=1 s1 split_3"].config["rtt"]["train_splits"] == 1
    # the control's attacks are the same jobs in both regimes
    ctl = [g for g in plan.groups if g.role == "control" and g.train_splits is None]
    assert len(ctl) == 4 and ctl[0].keys == ctl[2].keys  # w s0, w s1, w-ft s0, w-ft s1
    # 2 seeds x (w: 3 models x 5 folds x 3 sizes + w-ft: original + gd x 5 folds)
    assert plan.counts()["attack"] == 2 * (45 + 10)
    with pytest.raises(ConfigError, match="T has at most 4"):
        build_plan(load_config(_write(tmp_path, REGIMES.replace("[1, 2, 4]", "[5]"))).config)


def test_unlearn_job_keys_follow_the_methods_defaults(tmp_path: Path, monkeypatch) -> None:
    """A run dir made under other method defaults is redone, not silently reused."""
    from rtteval.methods import get_method
    from rtteval.runner.plan import build_plan

    def unlearn_keys() -> list[str]:
        plan = build_plan(load_config(_write(tmp_path, REGIMES)).config)
        return sorted(p.job.key for p in plan.jobs if p.job.stage == "unlearn")

    before = unlearn_keys()
    assert before == unlearn_keys()  # deterministic
    gd = type(get_method("gd"))
    changed = {**gd.defaults, "tiny": {**gd.defaults["tiny"], "lr": 0.5}}
    monkeypatch.setattr(gd, "defaults", changed)
    after = unlearn_keys()
    assert len(after) == len(before) and not set(after) & set(before)
