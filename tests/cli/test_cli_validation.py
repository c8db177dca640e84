"""User mistakes on the command line: exit 2 and one line on stderr, never a traceback.

The option sweep reads every command's numeric options from the typer app
itself, so an option added later is swept (and must declare its range with
:class:`rtteval.cli.options.Number`) without editing this file.  Every case
is refused by the option parser, before any data or model is loaded.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import typer

from rtteval.cli.main import app
from rtteval.cli.options import Number


def _commands() -> list[tuple[list[str], object]]:
    out = []

    def walk(cmd: object, path: list[str]) -> None:
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(sub, [*path, name])
        else:
            out.append((path, cmd))

    walk(typer.main.get_command(app), [])
    return out


def _numeric_options() -> list[tuple[list[str], object, object]]:
    """(command path, command, option) for every int/float option of every command."""
    found = []
    for path, cmd in _commands():
        for p in cmd.params:
            if p.type_descriptor.annotation in (int, float) and getattr(p, "opts", None):
                found.append((path, cmd, p))
    return found


def _required_args(cmd: object, skip: object) -> list[str]:
    """Placeholder values for the command's required options and arguments."""
    args: list[str] = []
    for p in cmd.params:
        if p is skip or not p.required:
            continue
        if type(p).__name__ == "TyperArgument":
            args.append("placeholder")
        else:
            args += [p.opts[0], "placeholder"]
    return args


NUMERIC = _numeric_options()


def test_the_sweep_sees_every_command():
    names = {" ".join(path) for path, _c, _p in NUMERIC}
    assert {"world", "pretrain", "finetune", "eval", "attack", "unlearn"} <= names
    assert len(NUMERIC) >= 35


