"""Shared fixtures.

The paper's released datasets live next to the repository (``../shared/datasets``)
rather than in it: they are large and not ours to redistribute, so a fresh
clone does not have them and the tests that need them skip.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Tests train micro models: one thread avoids oversubscription (measured: a
# fixture took 135 s with two threads on a loaded 2-core machine, 15 s with one).
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """``../shared/datasets`` relative to the repository root (``years/``, ``random_bd/``)."""
    path = (REPO_ROOT.parent / "shared" / "datasets").resolve()
    if not path.is_dir():
        pytest.skip("../shared/datasets not present (fresh clone); CI has it")
    return path


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``tiny`` synthetic world preset (5 splits x 8 facts), written once per session."""
    from rtteval.data.world import write_world

    return write_world(tmp_path_factory.mktemp("world") / "tiny", seed=0, preset="tiny")


@pytest.fixture(scope="session")
def pretrained_tiny(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A micro Llama pretrained on the tiny world (~10 s) and its never-learned control.

    Shared by every test that needs a model that knows facts: unlearning,
    RTT and the pipeline all start from these.
    """
    from rtteval.stages.pretrain import PretrainConfig, pretrain

    root = tmp_path_factory.mktemp("models")
    out = {}
    for kind, exclude in (("original", False), ("control", True)):
        cfg = PretrainConfig(
            model_preset="micro", batch_size=32, exclude_forget=exclude, max_epochs=150
        )
        metrics = pretrain(tiny_world, root / kind, cfg, progress=False)
        if not exclude:
            assert metrics["forget_acc"] >= 0.9, metrics
        out[kind] = root / kind
    out["world"] = tiny_world
    return out


class CliResult:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    """Run ``rtteval ARGS...`` in-process (importing torch per test in a subprocess costs seconds)."""
    import sys

    from rtteval.cli.main import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["rtteval", *map(str, args)])
        code = 0
        try:
            main()
        except SystemExit as e:
            code = int(e.code or 0)
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return run
