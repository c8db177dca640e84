"""``rtteval attack`` resumes through the runner: finished work is found by content, not mtime."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from rtteval.attacks import get_attack


class _Killed(BaseException):
    """Stands for the process being killed mid-attack (nothing catches a BaseException)."""


def test_attack_resumes_finished_work_keyed_on_model_content(
    pretrained_tiny: dict[str, Path], tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    unl = tmp_path / "unl"
    shutil.copytree(pretrained_tiny["control"], unl)
    out = tmp_path / "out"
    args = [
        "attack", "--model", unl, "--original", pretrained_tiny["original"],
        "--data", pretrained_tiny["world"], "--folds", "split_1", "--lrs", "3e-3",
        "--epochs", "1", "--n-boot", "20", "--out", out,
    ]  # fmt: skip
    attacked: list[str] = []
    kill = {"unl": True}
    rtt = type(get_attack("rtt"))
    real = rtt.run

    def run(self, config, ctx):
        attacked.append(ctx.label)
        if kill.get(ctx.label):
            raise _Killed
        return real(self, config, ctx)

    monkeypatch.setattr(rtt, "run", run)
    with pytest.raises(_Killed):  # killed while attacking the unlearned model
        cli(*args)
    assert attacked == ["original", "unl"] and not (out / "results.json").exists()

    def again() -> list[str]:
        attacked.clear()
        r = cli(*args)
        assert r.returncode == 0, r.stderr
        assert json.loads((out / "results.json").read_text())["summary"][0]["method"] == "unl"
        return list(attacked)

    kill.clear()
    assert again() == ["unl"]  # the original's finished attack is reused
    os.utime(unl / "model.safetensors", ns=(1, 1))
    assert again() == []  # a new mtime is not a new model
    cfg = json.loads((unl / "config.json").read_text())
    (unl / "config.json").write_text(json.dumps({**cfg, "_edited": True}))
    assert again() == ["unl"]  # new content is: attacked again, the original still reused
