"""``key=value`` settings on every single-stage command, checked by the stage's own config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

COMMANDS = ("world", "pretrain", "finetune", "unlearn", "attack", "eval")


def _args(cmd: str, m: dict[str, Path], out: Path) -> list[str]:
    world = str(m["world"])
    return {
        "world": ["world", "--preset", "tiny", "--out", out],
        "pretrain": ["pretrain", "--world", world, "--out", out],
        "finetune": ["finetune", "--model", m["control"], "--world", world, "--out", out],
        "unlearn": ["unlearn", "--model", m["original"], "--data", world, "--method", "gd",
                    "--out", out],
        "attack": ["attack", "--model", m["control"], "--original", m["original"], "--data",
                   world, "--out", out],
        "eval": ["eval", "--model", m["original"], "--data", world],
    }[cmd]  # fmt: skip


@pytest.mark.parametrize("cmd", COMMANDS)
def test_a_typod_setting_is_one_line_naming_it(pretrained_tiny, tmp_path: Path, cli, cmd: str):
    out = tmp_path / "out"
    r = cli(*_args(cmd, pretrained_tiny, out), "batch_sizee=4")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "setting 'batch_sizee=4'" in r.stderr and "'batch_sizee'" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()
    # a known key with a value of the wrong type is refused the same way
    key = {"world": "n_splits", "attack": "epochs"}.get(cmd, "batch_size")
    r = cli(*_args(cmd, pretrained_tiny, out), f"{key}=many")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"setting '{key}=many': field '{key}'" in r.stderr and not out.exists()
    # and one out of its declared range (0 or a negative), with the option's own check
    key, bad = {"world": ("seed", "-1"), "attack": ("epochs", "0")}.get(cmd, ("batch_size", "0"))
    r = cli(*_args(cmd, pretrained_tiny, out), f"{key}={bad}")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"setting '{key}={bad}': field '{key}'" in r.stderr and not out.exists()


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_of_every_command_says_key_value_works(cli, cmd: str) -> None:
    r = cli(cmd, "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "KEY=VALUE" in text and "key=value" in text, text


def test_grad_clip_null_clips_nothing_end_to_end(
    pretrained_tiny, tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``grad_clip=null`` reaches the loop as no clipping; left out, the default clips."""
    calls: list[float] = []
    real = torch.nn.utils.clip_grad_norm_

    def clip(params, max_norm, *a, **kw):
        calls.append(max_norm)
        return real(params, max_norm, *a, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    base = ["--max-steps", "2", "--eval-every-steps", "2"]
    unlearn = _args("unlearn", pretrained_tiny, tmp_path / "u0")
    assert cli(*unlearn, *base).returncode == 0
    assert calls and set(calls) == {1.0}  # the tiny default clips at 1
    calls.clear()
    unlearn = _args("unlearn", pretrained_tiny, tmp_path / "u1")
    assert cli(*unlearn, *base, "grad_clip=null").returncode == 0
    assert calls == []
    assert json.loads((tmp_path / "u1" / "metrics.json").read_text())["config"]["grad_clip"] is None
    # the same for an attack (its own config type)
    attack = [*_args("attack", pretrained_tiny, tmp_path / "a"), "--folds", "split_1",
              "--lrs", "1e-3", "--epochs", "1", "--n-boot", "0", "grad_clip=null"]  # fmt: skip
    r = cli(*attack)
    assert r.returncode == 0, r.stderr
    assert calls == []
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    assert all(a["config"]["grad_clip"] is None for a in res["attacks"])