@pytest.mark.parametrize(
    "path, cmd, opt", NUMERIC, ids=[f"{' '.join(p)} {o.opts[0]}" for p, _c, o in NUMERIC]
)
def test_numeric_option_sweep(path, cmd, opt, cli):
    spec = opt.type_descriptor.parameter_info.parser
    assert isinstance(spec, Number), f"{opt.opts[0]} must declare its range with cli.options.Number"
    flag = opt.opts[0]
    assert spec.describe() in (opt.help or ""), f"{flag}: --help does not show its range"
    values = ["0", "-1", "abc"] + (["inf", "nan"] if spec.kind is float else ["1.5"])
    for value in values:
        try:
            legit = spec.accepts(float(value)) and (
                spec.kind is float or value.lstrip("-").isdigit()
            )
        except ValueError:
            legit = False
        args = [*_required_args(cmd, opt), flag, value]
        if legit:
            # a documented value: the parser takes it (nothing is run)
            ctx = cmd.make_context(" ".join(path), list(args))
            assert ctx.params[opt.name] == float(value)
            assert value != "0" or opt.name == "seed" or "0:" in (opt.help or ""), (
                f"{flag} accepts 0: its help must say what 0 means"
            )
            continue
        r = cli(*path, *args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2, (flag, value, r.stderr)
        assert len(lines) == 1, (flag, value, r.stderr)
        assert flag in lines[0] and "Traceback" not in r.stderr, lines[0]
        assert r.stdout == ""


def test_negative_values_are_refused_everywhere():
    """No numeric option has a meaning for a negative number (so the sweep's -1 always fails)."""
    assert all(not o.type_descriptor.parameter_info.parser.accepts(-1) for _p, _c, o in NUMERIC)


# --------------------------------------------------------------------------- study configs


def _study(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "study.yaml"
    p.write_text(
        "name: v\n"
        "model:\n  tiny: {preset: micro}\n"
        "datasets:\n  - world: {preset: tiny}\n"
        "methods:\n  - name: gd\n" + body,
        encoding="utf-8",
    )
    return p


def _one_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_item2_zero_workers_refused(tmp_path, cli):
    p = _study(tmp_path, "executor: {kind: processes, workers: 0}\n")
    line = _one_line(cli("run", p, "--dry-run"))
    assert "study.yaml:8" in line and "executor.workers" in line
    assert not (tmp_path / "runs").exists()


def test_item4_negative_seed_refused_at_load(tmp_path, cli):
    line = _one_line(cli("run", _study(tmp_path, "seeds: [0, -1]\n"), "--dry-run"))
    assert "study.yaml:8" in line and "seeds.1" in line and "greater than or equal to 0" in line


@pytest.mark.parametrize(
    "body, field, line",
    [
        (
            "attacks:\n  - name: rtt\n    epochs: 2\n    epochs: 3\n",
            "attacks.0.epochs",
            11,
        ),  # duplicate key
        ("attacks: [{name: rtt, epochs: true}]\n", "attacks.0.epochs", 8),  # bool is not an int
        ("attacks: [{name: rtt, epochs: 1e23}]\n", "attacks.0.epochs", 8),  # a float is not an int
        ("attacks: [{name: rtt, grad_clip: -1}]\n", "attacks.0.grad_clip", 8),
        ("attacks: [{name: rtt, lrs: [.inf]}]\n", "attacks.0.lrs.0", 8),
    ],
)
def test_item6_bad_values_name_file_line_field(tmp_path, cli, body, field, line):
    msg = _one_line(cli("run", _study(tmp_path, body), "--dry-run"))
    assert f"study.yaml:{line}" in msg and field in msg


def test_item6_yaml_1e_notation_is_a_float(tmp_path):
    from rtteval.config.study import load_config

    p = _study(tmp_path, "    grid: {lr: [1e-3, 3e-4]}\nattacks: [{name: rtt, lrs: [1e-4]}]\n")
    cfg = load_config(p).config
    assert cfg.methods[0].grid["lr"] == [1e-3, 3e-4] and cfg.attacks[0].lrs == [1e-4]


@pytest.mark.parametrize(
    "args, flag",
    [
        (["unlearn", "--model", "m", "--data", "d", "--method", "gd", "--out", "o", "--epochs", "0"],
         "--epochs"),
        (["pretrain", "--world", "w", "--out", "o", "--max-epochs", "0"], "--max-epochs"),
        (["pretrain", "--world", "w", "--out", "o", "--target", "2"], "--target"),
        (["eval", "--model", "m", "--data", "d", "--batch-size", "0"], "--batch-size"),
        (["pretrain", "--world", "w", "--out", "o", "--lr", "-1"], "--lr"),
        (["eval", "--model", "m", "--data", "d", "--mode", "bogus"], "--mode"),
    ],
)  # fmt: skip
def test_item6_item12_cli_values(tmp_path, cli, args, flag):
    assert flag in _one_line(cli(*args))


@pytest.mark.parametrize(
    "fixed, field",
    [
        ("    fixed: {lr: -0.001}\n", "methods.0.fixed.lr"),
        ("    fixed: {lr: 0}\n", "methods.0.fixed.lr"),
        ("    grid: {lr: [0.001, -1]}\n", "methods.0.grid.lr.1"),
        ("    fixed: {retain_coef: -2}\n", "methods.0.fixed.retain_coef"),
        ("    fixed: {epochs: true}\n", "methods.0.fixed.epochs"),
    ],
)
def test_item10_method_values_checked_at_load(tmp_path, cli, fixed, field):
    msg = _one_line(cli("run", _study(tmp_path, fixed), "--dry-run"))
    assert "study.yaml:8" in msg and field in msg


def test_item10_every_method_declares_its_hyperparameters():
    from rtteval.methods import METHODS
    from rtteval.methods.base import PAPER_TRAIN, TINY_TRAIN, TRAIN_PARAM_TYPES

    for cls in METHODS.values():
        assert set(cls.hparam_types) == set(cls.hparam_names), cls.name
        for scale in ("tiny", "paper"):  # the shipped defaults pass their own declared types
            for k, v in cls.defaults[scale].items():
                assert cls.param_error(k, v) is None, (cls.name, scale, k, v)
    for k, v in {**TINY_TRAIN, **PAPER_TRAIN}.items():
        assert k in TRAIN_PARAM_TYPES and METHODS["gd"].param_error(k, v) is None


def test_item10_train_types_cover_the_unlearn_config():
    from dataclasses import fields

    from rtteval.methods.base import TRAIN_PARAM_TYPES
    from rtteval.stages.unlearn import UnlearnConfig

    settable = {f.name for f in fields(UnlearnConfig)} - {"method", "hparams", "seed"}
    assert set(TRAIN_PARAM_TYPES) == settable


def test_item10_unlearn_grid_values(cli):
    args = ["unlearn", "--model", "m", "--data", "d", "--method", "gd", "--out", "o"]
    msg = _one_line(cli(*args, "--grid", '{"lr": [0.001, -1]}'))
    assert "--grid" in msg and "lr" in msg


def test_item11_device(tmp_path, cli):
    msg = _one_line(cli("run", _study(tmp_path, "device: bogus\n"), "--dry-run"))
    assert "study.yaml:8" in msg and "device" in msg
    msg = _one_line(cli("eval", "--model", "m", "--data", "d", "--device", "bogus"))
    assert "--device" in msg and "bogus" in msg
    import torch

    if not torch.cuda.is_available():
        msg = _one_line(cli("run", _study(tmp_path, "device: cuda\n"), "--dry-run"))
        assert "study.yaml:8" in msg and "no CUDA GPU" in msg
        # a ray cluster's GPUs are elsewhere: only the name is checked
        ok = cli("run", _study(tmp_path, "device: cuda\nexecutor: {kind: ray}\n"), "--dry-run")
        assert ok.returncode == 0, ok.stderr


def test_item12_config_file_problems(tmp_path, cli):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("name: caf\xe9\n".encode("latin-1"))
    msg = _one_line(cli("run", p, "--dry-run"))
    assert "latin1.yaml:1" in msg and "UTF-8" in msg
    bomb = tmp_path / "bomb.yaml"
    rows = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    rows += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    bomb.write_text("\n".join(rows) + "\n")
    t0 = time.perf_counter()
    msg = _one_line(cli("run", bomb, "--dry-run"))
    assert "aliases expand" in msg and time.perf_counter() - t0 < 10
    msg = _one_line(cli("run", tmp_path))  # item 14: a directory, not a config
    assert "is a directory" in msg and "rtteval status" in msg


def test_item12_unreadable_dataset_directory(tmp_path, cli, monkeypatch):
    d = tmp_path / "ds"
    d.mkdir()
    real = Path.iterdir

    def denied(self):
        if self == d:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    # chmod does not stop root (tests may run as root), so deny the read itself
    monkeypatch.setattr(Path, "iterdir", denied)
    msg = _one_line(cli("data", "check", str(d)))
    assert str(d) in msg and "Permission denied" in msg


def test_item12_corrupt_runs_db(tmp_path, cli):
    (tmp_path / "runs.db").write_bytes(b"this is not a database, just bytes" * 100)
    msg = _one_line(cli("status", tmp_path))
    assert "runs.db" in msg and "corrupt" in msg and "move it aside" in msg


def test_item12_report_on_a_non_object(tmp_path, cli):
    (tmp_path / "results.json").write_text("[1, 2, 3]\n")
    msg = _one_line(cli("report", tmp_path))
    assert "results.json" in msg and "JSON object" in msg


def test_item13_missing_model_decided_quickly_without_network(tiny_world):
    """A real subprocess: a bogus hub id with no network is one line within seconds."""
    import subprocess
    import sys

    from rtteval.data.hub import hub_reachable

    if hub_reachable():
        pytest.skip("the Hugging Face Hub is reachable from here")
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "rtteval.cli", "eval", "--model", "nosuch-org/nosuch-model",
         "--data", str(tiny_world)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "no such local model directory" in lines[0] and "unreachable" in lines[0]
    assert wall < 30, wall  # ~3 s of it is importing torch; it was 51 s of retries


def test_item14_messages(tmp_path, cli, pretrained_tiny):
    msg = _one_line(cli("world", "--out", tmp_path / "w", "--preset", "huge"))
    assert "Value error" not in msg and "--preset" in msg and "huge" in msg
    msg = _one_line(
        cli("run", _study(tmp_path, "attacks: [{name: rtt, folds: [split_9]}]\n"), "--dry-run")
    )
    assert "study.yaml:8" in msg and "attacks.0.folds" in msg and "split_9" in msg
    msg = _one_line(
        cli(
            "run", _study(tmp_path, "attacks: [{name: rtt}]\n"), "attacks.0.lrs=[.inf]", "--dry-run"
        )
    )
    assert "attacks.0.lrs=[.inf]" in msg
    world = pretrained_tiny["world"]
    attack = ["attack", "--model", "m", "--original", "o", "--data", world, "--out", tmp_path / "a"]
    for opt, value in (("--lrs", "inf"), ("--folds", "split_9"), ("--optimizer", "sgd")):
        msg = _one_line(cli(*attack, opt, value))
        assert opt in msg and value in msg
    assert not (tmp_path / "a").exists()
    # a model directory without its tokenizer
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in Path(pretrained_tiny["original"]).iterdir():
        if f.name in ("config.json", "model.safetensors"):
            (bare / f.name).write_bytes(f.read_bytes())
    msg = _one_line(cli("eval", "--model", bare, "--data", pretrained_tiny["world"]))
    assert str(bare) in msg and "tokenizer" in msg
